//! Maps a gRPC status from the server back to a `common_meta::Error` (the inverse of
//! `meta_srv::error::to_status`).

use common_meta::Error;
use tonic::{Code, Status};

/// The error a caller sees for `status`.
pub fn from_status(status: &Status) -> Error {
    let message = status.message().to_string();
    match status.code() {
        Code::InvalidArgument => Error::InvalidArgument { message },
        Code::Unavailable | Code::DeadlineExceeded => Error::Unavailable { message },
        Code::Unauthenticated => Error::Unauthenticated { message },
        Code::NotFound => Error::Remote {
            code: "NotFound".to_string(),
            message,
        },
        code => Error::Remote {
            code: format!("{code:?}"),
            message,
        },
    }
}

/// True when another endpoint (or a later attempt) may succeed.
pub fn is_retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable)
}
