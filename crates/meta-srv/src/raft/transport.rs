//! How raft messages travel between members.
//!
//! [`Transport`] is the seam: the driver hands it every outgoing message and never
//! waits. [`LocalRouter`] connects members in one process and injects faults (isolate a
//! member, cut a link, delay messages) for tests, with no network at all.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use raft::prelude::Message;

use crate::raft::driver::DriverHandle;

/// Sends raft messages to other members. Must not block: a message that cannot be
/// delivered is dropped (raft retransmits).
pub trait Transport: Send + Sync + 'static {
    /// Sends `messages`, each to its `to` member.
    fn send(&self, messages: Vec<Message>);
}

/// An in-process router between members' drivers, with fault injection.
#[derive(Default)]
pub struct LocalRouter {
    state: Mutex<RouterState>,
}

#[derive(Default)]
struct RouterState {
    drivers: HashMap<u64, DriverHandle>,
    isolated: HashSet<u64>,
    /// Directed links (from, to) whose messages are dropped.
    cut: HashSet<(u64, u64)>,
    /// Members whose inbound messages are held back this long.
    delays: HashMap<u64, Duration>,
    /// The delivery thread for delayed messages, started on first use.
    delayer: Option<mpsc::Sender<Delayed>>,
    /// Numbers delayed messages, so equal deadlines keep their order.
    next_seq: u64,
}

/// A message held back until `at`.
struct Delayed {
    at: Instant,
    seq: u64,
    driver: DriverHandle,
    message: Message,
}

/// Delivers delayed messages in deadline order until the router is dropped.
fn delayer(queue: mpsc::Receiver<Delayed>) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut held: HashMap<u64, Delayed> = HashMap::new();
    loop {
        let next = heap.peek().map(|Reverse((at, _))| *at);
        let received = match next {
            None => queue
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(at) => queue.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match received {
            Ok(item) => {
                heap.push(Reverse((item.at, item.seq)));
                held.insert(item.seq, item);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while let Some(Reverse((at, seq))) = heap.peek().copied() {
            if at > Instant::now() {
                break;
            }
            heap.pop();
            if let Some(item) = held.remove(&seq) {
                item.driver.step(item.message);
            }
        }
    }
}

impl LocalRouter {
    fn state(&self) -> std::sync::MutexGuard<'_, RouterState> {
        // Each critical section is a single collection update: never torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects member `id`.
    pub fn register(&self, id: u64, driver: DriverHandle) {
        self.state().drivers.insert(id, driver);
    }

    /// Disconnects member `id` (it was stopped or killed).
    pub fn unregister(&self, id: u64) {
        self.state().drivers.remove(&id);
    }

    /// Drops every message to or from `id` until [`LocalRouter::heal`].
    pub fn isolate(&self, id: u64) {
        self.state().isolated.insert(id);
    }

    /// Drops messages from `from` to `to` (one direction) until [`LocalRouter::heal`].
    pub fn cut(&self, from: u64, to: u64) {
        self.state().cut.insert((from, to));
    }

    /// Holds back every message to `id` for `delay` until [`LocalRouter::heal`].
    pub fn delay(&self, id: u64, delay: Duration) {
        self.state().delays.insert(id, delay);
    }

    /// Removes every fault.
    pub fn heal(&self) {
        let mut state = self.state();
        state.isolated.clear();
        state.cut.clear();
        state.delays.clear();
    }
}

impl Transport for LocalRouter {
    fn send(&self, messages: Vec<Message>) {
        let mut state = self.state();
        for message in messages {
            let (from, to) = (message.from, message.to);
            if state.isolated.contains(&from)
                || state.isolated.contains(&to)
                || state.cut.contains(&(from, to))
            {
                continue;
            }
            let Some(driver) = state.drivers.get(&to).cloned() else {
                continue;
            };
            match state.delays.get(&to).copied() {
                None => driver.step(message),
                Some(delay) => {
                    state.next_seq += 1;
                    let seq = state.next_seq;
                    let delayer = state.delayer.get_or_insert_with(|| {
                        let (queue, items) = mpsc::channel();
                        std::thread::spawn(move || delayer(items));
                        queue
                    });
                    let _ = delayer.send(Delayed {
                        at: Instant::now() + delay,
                        seq,
                        driver,
                        message,
                    });
                }
            }
        }
    }
}
