//! How one procedure runs: its locks, its steps in order (retried with backoff, saved
//! when they ask), its children, and the end it comes to.

use super::*;

/// Runs a step (or a rollback), turning a panic into a permanent error of the procedure.
pub(super) async fn guarded<T>(what: &str, step: impl Future<Output = Result<T>>) -> Result<T> {
    match AssertUnwindSafe(step).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            Err(Error::external(format!("{what} panicked: {message}")))
        }
    }
}

/// Runs one procedure to its end (taking its locks first unless it already holds them:
/// `locked`). Returns `Err` only when the store failed or the manager stopped (the
/// runner then ends as if the process died).
pub(super) fn run(
    inner: Arc<Inner>,
    record: ProcedureRecord,
    procedure: BoxedProcedure,
    locked: bool,
) -> BoxFuture<Finished> {
    Box::pin(async move {
        let (mut record, mut procedure) = (record, procedure);
        let id = record.id.clone();
        let ancestors = inner.ancestors(&id);
        let _release = LockRelease(inner.clone(), id.clone());
        let acquired = if locked {
            Ok(())
        } else {
            inner
                .locks
                .acquire(&id, &ancestors, &procedure.lock_key())
                .await
        };
        if let Err(e) = acquired {
            record.state = ProcedureState::Failed;
            record.error = Some(e.to_string());
            inner.persist(&mut record).await?;
            return Ok((ProcedureState::Failed, None));
        }
        match drive(&inner, &mut record, &mut procedure).await {
            Err(e @ Error::PersistFailed { .. }) => {
                park(&inner, &id, &e).await;
                Err(e)
            }
            other => {
                if let Ok((state, _)) = &other {
                    // One line per procedure that ends (an operator's trail).
                    tracing::info!(
                        procedure = %id,
                        type_name = %record.type_name,
                        ?state,
                        error = record.error.as_deref().unwrap_or(""),
                        "procedure ended"
                    );
                }
                other
            }
        }
    })
}

async fn drive(
    inner: &Arc<Inner>,
    record: &mut ProcedureRecord,
    procedure: &mut BoxedProcedure,
) -> Finished {
    if record.state == ProcedureState::RollingBack {
        let cause = record.error.clone().unwrap_or_default();
        return fail(inner, record, procedure, Error::external(cause)).await;
    }
    let mut attempt = 0u32;
    loop {
        inner.wait_unpaused(&record.id).await;
        if !record.children.is_empty() {
            if let Err(child_failure) = run_children(inner, record).await? {
                return fail(inner, record, procedure, child_failure).await;
            }
            record.children.clear();
        }
        let ctx = Context {
            procedure_id: record.id.clone(),
            attempt,
        };
        match guarded("a step", procedure.execute(&ctx)).await {
            Ok(Status::Executing { persist }) => {
                attempt = 0;
                if persist {
                    match procedure.dump() {
                        Ok(data) => record.data = data,
                        Err(e) => return fail(inner, record, procedure, e).await,
                    }
                    record.step += 1;
                    inner.persist(record).await?;
                }
            }
            Ok(Status::Suspended { subprocedures, .. }) => {
                attempt = 0;
                if let Err(e) = suspend(inner, record, procedure, subprocedures).await? {
                    return fail(inner, record, procedure, e).await;
                }
            }
            Ok(Status::Done { output }) => {
                record.state = ProcedureState::Done;
                record.output = output.clone();
                record.step += 1;
                if let Ok(data) = procedure.dump() {
                    record.data = data;
                }
                inner.persist(record).await?;
                return Ok((ProcedureState::Done, output));
            }
            Err(e) if e.is_retryable() && attempt < inner.config.max_retries => {
                attempt += 1;
                tracing::debug!(id = %record.id, attempt, error = %e, "retrying a step");
                inner.set_state(&record.id, ProcedureState::Retrying);
                tokio::time::sleep(inner.backoff(attempt)).await;
                inner.set_state(&record.id, ProcedureState::Running);
            }
            Err(e) => return fail(inner, record, procedure, e).await,
        }
    }
}
