//! Subprocedures: a parent saved with its children's seeds, then every child run (or
//! found finished, or recreated from its seed) and awaited.

use super::*;

/// Saves a parent with its children's seeds (and always its own state, so a recovered
/// parent never re-runs the step that created them), then registers the children.
/// The outer `Err` is a store failure; the inner one a bad child (duplicate id,
/// undumpable state) that fails the parent.
pub(super) async fn suspend(
    inner: &Arc<Inner>,
    record: &mut ProcedureRecord,
    procedure: &mut BoxedProcedure,
    subprocedures: Vec<ProcedureWithId>,
) -> Result<Result<(), Error>> {
    let mut seeds = Vec::with_capacity(subprocedures.len());
    let mut children = Vec::with_capacity(subprocedures.len());
    for ProcedureWithId {
        id,
        procedure: child,
    } in subprocedures
    {
        let data = match child.dump() {
            Ok(data) => data,
            Err(e) => return Ok(Err(e)),
        };
        let child_record = record_of(&id, child.type_name(), Some(&record.id), data.clone());
        if inner.store.get(&record_key(&id)).await?.is_some() {
            return Ok(Err(Error::Duplicate(id)));
        }
        if let Err(e) = inner.reserve(&child_record) {
            return Ok(Err(e));
        }
        seeds.push(ChildSeed {
            id: id.clone(),
            type_name: child.type_name().to_string(),
            data,
        });
        children.push((child_record, child));
    }
    match procedure.dump() {
        Ok(data) => record.data = data,
        Err(e) => return Ok(Err(e)),
    }
    record.children = seeds;
    record.step += 1;
    // The parent (with its children's seeds) is saved before any child, so a crash
    // never leaves children the parent does not know about.
    inner.persist(record).await?;
    let mut parents = lock(&inner.parents);
    let mut orphans = lock(&inner.orphans);
    for (child_record, child) in children {
        parents.insert(child_record.id.clone(), record.id.clone());
        orphans.insert(child_record.id.clone(), (child_record, child));
    }
    Ok(Ok(()))
}

/// Runs (or finds finished) every child of a suspended parent and waits for all of
/// them. The outer `Err` is a store failure or a stop; the inner one the first child
/// failure (the others still run to their end first).
pub(super) async fn run_children(
    inner: &Arc<Inner>,
    parent: &ProcedureRecord,
) -> Result<Result<(), Error>> {
    let mut running = Vec::new();
    let mut failure: Option<Error> = None;
    for seed in &parent.children {
        lock(&inner.parents).insert(seed.id.clone(), parent.id.clone());
        let taken = lock(&inner.orphans).remove(&seed.id);
        let (mut child_record, child) = match taken {
            Some(found) => found,
            None => {
                let saved = match inner.store.get(&record_key(&seed.id)).await? {
                    Some(bytes) => Some(
                        serde_json::from_slice::<ProcedureRecord>(&bytes).map_err(|e| {
                            Error::external(format!("undecodable record of {}: {e}", seed.id))
                        })?,
                    ),
                    None => None,
                };
                match saved {
                    Some(record) if record.state == ProcedureState::Failed => {
                        failure.get_or_insert(Error::SubprocedureFailed {
                            child: seed.id.clone(),
                            message: record.error.unwrap_or_default(),
                        });
                        continue;
                    }
                    Some(record) if record.state.is_finished() => continue,
                    // Saved and unfinished: resume it from its own last save.
                    Some(record) => match inner.load(&record.type_name, &record.data) {
                        Ok(child) => (record, child),
                        Err(e) => {
                            failure.get_or_insert(Error::SubprocedureFailed {
                                child: seed.id.clone(),
                                message: e.to_string(),
                            });
                            continue;
                        }
                    },
                    // Never saved (the crash came right after the parent's save):
                    // recreate it from the seed the parent kept.
                    None => match inner.load(&seed.type_name, &seed.data) {
                        Ok(child) => (
                            record_of(
                                &seed.id,
                                &seed.type_name,
                                Some(&parent.id),
                                seed.data.clone(),
                            ),
                            child,
                        ),
                        Err(e) => {
                            failure.get_or_insert(Error::SubprocedureFailed {
                                child: seed.id.clone(),
                                message: e.to_string(),
                            });
                            continue;
                        }
                    },
                }
            }
        };
        inner.track(&child_record);
        if child_record.step == 0 {
            inner.persist(&mut child_record).await?;
        }
        let id = child_record.id.clone();
        let task = inner.spawn(run(inner.clone(), child_record, child, false))?;
        running.push((id, task));
    }
    for (id, task) in running {
        match task.await {
            Ok(Ok((ProcedureState::Done, _))) => {}
            Ok(Ok(_)) => {
                let message = match inner.store.get(&record_key(&id)).await? {
                    Some(bytes) => serde_json::from_slice::<ProcedureRecord>(&bytes)
                        .ok()
                        .and_then(|r| r.error)
                        .unwrap_or_default(),
                    None => String::new(),
                };
                failure.get_or_insert(Error::SubprocedureFailed { child: id, message });
            }
            Ok(Err(e)) => return Err(e),
            // Aborted: the manager is stopping.
            Err(_) => return Err(Error::Stopped),
        }
    }
    Ok(failure.map_or(Ok(()), Err))
}
