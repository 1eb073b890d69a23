//! Linearizable reads: one ReadIndex per loop turn for every read that arrived in it,
//! answered once the state machine has applied the confirmed index.

use super::*;

impl Driver {
    /// Issues one ReadIndex for every read that arrived this turn.
    pub(super) fn start_reads(&mut self) {
        // A new leader ignores ReadIndex until it has committed an entry of its own term
        // (raft-rs drops the request silently): keep the batch until then.
        if self.read_batch.is_empty() || !self.node.raft.commit_to_current_term() {
            self.expire_reads();
            return;
        }
        let ctx = self.next_read;
        self.next_read = self.next_read.wrapping_add(1);
        self.node.read_index(ctx.to_be_bytes().to_vec());
        let batch = std::mem::take(&mut self.read_batch);
        self.reads_by_ctx.insert(ctx, (Instant::now(), batch));
        self.expire_reads();
    }

    /// Fails read batches raft never confirmed (a lost heartbeat round): after a few
    /// election timeouts nobody waits for them any more, and their slots are freed.
    pub(super) fn expire_reads(&mut self) {
        let limit = self.tick * 60;
        let expired: Vec<u64> = self
            .reads_by_ctx
            .iter()
            .filter(|(_, (since, _))| since.elapsed() > limit)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in expired {
            if let Some((_, replies)) = self.reads_by_ctx.remove(&ctx) {
                for reply in replies {
                    let _ = reply.send(Err(Error::Unavailable {
                        message: "the leader could not confirm its leadership for a read"
                            .to_string(),
                    }));
                }
            }
        }
    }

    /// Answers the reads whose index the state machine has reached.
    pub(super) fn answer_reads(&mut self) {
        let applied = self.store.applied_index();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_by_index)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_by_index = waiting;
        for (index, reply) in ready {
            let _ = reply.send(Ok(index));
        }
    }
}
