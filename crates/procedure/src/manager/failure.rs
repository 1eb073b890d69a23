//! How a procedure ends badly: rolled back and failed, or, when its state cannot be
//! saved, failed visibly and parked with its locks.

use super::*;

/// A step failed for good: roll back when supported, then mark the procedure failed.
pub(super) async fn fail(
    inner: &Arc<Inner>,
    record: &mut ProcedureRecord,
    procedure: &mut BoxedProcedure,
    error: Error,
) -> Finished {
    let cause = error.to_string();
    tracing::warn!(id = %record.id, error = %cause, "procedure failed");
    if procedure.rollback_supported() {
        if record.state != ProcedureState::RollingBack {
            record.error = Some(cause.clone());
            record.state = ProcedureState::RollingBack;
            // The state the rollback must undo, even steps that were not persisted.
            if let Ok(data) = procedure.dump() {
                record.data = data;
            }
            inner.persist(record).await?;
        }
        let mut attempt = 0u32;
        loop {
            let ctx = Context {
                procedure_id: record.id.clone(),
                attempt,
            };
            match guarded("a rollback", procedure.rollback(&ctx)).await {
                Ok(()) => {
                    record.error = Some(format!("{cause} (rolled back)"));
                    break;
                }
                Err(e) if e.is_retryable() && attempt < inner.config.max_retries => {
                    attempt += 1;
                    tokio::time::sleep(inner.backoff(attempt)).await;
                }
                Err(e) => {
                    record.error = Some(format!("{cause}; rollback failed: {e}"));
                    break;
                }
            }
        }
    } else {
        record.error = Some(cause);
    }
    record.state = ProcedureState::Failed;
    inner.persist(record).await?;
    Ok((ProcedureState::Failed, None))
}

/// A procedure whose state cannot be saved: failed visibly (its watchers and its
/// ancestors' are answered), and parked with its locks until the manager stops.
pub(super) async fn park(inner: &Arc<Inner>, id: &str, error: &Error) {
    let reason = format!(
        "{error}; its locks are kept until the next recovery (a restart or a new leader) resumes it"
    );
    tracing::error!(%id, error = %reason, "procedure cannot be saved");
    for failed in std::iter::once(id.to_string()).chain(inner.ancestors(id)) {
        if let Some(sender) = lock(&inner.progress).get(&failed) {
            sender.send_modify(|p| {
                p.state = ProcedureState::Failed;
                p.error = Some(reason.clone());
            });
        }
    }
    // Holding `_release` (in the caller) keeps the locks; `stop` aborts this task.
    std::future::pending::<()>().await;
}
