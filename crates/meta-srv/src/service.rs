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
