//! The error type of `meta-srv` and its mapping to gRPC status codes.

use std::path::PathBuf;

/// Result of server operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can stop the server or fail a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the data directory's lock.
    #[error(
        "data directory {} is already in use by {owner}; stop it or choose another --data-dir",
        path.display()
    )]
    DataDirLocked {
        /// The directory.
        path: PathBuf,
        /// Who holds it, as far as the lock file tells.
        owner: String,
    },

    /// The data directory was created by another cluster.
    #[error(
        "data directory {} belongs to cluster {stored:016x}, not to this cluster ({expected:016x}); check --initial-cluster and cluster_token, or use an empty --data-dir",
        data_dir.display()
    )]
    WrongCluster {
        /// The directory.
        data_dir: PathBuf,
        /// The cluster id stored in it.
        stored: u64,
        /// This configuration's cluster id.
        expected: u64,
    },

    /// The data directory belongs to another member of this cluster.
    #[error(
        "data directory {} belongs to member {stored}, not to member {expected}; check --node-id",
        data_dir.display()
    )]
    WrongMember {
        /// The directory.
        data_dir: PathBuf,
        /// The member id stored in it.
        stored: u64,
        /// This configuration's member id.
        expected: u64,
    },

    /// The data directory's format cannot be opened by this binary.
    #[error("data directory {} has data format {found}, which is {reason}", path.display())]
    Format {
        /// The directory.
        path: PathBuf,
        /// The format found (0 when unreadable).
        found: u32,
        /// Why it cannot be opened.
        reason: String,
    },

    /// A backup file cannot be restored (damaged, not ours, or the target is wrong).
    #[error("cannot restore {}: {reason}", path.display())]
    Backup {
        /// The backup file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// Joining an existing cluster failed.
    #[error("cannot join the cluster at {endpoints}: {reason}")]
    Join {
        /// The endpoints given with --join.
        endpoints: String,
        /// Why.
        reason: String,
    },

    /// A listener could not be bound.
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        /// Which service (gRPC or HTTP).
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },

    /// A file system operation failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },

    /// The metadata layer failed.
    #[error(transparent)]
    Meta(#[from] common_meta::Error),

    /// The raft member failed (a storage error, an fsync failure, a panic) and the
    /// server stopped rather than answer from state it cannot trust or persist.
    #[error(
        "the member failed and stopped: {reason}; check the data directory's disk, then restart"
    )]
    Failed {
        /// What failed.
        reason: String,
    },

    /// A server task failed.
    #[error("{what} server failed: {message}")]
    Serve {
        /// Which server.
        what: &'static str,
        /// Why.
        message: String,
    },
}

/// Maps a `common-meta` error to the gRPC status a client sees. What became of a write
/// travels in the `x-metasrv-outcome` metadata of every error (see `store.proto`):
/// `not-applied` for refusals and not-leader/unavailable answers (nothing was proposed,
/// or it was refused), `unknown` for an outcome unknown (DEADLINE_EXCEEDED, as gRPC
/// defines it: the operation may have completed) and for this member's own failures
/// (INTERNAL), `session-expired` for a write in a session that is not open
/// (FAILED_PRECONDITION).
pub fn to_status(err: common_meta::Error) -> tonic::Status {
    use common_meta::Error as E;
    use meta_proto::{OUTCOME_NOT_APPLIED, OUTCOME_SESSION_EXPIRED, OUTCOME_UNKNOWN};
    // Every answer says what became of the write, so a client never has to guess from
    // the code: a status without the marker came from the connection, not from here.
    let (mut status, outcome) = match err {
        E::InvalidArgument { message } => (
            tonic::Status::invalid_argument(message),
            OUTCOME_NOT_APPLIED,
        ),
        e @ (E::KeyDecode { .. } | E::InvalidName { .. }) => (
            tonic::Status::invalid_argument(e.to_string()),
            OUTCOME_NOT_APPLIED,
        ),
        E::Unavailable { message } => (tonic::Status::unavailable(message), OUTCOME_NOT_APPLIED),
        e @ (E::Compacted { .. } | E::FutureRevision { .. }) => (
            tonic::Status::out_of_range(e.to_string()),
            OUTCOME_NOT_APPLIED,
        ),
        e @ (E::NotFound { .. } | E::LeaseNotFound { .. }) => {
            (tonic::Status::not_found(e.to_string()), OUTCOME_NOT_APPLIED)
        }
        e @ E::AlreadyExists { .. } => (
            tonic::Status::already_exists(e.to_string()),
            OUTCOME_NOT_APPLIED,
        ),
        E::FailedPrecondition { message } => (
            tonic::Status::failed_precondition(message),
            OUTCOME_NOT_APPLIED,
        ),
        E::MembershipRefused { refusal, message } => {
            use common_meta::error::MembershipRefusal as R;
            let message = format!("membership change refused: {message}");
            let status = match refusal {
                R::Busy | R::Exists | R::Leader | R::LastVoter | R::LearnerBehind => {
                    tonic::Status::failed_precondition(message)
                }
                R::NotLearner | R::Unknown => tonic::Status::invalid_argument(message),
            };
            (status, OUTCOME_NOT_APPLIED)
        }
        E::Unauthenticated { message } => {
            (tonic::Status::unauthenticated(message), OUTCOME_NOT_APPLIED)
        }
        E::Auth(e) => (crate::auth::status(&e), OUTCOME_NOT_APPLIED),
        e @ E::NotLeader { .. } => (
            tonic::Status::unavailable(e.to_string()),
            OUTCOME_NOT_APPLIED,
        ),
        e @ E::OutcomeUnknown { .. } => (
            tonic::Status::deadline_exceeded(e.to_string()),
            OUTCOME_UNKNOWN,
        ),
        e @ E::SessionExpired { .. } => (
            tonic::Status::failed_precondition(e.to_string()),
            OUTCOME_SESSION_EXPIRED,
        ),
        // A failure of this member while serving: what it did to a write is not known.
        e @ (E::Storage { .. }
        | E::Io { .. }
        | E::Corrupted { .. }
        | E::TaskJoin(_)
        | E::Remote { .. }) => {
            tracing::error!(error = %e, "request failed");
            (tonic::Status::internal(e.to_string()), OUTCOME_UNKNOWN)
        }
    };
    status.metadata_mut().insert(
        meta_proto::OUTCOME,
        tonic::metadata::MetadataValue::from_static(outcome),
    );
    status
}

/// Like [`to_status`], but a not-leader answer names the leader's address in the
/// `x-metasrv-leader` metadata (`meta_proto::LEADER_HINT`), so clients go there directly.
pub fn to_status_with_hint(
    err: common_meta::Error,
    members: &crate::raft::members::Members,
) -> tonic::Status {
    let hint = match &err {
        common_meta::Error::NotLeader { leader: Some(id) } => members.addr(*id),
        _ => None,
    };
    let mut status = to_status(err);
    if let Some(addr) = hint.and_then(|a| a.parse().ok()) {
        status.metadata_mut().insert(meta_proto::LEADER_HINT, addr);
    }
    status
}

/// The status a service of member `me` answers `err` with: a not-leader answer that
/// knows no leader (the backend's or oracle's view) asks the driver whom it follows,
/// so the client gets the leader's address; anything else as [`to_status_with_hint`].
pub async fn refusal(
    err: common_meta::Error,
    driver: &crate::raft::driver::DriverHandle,
    members: &crate::raft::members::Members,
    me: u64,
) -> tonic::Status {
    if let common_meta::Error::NotLeader { leader: None } = err {
        return not_leader(driver, members, me).await;
    }
    to_status_with_hint(err, members)
}

/// The not-leader status member `me` answers with, naming the leader it knows (if
/// any) in the `x-metasrv-leader` metadata.
pub async fn not_leader(
    driver: &crate::raft::driver::DriverHandle,
    members: &crate::raft::members::Members,
    me: u64,
) -> tonic::Status {
    let leader = driver
        .status()
        .await
        .ok()
        .map(|s| s.leader_id)
        .filter(|l| *l != 0 && *l != me);
    to_status_with_hint(common_meta::Error::NotLeader { leader }, members)
}
