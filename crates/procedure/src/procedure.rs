//! The [`Procedure`] trait and what a step returns.

use async_trait::async_trait;

use crate::error::Result;

/// How a procedure holds a lock key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockMode {
    /// Others may hold it shared at the same time.
    Shared,
    /// Nobody else may hold it.
    Exclusive,
}

/// The keys a procedure locks for its whole run (taken in sorted order, so two
/// procedures never wait for each other in a cycle).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockKey {
    keys: Vec<(String, LockMode)>,
}

impl LockKey {
    /// No locks.
    pub fn none() -> Self {
        LockKey::default()
    }

    /// One exclusive key.
    pub fn exclusive(key: impl Into<String>) -> Self {
        LockKey::default().with(key, LockMode::Exclusive)
    }

    /// One shared key.
    pub fn shared(key: impl Into<String>) -> Self {
        LockKey::default().with(key, LockMode::Shared)
    }

    /// Adds a key; a key given twice keeps its strongest mode.
    pub fn with(mut self, key: impl Into<String>, mode: LockMode) -> Self {
        let key = key.into();
        match self.keys.iter_mut().find(|(k, _)| *k == key) {
            Some((_, existing)) => *existing = (*existing).max(mode),
            None => self.keys.push((key, mode)),
        }
        self.keys.sort();
        self
    }

    /// The keys in the order they are taken.
    pub fn keys(&self) -> &[(String, LockMode)] {
        &self.keys
    }
}

/// What the manager tells a step.
#[derive(Debug, Clone)]
pub struct Context {
    /// The running procedure's id.
    pub procedure_id: String,
    /// How many times this step has been tried already (0 on the first try; counts
    /// retries, not recoveries).
    pub attempt: u32,
}

/// A child to run, with its id.
pub struct ProcedureWithId {
    /// The child's id (unique in the store).
    pub id: String,
    /// The child.
    pub procedure: BoxedProcedure,
}

/// What a step asks the manager to do next.
pub enum Status {
    /// Run the next step; `persist` saves [`Procedure::dump`] first, so a crash resumes
    /// from here rather than from the last persisted step.
    Executing {
        /// Save the state before the next step.
        persist: bool,
    },
    /// Run these children to completion, then call `execute` again.
    Suspended {
        /// The children.
        subprocedures: Vec<ProcedureWithId>,
        /// Save the state (the children are saved in any case).
        persist: bool,
    },
    /// Finished.
    Done {
        /// Output handed to whoever waits for the procedure.
        output: Option<String>,
    },
}

/// A durable workflow advanced one step at a time by the manager.
///
/// **Contract:** `execute` must be idempotent per step: after a crash the manager
/// resumes at the last persisted state and runs the step again, so running a step twice
/// must have the same effect as running it once (compare-and-put instead of put, check
/// before create). The same holds for `rollback`.
#[async_trait]
pub trait Procedure: Send {
    /// A stable name, persisted with the state; the loader registered under it rebuilds
    /// the procedure after a restart. Never change it for a released procedure.
    fn type_name(&self) -> &str;

    /// Runs one step.
    async fn execute(&mut self, ctx: &Context) -> Result<Status>;

    /// The state to persist, loadable by this type's loader (and by the next version's).
    fn dump(&self) -> Result<String>;

    /// The keys this procedure locks while it runs.
    fn lock_key(&self) -> LockKey {
        LockKey::none()
    }

    /// Whether [`Procedure::rollback`] can undo a failed run.
    fn rollback_supported(&self) -> bool {
        false
    }

    /// Undoes what the steps so far did, after a non-retryable error. Idempotent.
    async fn rollback(&mut self, _ctx: &Context) -> Result<()> {
        Ok(())
    }
}

/// A procedure behind a box, as the manager keeps them.
pub type BoxedProcedure = Box<dyn Procedure>;

/// Rebuilds a procedure of one type from its dumped state.
pub type Loader = Box<dyn Fn(&str) -> Result<BoxedProcedure> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_sort_and_keep_the_strongest_mode() {
        let key = LockKey::shared("b")
            .with("a", LockMode::Shared)
            .with("b", LockMode::Exclusive)
            .with("a", LockMode::Shared);
        assert_eq!(
            key.keys(),
            [
                ("a".to_string(), LockMode::Shared),
                ("b".to_string(), LockMode::Exclusive)
            ]
        );
    }
}
