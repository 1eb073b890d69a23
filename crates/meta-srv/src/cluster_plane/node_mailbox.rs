//! `NodeMailbox`: send an instruction to a node over its heartbeat stream and await the
//! correlated reply with a deadline (leader only).
//!
//! Each stream that completes its handshake attaches an outbox for its node (a newer
//! stream of the same node replaces the older one). Replies ride on the node's next
//! requests and are matched by id. Leadership changes fail everything pending: the
//! next leader's mailbox starts empty, with ids from a range of its own term.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use common_meta::Error;
use meta_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};

type Pending = HashMap<u64, (u64, oneshot::Sender<Result<pb::InstructionReply, Error>>)>;

/// The leader's mailbox to nodes.
#[derive(Default)]
pub struct NodeMailbox {
    next_id: AtomicU64,
    /// Per node: the attachment number of its current stream and its outbox.
    outboxes: Mutex<HashMap<u64, (u64, mpsc::Sender<pb::MailboxMessage>)>>,
    attachments: AtomicU64,
    pending: Mutex<Pending>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one map update: never torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NodeMailbox {
    /// Attaches node `node_id`'s stream; its instructions arrive on the receiver. The
    /// number identifies this attachment for [`NodeMailbox::detach`].
    pub fn attach(&self, node_id: u64) -> (u64, mpsc::Receiver<pb::MailboxMessage>) {
        let (outbox, inbox) = mpsc::channel(64);
        let attachment = self.attachments.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.outboxes).insert(node_id, (attachment, outbox));
        (attachment, inbox)
    }

    /// Detaches node `node_id`'s stream if `attachment` is still the attached one (a
    /// newer stream of the node may have replaced it).
    pub fn detach(&self, node_id: u64, attachment: u64) {
        let mut outboxes = lock(&self.outboxes);
        if outboxes
            .get(&node_id)
            .is_some_and(|(a, _)| *a == attachment)
        {
            outboxes.remove(&node_id);
        }
    }

    /// Sends `instruction` to node `node_id` and waits up to `deadline` for its reply.
    pub async fn send(
        &self,
        node_id: u64,
        instruction: pb::Instruction,
        deadline: Duration,
    ) -> Result<pb::InstructionReply, Error> {
        let outbox = lock(&self.outboxes)
            .get(&node_id)
            .map(|(_, outbox)| outbox.clone())
            .ok_or_else(|| Error::Unavailable {
                message: format!("node {node_id} has no heartbeat stream to this leader"),
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (reply, answer) = oneshot::channel();
        lock(&self.pending).insert(id, (node_id, reply));
        let message = pb::MailboxMessage {
            id,
            instruction: Some(instruction),
        };
        if outbox.send(message).await.is_err() {
            lock(&self.pending).remove(&id);
            return Err(Error::Unavailable {
                message: format!("node {node_id}'s heartbeat stream closed"),
            });
        }
        match tokio::time::timeout(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Unavailable {
                message: format!("the mailbox was cleared before node {node_id} replied"),
            }),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(Error::Unavailable {
                    message: format!("node {node_id} did not reply within {deadline:?}"),
                })
            }
        }
    }

    /// Hands a reply from node `node_id` to whoever waits for it (late or unknown
    /// replies are dropped).
    pub fn deliver(&self, node_id: u64, reply: pb::InstructionReply) {
        let mut pending = lock(&self.pending);
        if pending
            .get(&reply.id)
            .is_some_and(|(node, _)| *node == node_id)
            && let Some((_, waiter)) = pending.remove(&reply.id)
        {
            let _ = waiter.send(Ok(reply));
        }
    }

    /// Fails everything pending and detaches every stream (leadership changed); ids
    /// given from now on start at `term << 32`, so a late reply to an older leader's
    /// instruction can never match one of this term's.
    pub fn reset(&self, term: u64) {
        self.next_id.store(term << 32, Ordering::Relaxed);
        lock(&self.outboxes).clear();
        for (_, (node, waiter)) in lock(&self.pending).drain() {
            let _ = waiter.send(Err(Error::Unavailable {
                message: format!("leadership changed before node {node} replied"),
            }));
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
            })),
        }
    }

    #[tokio::test]
    async fn round_trip_timeout_unknown_node_and_clear() {
        let mailbox = std::sync::Arc::new(NodeMailbox::default());
        let err = mailbox
            .send(9, open(1), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("node 9 has no heartbeat stream"),
            "{err}"
        );

        let (_, mut inbox) = mailbox.attach(9);
        let sender = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.send(9, open(1), Duration::from_secs(5)).await })
        };
        let message = inbox.recv().await.unwrap();
        // A reply from another node with the same id is not accepted.
        mailbox.deliver(
            8,
            pb::InstructionReply {
                id: message.id,
                ok: true,
                error: String::new(),
            },
        );
        mailbox.deliver(
            9,
            pb::InstructionReply {
                id: message.id,
                ok: true,
                error: String::new(),
            },
        );
        assert!(sender.await.unwrap().unwrap().ok);

        let err = mailbox
            .send(9, open(2), Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not reply within"), "{err}");
        // Its message was delivered; a reply now comes too late and is dropped.
        let late = inbox.recv().await.unwrap();
        mailbox.deliver(
            9,
            pb::InstructionReply {
                id: late.id,
                ok: true,
                error: String::new(),
            },
        );

        let waiting = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.send(9, open(3), Duration::from_secs(5)).await })
        };
        let third = inbox.recv().await.unwrap();
        assert_eq!(third.id, late.id + 1);
        mailbox.reset(5);
        let err = waiting.await.unwrap().unwrap_err();
        assert!(err.to_string().contains("leadership changed"), "{err}");
        let (_, mut inbox) = mailbox.attach(9);
        let _next = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.send(9, open(4), Duration::from_secs(5)).await })
        };
        assert_eq!(inbox.recv().await.unwrap().id, (5 << 32) + 1);
    }
}
