//! gRPC services of `meta.v1`, thin adapters from the wire to the backends.

pub mod cluster;
pub mod ddl;
pub mod heartbeat;
pub mod lease;
pub mod procedure;
pub mod region;
pub mod route;
pub mod store;
pub mod tso;
pub mod watch;

use tokio::sync::{mpsc, watch as signal};
use tonic::{Status, Streaming};

/// Longest request id a client may name a submission with.
const MAX_REQUEST_ID: usize = 128;

/// The procedure id of a submission: `{kind}-{request_id}` (checked: a retry of the
/// same request finds the same procedure), or a fresh one when the client gave none.
pub fn procedure_id(kind: &str, request_id: &str) -> Result<String, Status> {
    if request_id.is_empty() {
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| Status::internal(e.to_string()))?;
        return Ok(format!(
            "{kind}-{}-{:016x}",
            common_meta::time::unix_ms(),
            u64::from_le_bytes(nonce)
        ));
    }
    let fine = request_id.len() <= MAX_REQUEST_ID
        && request_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if !fine {
        return Err(crate::error::to_status(
            common_meta::Error::invalid_argument(format!(
                "request_id must be 1 to {MAX_REQUEST_ID} of A-Z a-z 0-9 . _ : -"
            )),
        ));
    }
    Ok(format!("{kind}-{request_id}"))
}

/// The next message of a client's request stream; `None` once the stream ended or
/// broke, or the member is stopping (a graceful stop waits for open streams, so the
/// stream is ended: `stopping` is sent to `out` first).
pub async fn next_request<T, R>(
    requests: &mut Streaming<T>,
    stop: &mut signal::Receiver<bool>,
    out: &mpsc::Sender<Result<R, Status>>,
    stopping: impl FnOnce() -> Status,
) -> Option<T> {
    tokio::select! {
        request = requests.message() => request.ok().flatten(),
        stopped = stop.wait_for(|s| *s) => {
            drop(stopped);
            let _ = out.try_send(Err(stopping()));
            None
        }
    }
}
