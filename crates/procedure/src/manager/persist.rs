//! Saving a procedure's record: retried with backoff while the store fails, up to the
//! retry budget (see the parent module's doc: a procedure is never abandoned).

use super::*;

impl Inner {
    /// Saves `record`, retrying a failing store with backoff; after the retry budget it
    /// returns [`Error::PersistFailed`]. A stopped manager ends the retries at once.
    pub(super) async fn persist(&self, record: &mut ProcedureRecord) -> Result<()> {
        let mut attempt = 0u32;
        loop {
            match self.persist_once(record).await {
                Ok(()) => return Ok(()),
                Err(Error::Stopped) => return Err(Error::Stopped),
                Err(e) if attempt >= self.config.max_persist_retries => {
                    return Err(Error::PersistFailed {
                        id: record.id.clone(),
                        attempts: attempt + 1,
                        message: e.to_string(),
                    });
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(id = %record.id, attempt, error = %e, "saving a procedure failed; retrying");
                    tokio::time::sleep(self.backoff(attempt)).await;
                    if self.stopped.load(Ordering::SeqCst) {
                        return Err(Error::Stopped);
                    }
                }
            }
        }
    }

    pub(super) async fn persist_once(&self, record: &mut ProcedureRecord) -> Result<()> {
        record.updated_ms = now_ms();
        let bytes = serde_json::to_vec(record)
            .map_err(|e| Error::external(format!("encoding procedure {}: {e}", record.id)))?;
        self.store.put(&record_key(&record.id), bytes).await?;
        self.publish(record);
        Ok(())
    }

    pub(super) fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .config
            .retry_delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.config.max_retry_delay);
        // Jitter in [0.5, 1.0) so retries of many procedures spread out.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        base.mul_f64(0.5 + f64::from(nanos % 1000) / 2000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStateStore;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let manager = ProcedureManager::new(
            Arc::new(MemoryStateStore::default()),
            ManagerConfig {
                retry_delay: Duration::from_millis(100),
                max_retry_delay: Duration::from_secs(1),
                ..ManagerConfig::default()
            },
        );
        let inner = &manager.inner;
        for attempt in 1..=3u32 {
            let full = Duration::from_millis(100) * (1 << attempt);
            let got = inner.backoff(attempt);
            assert!(got >= full / 2 && got < full, "attempt {attempt}: {got:?}");
        }
        for attempt in [4, 10, 40] {
            assert!(
                inner.backoff(attempt) < Duration::from_secs(1),
                "capped at attempt {attempt}"
            );
        }
    }
}
