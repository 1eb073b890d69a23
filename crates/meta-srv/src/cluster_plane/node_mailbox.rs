//! `NodeMailbox`: send an instruction to a node over its heartbeat stream and await the
//! correlated reply with a deadline (leader only).
//!
//! Each stream that completes its handshake attaches an outbox for its node; a newer
//! stream of the node replaces an older one, never the reverse. Replies ride on the
//! node's next requests and are matched by id. A new term (or the loss of leadership)
//! fails everything pending and detaches every stream, and ids are drawn from a range
//! of the term, so a late reply to an older leader's instruction never matches.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use common_meta::Error;
use meta_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use crate::cluster_plane::live_nodes::Stale;

type Waiter = oneshot::Sender<Result<pb::InstructionReply, Error>>;

/// Outboxes and waiters under one lock: a send looks up the outbox and registers its
/// wait in one critical section, so a reset either comes first (no outbox) or fails
/// the wait.
#[derive(Default)]
struct Inner {
    /// The term the outboxes belong to.
    term: u64,
    next_id: u64,
    /// Per node: the stream attached and its outbox.
    outboxes: HashMap<u64, (u64, mpsc::Sender<pb::MailboxMessage>)>,
    /// Per instruction id: the node and stream it went to, and who waits for the reply.
    pending: HashMap<u64, (u64, u64, Waiter)>,
}

impl Inner {
    fn reset(&mut self, why: &str) {
        self.outboxes.clear();
        for (_, (node, _, waiter)) in self.pending.drain() {
            let _ = waiter.send(Err(Error::Unavailable {
                message: format!("{why} before node {node} replied"),
            }));
        }
    }

    /// Fails what waits on `stream` of node `node`: its instructions can no longer be
    /// answered (replies belong to the stream they came on).
    fn fail_stream(&mut self, node: u64, stream: u64, why: &str) {
        let ids: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, (n, s, _))| *n == node && *s == stream)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, _, waiter)) = self.pending.remove(&id) {
                let _ = waiter.send(Err(Error::Unavailable {
                    message: format!("node {node}'s heartbeat stream {why} before it replied"),
                }));
            }
        }
    }

    fn enter(&mut self, term: u64) -> Result<(), Stale> {
        if term > self.term {
            self.reset("leadership changed");
            self.term = term;
            self.next_id = term << 32;
        }
        if term < self.term {
            return Err(Stale::Term);
        }
        Ok(())
    }
}

/// The leader's mailbox to nodes.
#[derive(Default)]
pub struct NodeMailbox {
    inner: Mutex<Inner>,
}

/// Instructions queued per stream before they are pushed.
const OUTBOX_CAPACITY: usize = 64;

/// Removes a pending instruction when its sender stops waiting for any reason.
struct PendingGuard<'a> {
    mailbox: &'a NodeMailbox,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.mailbox.lock().pending.remove(&self.id);
    }
}

impl NodeMailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent: never torn.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts term `term` if it is newer (leadership won): everything older fails.
    pub fn advance(&self, term: u64) {
        let _ = self.lock().enter(term);
    }

    /// Fails everything pending and detaches every stream: leadership in `lost_term`
    /// ended. A newer term's state is left alone (this call may come late).
    pub fn clear(&self, lost_term: u64) {
        let mut inner = self.lock();
        if inner.term <= lost_term {
            inner.reset("leadership changed");
        }
    }

    /// Attaches `stream` (of term `term`) as node `node_id`'s outbox, unless a newer
    /// stream of the node is attached or the term is over; its instructions arrive on
    /// the receiver. What waited on a replaced older stream fails.
    pub fn attach(
        &self,
        term: u64,
        node_id: u64,
        stream: u64,
    ) -> Result<mpsc::Receiver<pb::MailboxMessage>, Stale> {
        let mut inner = self.lock();
        inner.enter(term)?;
        let older = match inner.outboxes.get(&node_id) {
            Some((attached, _)) if *attached > stream => return Err(Stale::Replaced),
            Some((attached, _)) => Some(*attached),
            None => None,
        };
        if let Some(older) = older {
            inner.fail_stream(node_id, older, "was replaced");
        }
        let (outbox, inbox) = mpsc::channel(OUTBOX_CAPACITY);
        inner.outboxes.insert(node_id, (stream, outbox));
        Ok(inbox)
    }

    /// Detaches node `node_id`'s `stream` (it ended) if it is still the attached one,
    /// failing what waits on it.
    pub fn detach(&self, node_id: u64, stream: u64) {
        let mut inner = self.lock();
        inner.fail_stream(node_id, stream, "ended");
        if inner
            .outboxes
            .get(&node_id)
            .is_some_and(|(attached, _)| *attached == stream)
        {
            inner.outboxes.remove(&node_id);
        }
    }

    /// Sends `instruction` to node `node_id` and waits up to `deadline` (queueing
    /// included) for its reply.
    pub async fn send(
        &self,
        node_id: u64,
        instruction: pb::Instruction,
        deadline: Duration,
    ) -> Result<pb::InstructionReply, Error> {
        let (reply, answer) = oneshot::channel();
        let (id, outbox) = {
            let mut inner = self.lock();
            let (stream, outbox) = inner
                .outboxes
                .get(&node_id)
                .map(|(stream, outbox)| (*stream, outbox.clone()))
                .ok_or_else(|| Error::Unavailable {
                    message: format!("node {node_id} has no heartbeat stream to this leader"),
                })?;
            inner.next_id += 1;
            let id = inner.next_id;
            inner.pending.insert(id, (node_id, stream, reply));
            (id, outbox)
        };
        let _guard = PendingGuard { mailbox: self, id };
        let message = pb::MailboxMessage {
            id,
            instruction: Some(instruction),
        };
        let exchange = async {
            outbox.send(message).await.map_err(|_| Error::Unavailable {
                message: format!("node {node_id}'s heartbeat stream closed"),
            })?;
            match answer.await {
                Ok(result) => result,
                Err(_) => Err(Error::Unavailable {
                    message: format!("the mailbox was cleared before node {node_id} replied"),
                }),
            }
        };
        match tokio::time::timeout(deadline, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable {
                message: format!("node {node_id} did not reply within {deadline:?}"),
            }),
        }
    }

    /// The nodes with a stream attached now.
    pub fn attached(&self) -> Vec<u64> {
        self.lock().outboxes.keys().copied().collect()
    }

    /// Hands a reply from node `node_id` to whoever waits for it (late or unknown
    /// replies are dropped).
    pub fn deliver(&self, node_id: u64, reply: pb::InstructionReply) {
        let mut inner = self.lock();
        if inner
            .pending
            .get(&reply.id)
            .is_some_and(|(node, _, _)| *node == node_id)
            && let Some((_, _, waiter)) = inner.pending.remove(&reply.id)
        {
            let _ = waiter.send(Ok(reply));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(region_id: u64) -> pb::Instruction {
        pb::Instruction {
            kind: Some(pb::instruction::Kind::OpenRegion(pb::RegionInstruction {
                region_id,
                ..Default::default()
            })),
        }
    }

    fn ok(id: u64) -> pb::InstructionReply {
        pb::InstructionReply {
            id,
            ok: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn round_trip_timeout_unknown_node_and_reset() {
        let mailbox = std::sync::Arc::new(NodeMailbox::default());
        let err = mailbox
            .send(9, open(1), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("node 9 has no heartbeat stream"),
            "{err}"
        );

        let mut inbox = mailbox.attach(3, 9, 1).unwrap();
        let sender = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.send(9, open(1), Duration::from_secs(5)).await })
        };
        let message = inbox.recv().await.unwrap();
        assert_eq!(message.id, (3 << 32) + 1, "ids carry the term");
        // A reply from another node with the same id is not accepted.
        mailbox.deliver(8, ok(message.id));
        mailbox.deliver(9, ok(message.id));
        assert!(sender.await.unwrap().unwrap().ok);

        let err = mailbox
            .send(9, open(2), Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not reply within"), "{err}");
        assert!(
            mailbox.lock().pending.is_empty(),
            "a timed-out wait is forgotten"
        );
        // Its message was delivered; a reply now comes too late and is dropped.
        let late = inbox.recv().await.unwrap();
        mailbox.deliver(9, ok(late.id));

        let waiting = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.send(9, open(3), Duration::from_secs(5)).await })
        };
        let third = inbox.recv().await.unwrap();
        assert_eq!(third.id, late.id + 1);
        mailbox.advance(5);
        let err = waiting.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("leadership changed"), "{err}");
        assert_eq!(
            mailbox.attach(4, 9, 7).err(),
            Some(Stale::Term),
            "an older term cannot attach"
        );
        let mut inbox = mailbox.attach(5, 9, 2).unwrap();
        mailbox.clear(4);
        let _next = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.send(9, open(4), Duration::from_secs(5)).await })
        };
        assert_eq!(
            inbox.recv().await.unwrap().id,
            (5 << 32) + 1,
            "a late clear of term 4 left term 5 alone"
        );
        mailbox.clear(5);
        assert!(inbox.recv().await.is_none(), "leadership lost: detached");
    }

    #[tokio::test]
    async fn a_replaced_or_ended_stream_fails_its_waits_and_a_full_outbox_times_out() {
        let mailbox = NodeMailbox::default();
        let mut older = mailbox.attach(1, 9, 1).unwrap();
        let replace = async {
            older.recv().await.unwrap();
            mailbox.attach(1, 9, 2).unwrap()
        };
        let (result, mut newer) =
            tokio::join!(mailbox.send(9, open(1), Duration::from_secs(30)), replace);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("was replaced before it replied"), "{err}");
        assert_eq!(
            mailbox.attach(1, 9, 1).err(),
            Some(Stale::Replaced),
            "no going back to an older stream"
        );
        mailbox.detach(9, 1);

        // The newer stream is still attached; fill its outbox without reading it.
        for _ in 0..OUTBOX_CAPACITY {
            let _ = mailbox.send(9, open(1), Duration::from_millis(1)).await;
        }
        let err = mailbox
            .send(9, open(1), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not reply within"), "{err}");
        assert!(mailbox.lock().pending.is_empty());

        // Once the last instruction (region 2) is out on the stream, the stream ends.
        let ended = async {
            while newer
                .recv()
                .await
                .is_some_and(|m| m.instruction != Some(open(2)))
            {}
            mailbox.detach(9, 2);
        };
        let (result, ()) = tokio::join!(mailbox.send(9, open(2), Duration::from_secs(30)), ended);
        let err = result.unwrap_err().to_string();
        assert!(err.contains("ended before it replied"), "{err}");
        assert!(
            mailbox
                .send(9, open(1), Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
