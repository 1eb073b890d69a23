//! The error type of `common-meta`: one enum whose variants carry context.

/// Result of `common-meta` operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `common-meta` and in a `KvBackend`.
///
/// An expected outcome such as a failed compare-and-put is a value, not an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks a rule of the API or a configured limit; retrying it is futile.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong, naming the field or limit.
        message: String,
    },

    /// A typed key could not be decoded from its bytes.
    #[error("cannot decode key {key:?}: {reason}")]
    KeyDecode {
        /// The key, lossily shown as UTF-8.
        key: String,
        /// Why it does not decode.
        reason: String,
    },

    /// A name cannot be part of a typed key.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        /// Which kind of name (catalog, schema, table, sequence).
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// The sled storage failed.
    #[error("storage error while {context}: {source}")]
    Storage {
        /// What the backend was doing.
        context: String,
        /// The underlying sled error.
        #[source]
        source: sled::Error,
    },

    /// A file system operation failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Stored bytes do not decode: the data directory is damaged or from an incompatible version.
    #[error("corrupted data at {location}: {reason}")]
    Corrupted {
        /// Where the bad bytes are (tree and key).
        location: String,
        /// What is wrong with them.
        reason: String,
    },

    /// The service cannot be reached or is not ready; the request may be retried.
    #[error("unavailable: {message}")]
    Unavailable {
        /// What could not be reached and why.
        message: String,
    },

    /// This member is not the leader and cannot serve the request; `leader` is the
    /// member it believes leads, if it knows one. Retry there.
    #[error("not leader{}", leader.map(|l| format!("; member {l} is the leader")).unwrap_or_default())]
    NotLeader {
        /// The id of the leader this member knows of.
        leader: Option<u64>,
    },

    /// A write was proposed but its fate is not known: it may or may not have been
    /// applied (leadership was lost while it waited, or the wait timed out). Sending it
    /// again is safe only within the same client session and seq.
    #[error("outcome unknown: {message}")]
    OutcomeUnknown {
        /// What happened, and what the caller can do.
        message: String,
    },

    /// A write named a client session that is not open (expired, closed, or never
    /// opened); the write was not applied.
    #[error("session {id} is not open (expired or closed); the write was not applied")]
    SessionExpired {
        /// The session named.
        id: u64,
    },

    /// The caller did not prove who it is (a missing, invalid, expired or used join
    /// token); asking again with the same credentials fails again.
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// What was wrong with the credentials.
        message: String,
    },

    /// A remote service answered with an error that has no better-fitting variant.
    #[error("remote error ({code}): {message}")]
    Remote {
        /// The status code name (for example `Internal`).
        code: String,
        /// The message the server gave.
        message: String,
    },

    /// The request names something that does not exist (a catalog, schema or table).
    #[error("{what} not found")]
    NotFound {
        /// What was looked for, e.g. `table greptime.public.cpu`.
        what: String,
    },

    /// The request would create something that exists already.
    #[error("{what} already exists")]
    AlreadyExists {
        /// What exists, e.g. `table greptime.public.cpu (id 1024)`.
        what: String,
    },

    /// The cluster is not in a state to carry the request out (no datanode to place a
    /// region on, a datanode refused a region); nothing of it was kept.
    #[error("failed precondition: {message}")]
    FailedPrecondition {
        /// What is missing or what refused.
        message: String,
    },

    /// A read or watch asked for a revision whose history was compacted away.
    #[error("required revision {requested} has been compacted (compacted revision {compacted})")]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// The store's compacted revision: the oldest revision still readable.
        compacted: i64,
    },

    /// A read or compaction named a revision the store has not reached.
    #[error("required revision {requested} is a future revision (current revision {current})")]
    FutureRevision {
        /// The revision asked for.
        requested: i64,
        /// The store's current revision.
        current: i64,
    },

    /// A request named a lease that does not exist (never granted, revoked, expired).
    #[error("lease {id} not found")]
    LeaseNotFound {
        /// The lease named.
        id: i64,
    },

    /// A blocking storage task panicked or was cancelled.
    #[error("storage task failed: {0}")]
    TaskJoin(String),

    /// A membership change was refused by one of the rules [`MembershipRefusal`] names;
    /// nothing was proposed.
    #[error("membership change refused: {message}")]
    MembershipRefused {
        /// Which rule refused it (adapters answer with their own texts by it).
        refusal: MembershipRefusal,
        /// What was refused and what to do instead.
        message: String,
    },

    /// An auth change or check was refused (see [`crate::auth`]).
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
}

/// The rule that refused a membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipRefusal {
    /// Another change is still being applied.
    Busy,
    /// The member to add exists already (or the id is not valid).
    Exists,
    /// The member to promote is not a learner.
    NotLearner,
    /// No such member.
    Unknown,
    /// The member to remove leads; leadership must move first.
    Leader,
    /// The member to remove is the last voter.
    LastVoter,
    /// The learner to promote has not caught up with the leader's log.
    LearnerBehind,
}

impl Error {
    /// Builds an [`Error::MembershipRefused`].
    pub fn membership(refusal: MembershipRefusal, message: impl Into<String>) -> Self {
        Error::MembershipRefused {
            refusal,
            message: message.into(),
        }
    }

    /// Builds an [`Error::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            message: message.into(),
        }
    }

    /// A copy of a storage error for each writer of a group that failed together.
    /// Storage errors and unknown outcomes are shared that way; anything else becomes its
    /// message.
    pub(crate) fn clone_for_group(&self) -> Self {
        match self {
            Error::Storage { context, source } => Error::Storage {
                context: context.clone(),
                source: source.clone(),
            },
            Error::OutcomeUnknown { message } => Error::OutcomeUnknown {
                message: message.clone(),
            },
            other => Error::TaskJoin(other.to_string()),
        }
    }

    /// True when the same request may succeed if sent again later and nothing of it was
    /// applied, so sending it again cannot apply it twice (the client and the procedure
    /// manager use this hint). An [`Error::OutcomeUnknown`] is not: see
    /// [`Error::is_outcome_unknown`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::NotLeader { .. })
    }

    /// True when a write may or may not have been applied: an idempotent write (a put of
    /// a fixed value) may be sent again; any other needs a client session.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::OutcomeUnknown { .. })
    }

    /// The error a failed procedure's recorded error text stands for.
    ///
    /// The procedure framework records `{cause}` (no rollback), `{cause} (rolled back)`
    /// or `{cause}; rollback failed: ...`, where a cause of retries run out starts with
    /// `retryable: `. Read back: a rollback that failed, a save that failed, or retries
    /// run out on a procedure that did not roll back are an outcome unknown (its
    /// effects may stay, and the next leader may resume it); otherwise the display
    /// forms of [`Error::FailedPrecondition`], [`Error::InvalidArgument`],
    /// [`Error::AlreadyExists`] and [`Error::NotFound`] read back as themselves
    /// (prefixes first: a refusal's text may end in "not found"); anything else is a
    /// [`Error::FailedPrecondition`] carrying the text.
    pub fn from_procedure_error(text: &str) -> Self {
        let unknown = || Error::OutcomeUnknown {
            message: text.to_string(),
        };
        if text.contains("; rollback failed: ") || text.contains("could not be saved after") {
            return unknown();
        }
        let (text, rolled_back) = match text.strip_suffix(" (rolled back)") {
            Some(cause) => (cause, true),
            None => (text, false),
        };
        let text = match text.strip_prefix("retryable: ") {
            Some(cause) if !rolled_back || cause.starts_with("outcome unknown") => {
                return unknown();
            }
            Some(cause) => cause,
            None => text,
        };
        if let Some(message) = text.strip_prefix("failed precondition: ") {
            return Error::FailedPrecondition {
                message: message.to_string(),
            };
        }
        if let Some(message) = text.strip_prefix("invalid argument: ") {
            return Error::invalid_argument(message);
        }
        if let Some(what) = text.strip_suffix(" already exists") {
            return Error::AlreadyExists {
                what: what.to_string(),
            };
        }
        if let Some(what) = text.strip_suffix(" not found") {
            return Error::NotFound {
                what: what.to_string(),
            };
        }
        Error::FailedPrecondition {
            message: text.to_string(),
        }
    }

    /// True for a refusal every member decides alike from the request and the replicated
    /// state (bad input, a compacted or future revision, a missing lease, a missing key
    /// a put keeps the value or lease of): an answer, not a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::InvalidArgument { .. }
                | Error::Compacted { .. }
                | Error::FutureRevision { .. }
                | Error::LeaseNotFound { .. }
                | Error::NotFound { .. }
        )
    }

    /// Reads back the display form of [`Error::Compacted`] or [`Error::FutureRevision`]
    /// (how a remote client gets them from a status message).
    pub fn parse_revision_error(message: &str) -> Option<Error> {
        let rest = message.strip_prefix("required revision ")?;
        let (requested, rest) = rest.split_once(' ')?;
        let requested = requested.parse().ok()?;
        let number = |tail: &str, lead: &str| -> Option<i64> {
            tail.split_once(lead)?.1.strip_suffix(')')?.parse().ok()
        };
        if rest.starts_with("has been compacted") {
            let compacted = number(rest, "(compacted revision ")?;
            return Some(Error::Compacted {
                requested,
                compacted,
            });
        }
        if rest.starts_with("is a future revision") {
            let current = number(rest, "(current revision ")?;
            return Some(Error::FutureRevision { requested, current });
        }
        None
    }

    /// Builds an [`Error::OutcomeUnknown`].
    pub fn outcome_unknown(message: impl Into<String>) -> Self {
        Error::OutcomeUnknown {
            message: message.into(),
        }
    }
}
