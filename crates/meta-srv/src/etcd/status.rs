//! etcd's errors: the gRPC code and the exact text of each, because etcd's clients
//! recognise an error by its text (they map it back to their own error values), and
//! the translation of the core's errors into them.

use common_meta::auth::AuthError;
use tonic::{Code, Status};

/// An etcd error: its code and its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdError {
    code: Code,
    text: &'static str,
}

impl EtcdError {
    /// The gRPC status etcd answers with.
    pub fn status(self) -> Status {
        Status::new(self.code, self.text)
    }

    /// The error's text, as clients match it.
    pub fn text(self) -> &'static str {
        self.text
    }
}

macro_rules! etcd_errors {
    ($($name:ident = $code:ident, $text:literal;)*) => {
        $(
            #[doc = concat!("`", $text, "`")]
            pub const $name: EtcdError = EtcdError { code: Code::$code, text: $text };
        )*
    };
}

etcd_errors! {
    EMPTY_KEY = InvalidArgument, "etcdserver: key is not provided";
    KEY_NOT_FOUND = InvalidArgument, "etcdserver: key not found";
    VALUE_PROVIDED = InvalidArgument, "etcdserver: value is provided";
    LEASE_PROVIDED = InvalidArgument, "etcdserver: lease is provided";
    TOO_MANY_OPS = InvalidArgument, "etcdserver: too many operations in txn request";
    DUPLICATE_KEY = InvalidArgument, "etcdserver: duplicate key given in txn request";
    COMPACTED = OutOfRange, "etcdserver: mvcc: required revision has been compacted";
    FUTURE_REV = OutOfRange, "etcdserver: mvcc: required revision is a future revision";
    LEASE_NOT_FOUND = NotFound, "etcdserver: requested lease not found";
    LEASE_EXIST = FailedPrecondition, "etcdserver: lease already exists";
    LEASE_TTL_TOO_LARGE = OutOfRange, "etcdserver: too large lease TTL";
    MEMBER_NOT_FOUND = NotFound, "etcdserver: member not found";
    MEMBER_NOT_LEARNER = FailedPrecondition, "etcdserver: can only promote a learner member";
    LEARNER_NOT_READY = FailedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader";
    MEMBER_EXISTS = FailedPrecondition, "etcdserver: member ID already exist";
    MEMBER_BAD_URLS = InvalidArgument, "etcdserver: given member URLs are invalid";
    REQUEST_TOO_LARGE = InvalidArgument, "etcdserver: request is too large";
    TOO_MANY_REQUESTS = ResourceExhausted, "etcdserver: too many requests";
    AUTH_NOT_ENABLED = FailedPrecondition, "etcdserver: authentication is not enabled";
    ROOT_USER_NOT_EXIST = FailedPrecondition, "etcdserver: root user does not exist";
    ROOT_ROLE_NOT_EXIST = FailedPrecondition, "etcdserver: root user does not have root role";
    USER_ALREADY_EXIST = FailedPrecondition, "etcdserver: user name already exists";
    USER_EMPTY = InvalidArgument, "etcdserver: user name is empty";
    USER_NOT_FOUND = FailedPrecondition, "etcdserver: user name not found";
    ROLE_ALREADY_EXIST = FailedPrecondition, "etcdserver: role name already exists";
    ROLE_NOT_FOUND = FailedPrecondition, "etcdserver: role name not found";
    ROLE_EMPTY = InvalidArgument, "etcdserver: role name is empty";
    AUTH_FAILED = InvalidArgument, "etcdserver: authentication failed, invalid user ID or password";
    PERMISSION_DENIED = PermissionDenied, "etcdserver: permission denied";
    ROLE_NOT_GRANTED = FailedPrecondition, "etcdserver: role is not granted to the user";
    PERMISSION_NOT_GRANTED = FailedPrecondition, "etcdserver: permission is not granted to the role";
    INVALID_AUTH_TOKEN = Unauthenticated, "etcdserver: invalid auth token";
    INVALID_AUTH_MGMT = InvalidArgument, "etcdserver: invalid auth management";
    NO_LEADER = Unavailable, "etcdserver: no leader";
    NOT_LEADER = FailedPrecondition, "etcdserver: not leader";
    LEADER_CHANGED = Unavailable, "etcdserver: leader changed";
    STOPPED = Unavailable, "etcdserver: server stopped";
    TIMEOUT = Unavailable, "etcdserver: request timed out";
    BAD_LEADER_TRANSFEREE = FailedPrecondition, "etcdserver: bad leader transferee";
}

/// The etcd status for an error of the core. Errors etcd has a text for get that
/// text; the others keep ours, under etcd's `etcdserver: ` prefix.
pub fn status(err: common_meta::Error) -> Status {
    use common_meta::Error as E;
    match err {
        E::Compacted { .. } => COMPACTED.status(),
        E::FutureRevision { .. } => FUTURE_REV.status(),
        E::LeaseNotFound { .. } => LEASE_NOT_FOUND.status(),
        // In the KV API only a put that keeps a missing key's value or lease.
        E::NotFound { .. } => KEY_NOT_FOUND.status(),
        E::AlreadyExists { .. } => LEASE_EXIST.status(),
        E::NotLeader { leader: None } => NO_LEADER.status(),
        E::NotLeader { leader: Some(_) } => NOT_LEADER.status(),
        E::OutcomeUnknown { message } if message.contains("leadership moved") => {
            LEADER_CHANGED.status()
        }
        E::OutcomeUnknown { .. } => TIMEOUT.status(),
        E::Unavailable { message } if message.contains("stopped") => STOPPED.status(),
        E::Unavailable { message } if message.contains("overloaded") => TOO_MANY_REQUESTS.status(),
        E::Unavailable { .. } => TIMEOUT.status(),
        E::InvalidArgument { message } => {
            Status::invalid_argument(format!("etcdserver: {message}"))
        }
        E::FailedPrecondition { message } => {
            Status::failed_precondition(format!("etcdserver: {message}"))
        }
        E::Unauthenticated { message } => Status::unauthenticated(format!("etcdserver: {message}")),
        E::MembershipRefused { message, .. } => {
            Status::failed_precondition(format!("etcdserver: {message}"))
        }
        E::Auth(e) => auth_status(&e),
        e => {
            tracing::error!(error = %e, "etcd request failed");
            Status::internal(format!("etcdserver: {e}"))
        }
    }
}

/// The etcd status of an auth refusal: etcd's text, which its clients match on (a
/// client authenticates again on "invalid auth token").
pub fn auth_status(err: &AuthError) -> Status {
    let known = match err {
        AuthError::RootUserMissing => ROOT_USER_NOT_EXIST,
        AuthError::RootRoleMissing => ROOT_ROLE_NOT_EXIST,
        AuthError::UserExists(_) => USER_ALREADY_EXIST,
        AuthError::UserEmpty => USER_EMPTY,
        AuthError::UserNotFound(_) => USER_NOT_FOUND,
        AuthError::RoleExists(_) => ROLE_ALREADY_EXIST,
        AuthError::RoleNotFound(_) => ROLE_NOT_FOUND,
        AuthError::RoleEmpty => ROLE_EMPTY,
        AuthError::Failed => AUTH_FAILED,
        AuthError::PermissionDenied => PERMISSION_DENIED,
        AuthError::RoleNotGranted { .. } => ROLE_NOT_GRANTED,
        AuthError::PermissionNotGranted(_) => PERMISSION_NOT_GRANTED,
        AuthError::NotEnabled => AUTH_NOT_ENABLED,
        AuthError::InvalidToken(_) => INVALID_AUTH_TOKEN,
        AuthError::InvalidManagement(_) => INVALID_AUTH_MGMT,
        AuthError::Invalid(message) => {
            return Status::invalid_argument(format!("etcdserver: {message}"));
        }
    };
    known.status()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_errors_get_etcds_texts() {
        let cases = [
            (
                common_meta::Error::Compacted {
                    requested: 1,
                    compacted: 5,
                },
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted",
            ),
            (
                common_meta::Error::FutureRevision {
                    requested: 9,
                    current: 5,
                },
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision",
            ),
            (
                common_meta::Error::LeaseNotFound { id: 7 },
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                common_meta::Error::NotLeader { leader: None },
                Code::Unavailable,
                "etcdserver: no leader",
            ),
            (
                common_meta::Error::outcome_unknown(
                    "leadership moved to member 2 after the write was proposed",
                ),
                Code::Unavailable,
                "etcdserver: leader changed",
            ),
            (
                common_meta::Error::outcome_unknown("no answer within 5s (no quorum?)"),
                Code::Unavailable,
                "etcdserver: request timed out",
            ),
        ];
        for (err, code, text) in cases {
            let status = status(err);
            assert_eq!((status.code(), status.message()), (code, text));
        }
    }
}
