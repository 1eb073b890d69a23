//! How raft messages travel between members.
//!
//! [`Transport`] is the seam: the driver hands it every outgoing message and never
//! waits. [`LocalRouter`] connects members in one process and injects faults (isolate a
//! member, drop messages) for tests, with no network at all.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use raft::prelude::Message;

use crate::raft::driver::Mailbox;

/// Sends raft messages to other members. Must not block: a message that cannot be
/// delivered is dropped (raft retransmits).
pub trait Transport: Send + Sync + 'static {
    /// Sends `messages`, each to its `to` member.
    fn send(&self, messages: Vec<Message>);
}

/// An in-process router between members' mailboxes, with fault injection.
#[derive(Default)]
pub struct LocalRouter {
    state: Mutex<RouterState>,
}

#[derive(Default)]
struct RouterState {
    mailboxes: HashMap<u64, Mailbox>,
    isolated: HashSet<u64>,
    /// Directed links (from, to) whose messages are dropped.
    cut: HashSet<(u64, u64)>,
}

impl LocalRouter {
    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        // Each critical section is a single collection update: never torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects member `id`.
    pub fn register(&self, id: u64, mailbox: Mailbox) {
        self.state().mailboxes.insert(id, mailbox);
    }

    /// Disconnects member `id` (it was stopped or killed).
    pub fn unregister(&self, id: u64) {
        self.state().mailboxes.remove(&id);
    }

    /// Drops every message to or from `id` until [`LocalRouter::heal`].
    pub fn isolate(&self, id: u64) {
        self.state().isolated.insert(id);
    }

    /// Drops messages from `from` to `to` (one direction) until [`LocalRouter::heal`].
    pub fn cut(&self, from: u64, to: u64) {
        self.state().cut.insert((from, to));
    }

    /// Removes every fault.
    pub fn heal(&self) {
        let mut state = self.state();
        state.isolated.clear();
        state.cut.clear();
    }
}

impl Transport for LocalRouter {
    fn send(&self, messages: Vec<Message>) {
        let state = self.state();
        for message in messages {
            let (from, to) = (message.from, message.to);
            if state.isolated.contains(&from)
                || state.isolated.contains(&to)
                || state.cut.contains(&(from, to))
            {
                continue;
            }
            if let Some(mailbox) = state.mailboxes.get(&to) {
                mailbox.step(message);
            }
        }
    }
}
