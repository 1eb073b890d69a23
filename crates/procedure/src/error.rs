//! Errors of procedures and of the framework.

/// Result of procedure and manager calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong. Procedures return [`Error::retry_later`] for transient failures
/// (the manager retries with backoff) and [`Error::external`] for permanent ones (the
/// manager rolls back when the procedure supports it, else fails it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A transient failure inside a step: try the step again later.
    #[error("retryable: {message}")]
    RetryLater {
        /// What failed.
        message: String,
    },

    /// A permanent failure inside a step.
    #[error("{message}")]
    External {
        /// What failed.
        message: String,
    },

    /// The state store failed.
    #[error("state store error at {key}: {message}")]
    Store {
        /// The key being accessed.
        key: String,
        /// What went wrong.
        message: String,
        /// Whether the same call may succeed later.
        retryable: bool,
    },

    /// A persisted procedure cannot be loaded: no loader for its type, or its state does
    /// not decode.
    #[error("procedure {id} ({type_name}) cannot be loaded: {reason}")]
    Poisoned {
        /// The procedure.
        id: String,
        /// Its persisted type name.
        type_name: String,
        /// Why it cannot be loaded.
        reason: String,
    },

    /// A child procedure wants a key in a mode stronger than its ancestor holds it
    /// (exclusive under a shared lock): it could wait for another root sharing the key.
    #[error("procedure {child} needs lock {key:?}, which conflicts with its parent {parent}")]
    LockConflictWithParent {
        /// The child.
        child: String,
        /// The parent.
        parent: String,
        /// The lock key.
        key: String,
    },

    /// A procedure's state could not be saved within the retry budget.
    #[error("procedure {id} could not be saved after {attempts} attempts: {message}")]
    PersistFailed {
        /// The procedure.
        id: String,
        /// How many times saving was tried.
        attempts: u32,
        /// The last store error.
        message: String,
    },

    /// A subprocedure asked for a key none of its ancestors holds. Children only take
    /// keys within their ancestors' locks: a child that took a new key could wait for
    /// another root that waits for it (a deadlock).
    #[error(
        "procedure {child} needs lock {key:?}, which none of its ancestors holds; a subprocedure may only lock keys its root procedure locked"
    )]
    LockOutsideAncestors {
        /// The child.
        child: String,
        /// The lock key.
        key: String,
    },

    /// A child procedure failed, so its parent cannot go on.
    #[error("subprocedure {child} failed: {message}")]
    SubprocedureFailed {
        /// The child.
        child: String,
        /// Its error.
        message: String,
    },

    /// A procedure with this id already exists.
    #[error("procedure {0} already exists")]
    Duplicate(String),

    /// No procedure with this id is known.
    #[error("procedure {0} not found")]
    NotFound(String),

    /// The manager was stopped.
    #[error("the procedure manager has stopped")]
    Stopped,
}

impl Error {
    /// A transient failure: the manager retries the step.
    pub fn retry_later(message: impl Into<String>) -> Self {
        Error::RetryLater {
            message: message.into(),
        }
    }

    /// A permanent failure: the manager rolls back or fails the procedure.
    pub fn external(message: impl Into<String>) -> Self {
        Error::External {
            message: message.into(),
        }
    }

    /// True when the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RetryLater { .. } => true,
            Error::Store { retryable, .. } => *retryable,
            _ => false,
        }
    }
}
