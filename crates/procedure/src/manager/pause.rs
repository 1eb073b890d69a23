//! Pausing one procedure by hand: it stops before its next step (the step running now
//! ends first) until it is resumed. The mark is kept in the store (`paused/{id}`), so a
//! paused procedure stays paused when another manager recovers it (a new leader).
//! Its locks stay held while it waits: what it was changing stays out of others' way.

use std::collections::HashSet;

use super::{Inner, ProcedureManager};
use crate::error::{Error, Result};
use crate::store::{PAUSED_PREFIX, ProcedureRecord, paused_key, record_key};

impl ProcedureManager {
    /// Pauses procedure `id` before its next step. Refused for an unknown or finished
    /// procedure ([`Error::NotFound`], [`Error::External`]). Pausing a paused one is
    /// no change.
    pub async fn pause_one(&self, id: &str) -> Result<()> {
        self.inner.unfinished(id).await?;
        self.inner.store.put(&paused_key(id), Vec::new()).await?;
        self.inner.paused_ids.send_modify(|ids| {
            ids.insert(id.to_string());
        });
        tracing::info!(id, "procedure paused");
        Ok(())
    }

    /// Lets procedure `id` go on. Refused for an unknown procedure; resuming one that
    /// is not paused is no change.
    pub async fn resume_one(&self, id: &str) -> Result<()> {
        if self.inner.store.get(&record_key(id)).await?.is_none() {
            return Err(Error::NotFound(id.to_string()));
        }
        self.inner.store.delete(&paused_key(id)).await?;
        self.inner.paused_ids.send_modify(|ids| {
            ids.remove(id);
        });
        tracing::info!(id, "procedure resumed");
        Ok(())
    }

    /// Whether procedure `id` is paused by hand.
    pub fn is_paused(&self, id: &str) -> bool {
        self.inner.paused_ids.borrow().contains(id)
    }

    /// Reads the pause marks at recovery; marks of procedures that are no longer
    /// unfinished are removed.
    pub(super) async fn load_paused(&self, unfinished: &HashSet<String>) -> Result<()> {
        let mut paused = HashSet::new();
        for (key, _) in self.inner.store.scan_prefix(PAUSED_PREFIX).await? {
            let id = key.strip_prefix(PAUSED_PREFIX).unwrap_or(&key).to_string();
            if unfinished.contains(&id) {
                paused.insert(id);
            } else {
                self.inner.store.delete(&key).await?;
            }
        }
        self.inner.paused_ids.send_replace(paused);
        Ok(())
    }
}

impl Inner {
    /// The record of procedure `id`, refused unless it exists and is unfinished.
    async fn unfinished(&self, id: &str) -> Result<ProcedureRecord> {
        let bytes = self
            .store
            .get(&record_key(id))
            .await?
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let record: ProcedureRecord = serde_json::from_slice(&bytes).map_err(|e| Error::Store {
            key: record_key(id),
            message: format!("undecodable record: {e}"),
            retryable: false,
        })?;
        if record.state.is_finished() {
            return Err(Error::External {
                message: format!(
                    "procedure {id} has already finished ({:?}); only a running one can be paused",
                    record.state
                ),
            });
        }
        Ok(record)
    }
}
