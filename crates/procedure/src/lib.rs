//! `procedure`: a durable, idempotent workflow engine. It depends on no crate of
//! Metasrv, so other projects can use it alone.
//!
//! A [`Procedure`] advances one step per [`Procedure::execute`] call and says whether to
//! persist its state, wait for children, or finish. The [`ProcedureManager`] persists
//! after every step that asks, retries retryable errors with backoff, rolls back on
//! permanent ones, holds key locks, runs children, and on [`ProcedureManager::start`]
//! resumes every unfinished procedure at its last persisted step. Because a step can
//! run again after a crash, steps must be idempotent.
//!
//! ```
//! use async_trait::async_trait;
//! use procedure::{
//!     Context, ManagerConfig, MemoryStateStore, Procedure, ProcedureManager, ProcedureWithId,
//!     Result, Status,
//! };
//! use std::sync::Arc;
//!
//! /// Counts to three, persisting after every step.
//! struct Count { at: u32 }
//!
//! #[async_trait]
//! impl Procedure for Count {
//!     fn type_name(&self) -> &str { "example.Count" }
//!     async fn execute(&mut self, _ctx: &Context) -> Result<Status> {
//!         self.at += 1;
//!         Ok(if self.at == 3 {
//!             Status::Done { output: Some(self.at.to_string()) }
//!         } else {
//!             Status::Executing { persist: true }
//!         })
//!     }
//!     fn dump(&self) -> Result<String> { Ok(self.at.to_string()) }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let manager = ProcedureManager::new(Arc::new(MemoryStateStore::default()), ManagerConfig::default());
//! manager.register_loader("example.Count", Box::new(|data: &str| {
//!     let at = data.parse().map_err(|e| procedure::Error::external(format!("{e}")))?;
//!     Ok(Box::new(Count { at }) as procedure::BoxedProcedure)
//! }))?;
//! manager.start().await?;
//! let watcher = manager.submit(ProcedureWithId { id: "p1".into(), procedure: Box::new(Count { at: 0 }) }).await?;
//! assert_eq!(watcher.wait().await?, Some("3".to_string()));
//! # Ok::<(), procedure::Error>(())
//! # }).unwrap();
//! ```

mod error;
mod lock;
mod manager;
mod procedure;
mod store;

pub use error::{Error, Result};
pub use manager::{ManagerConfig, ProcedureManager, Progress, Watcher};
pub use procedure::{
    BoxedProcedure, Context, Loader, LockKey, LockMode, Procedure, ProcedureWithId, Status,
};
pub use store::{
    ChildSeed, MemoryStateStore, ProcedureRecord, ProcedureState, RECORD_PREFIX, StateStore,
    record_key,
};
