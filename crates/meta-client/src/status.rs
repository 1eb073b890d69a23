//! Maps a gRPC status from the server back to a `common_meta::Error` (the inverse of
//! `meta_srv::error::to_status`), and tells what a failed request may have done.

use common_meta::Error;
use meta_proto::{OUTCOME, OUTCOME_NOT_APPLIED, OUTCOME_SESSION_EXPIRED, OUTCOME_UNKNOWN};
use tonic::{Code, Status};

/// The error a caller sees for `status`.
pub fn from_status(status: &Status) -> Error {
    let message = status.message().to_string();
    match (status.code(), marker(status)) {
        (_, Some(OUTCOME_UNKNOWN)) => Error::OutcomeUnknown {
            message: message
                .strip_prefix("outcome unknown: ")
                .unwrap_or(&message)
                .to_string(),
        },
        (_, Some(OUTCOME_SESSION_EXPIRED)) => Error::SessionExpired {
            id: session_of(&message).unwrap_or(0),
        },
        (Code::InvalidArgument, _) => Error::InvalidArgument { message },
        (Code::Unavailable | Code::DeadlineExceeded, _) => Error::Unavailable { message },
        (Code::Unauthenticated, _) => Error::Unauthenticated { message },
        (Code::NotFound, _) if lease_of(&message).is_some() => Error::LeaseNotFound {
            id: lease_of(&message).unwrap_or(0),
        },
        (Code::NotFound, _) => Error::NotFound {
            what: message
                .strip_suffix(" not found")
                .unwrap_or(&message)
                .to_string(),
        },
        (Code::AlreadyExists, _) => Error::AlreadyExists {
            what: message
                .strip_suffix(" already exists")
                .unwrap_or(&message)
                .to_string(),
        },
        (Code::FailedPrecondition, _) => Error::FailedPrecondition { message },
        (Code::OutOfRange, _) => Error::parse_revision_error(&message).unwrap_or(Error::Remote {
            code: "OutOfRange".to_string(),
            message,
        }),
        (code, _) => Error::Remote {
            code: format!("{code:?}"),
            message,
        },
    }
}

/// The lease of a "lease N not found" message.
fn lease_of(message: &str) -> Option<i64> {
    message
        .strip_prefix("lease ")?
        .strip_suffix(" not found")?
        .parse()
        .ok()
}

/// What a failed request may have done, by its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The server said nothing was applied: send it again, anywhere.
    NotApplied,
    /// It may have been applied (the server said so, or the failure came from the
    /// connection after the request may have left): only a session makes a retry safe.
    Unknown,
    /// A definite answer of the server that sending again would not change (invalid
    /// argument, session expired).
    Final,
}

/// Classifies a failed request's status: by the server's marker when there is one
/// (every KV answer has it). Without it, a definite answer of a service (not found,
/// invalid argument, a failed precondition) is final, and anything the connection can
/// produce (refused, reset, timed out on the client, an internal error of a proxy or of
/// HTTP/2) may have happened after the request left: unknown.
pub(crate) fn outcome_of(status: &Status) -> Outcome {
    match marker(status) {
        Some(OUTCOME_NOT_APPLIED) if status.code() == Code::Unavailable => Outcome::NotApplied,
        Some(OUTCOME_UNKNOWN) => Outcome::Unknown,
        Some(_) => Outcome::Final,
        None => match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
            | Code::DataLoss
            | Code::ResourceExhausted => Outcome::Unknown,
            _ => Outcome::Final,
        },
    }
}

fn marker(status: &Status) -> Option<&str> {
    status.metadata().get(OUTCOME).and_then(|v| v.to_str().ok())
}

/// The session id in a "session N is not open" message.
fn session_of(message: &str) -> Option<u64> {
    message
        .strip_prefix("session ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(code: Code, message: &str, outcome: &'static str) -> Status {
        let mut status = Status::new(code, message);
        status.metadata_mut().insert(
            OUTCOME,
            tonic::metadata::MetadataValue::from_static(outcome),
        );
        status
    }

    #[test]
    fn outcomes_follow_the_server_marker_then_the_code() {
        let cases = [
            (
                marked(Code::Unavailable, "not leader", OUTCOME_NOT_APPLIED),
                Outcome::NotApplied,
            ),
            (
                marked(
                    Code::DeadlineExceeded,
                    "outcome unknown: x",
                    OUTCOME_UNKNOWN,
                ),
                Outcome::Unknown,
            ),
            (
                marked(
                    Code::FailedPrecondition,
                    "session 7 is not open",
                    OUTCOME_SESSION_EXPIRED,
                ),
                Outcome::Final,
            ),
            (
                marked(Code::InvalidArgument, "bad", OUTCOME_NOT_APPLIED),
                Outcome::Final,
            ),
            (Status::unavailable("tcp connect error"), Outcome::Unknown),
            (Status::cancelled("Timeout expired"), Outcome::Unknown),
            (
                Status::internal("h2 protocol error: stream reset"),
                Outcome::Unknown,
            ),
        ];
        for (status, outcome) in cases {
            assert_eq!(outcome_of(&status), outcome, "{status:?}");
        }
    }

    #[test]
    fn errors_keep_what_the_server_said() {
        let err = from_status(&marked(
            Code::DeadlineExceeded,
            "outcome unknown: leadership moved",
            OUTCOME_UNKNOWN,
        ));
        assert!(err.is_outcome_unknown(), "{err}");
        assert_eq!(err.to_string(), "outcome unknown: leadership moved");
        let err = from_status(&marked(
            Code::FailedPrecondition,
            "session 42 is not open (expired or closed); the write was not applied",
            OUTCOME_SESSION_EXPIRED,
        ));
        assert!(matches!(err, Error::SessionExpired { id: 42 }), "{err}");
    }
}
