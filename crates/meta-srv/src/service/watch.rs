//! The `meta.v1.Watch` service: one bidirectional stream carries many watchers, each a
//! [`WatchStream`] on this member's own applied state (any member serves watches).
//!
//! Per stream: requests are read in order; a create is answered `created` first (then
//! cancelled at once, in band, if it cannot run: a bad range, a compacted start); each
//! watcher has a forwarding task that moves its responses to the stream's one outbound
//! queue, tagged with its id; a cancel stops that task (an unknown id is ignored); a
//! progress request asks every watcher and answers once, `watch_id = -1`, with the
//! lowest revision they all reached (each watcher's own answer follows its events, so
//! the combined one does too).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use common_meta::kv::watch::WatchControl;
use common_meta::kv::{KvBackend, WatchResponse, WatchStream};
use common_meta::rpc;
use meta_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::raft::backend::RaftKvBackend;

/// Responses a stream may have queued for its client.
const OUTBOUND_QUEUE: usize = 128;

/// Serves watches of one member.
pub struct WatchService {
    backend: RaftKvBackend,
    member_id: u64,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl WatchService {
    /// Watches over `backend`'s state machine, answering as `member_id`; `stop` ends
    /// every stream (with UNAVAILABLE, so clients resume elsewhere) when the member
    /// stops.
    pub fn new(
        backend: RaftKvBackend,
        member_id: u64,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        WatchService {
            backend,
            member_id,
            stop,
        }
    }
}

/// A combined progress request in flight: the watchers yet to answer and the lowest
/// revision so far.
#[derive(Default)]
struct Round {
    waiting: HashSet<i64>,
    lowest: Option<i64>,
}

/// The shared state of one stream.
struct Stream {
    member_id: u64,
    out: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    round: Mutex<Option<Round>>,
}

impl Stream {
    fn response(&self, watch_id: i64, revision: i64) -> pb::WatchResponse {
        pb::WatchResponse {
            header: rpc::header(self.member_id, revision),
            watch_id,
            ..Default::default()
        }
    }

    async fn send(&self, response: pb::WatchResponse) -> bool {
        match self.out.try_send(Ok(response)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(response)) => self.out.send(response).await.is_ok(),
        }
    }

    /// Records a watcher's progress answer; sends the combined one when it was the last.
    async fn answered(&self, watch_id: i64, revision: Option<i64>) {
        let done = {
            let mut round = self.round.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(current) = round.as_mut() else {
                return;
            };
            if !current.waiting.remove(&watch_id) {
                return;
            }
            if let Some(revision) = revision {
                current.lowest = Some(current.lowest.map_or(revision, |l| l.min(revision)));
            }
            if current.waiting.is_empty() {
                round.take().and_then(|r| r.lowest)
            } else {
                None
            }
        };
        if let Some(revision) = done {
            self.send(self.response(-1, revision)).await;
        }
    }
}

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = ReceiverStream<Result<pb::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut requests = request.into_inner();
        let (out, outbound) = mpsc::channel(OUTBOUND_QUEUE);
        let stream = Arc::new(Stream {
            member_id: self.member_id,
            out,
            round: Mutex::new(None),
        });
        let backend = self.backend.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut watchers: HashMap<i64, (JoinHandle<()>, WatchControl)> = HashMap::new();
            let mut next_id = 0i64;
            loop {
                let request = tokio::select! {
                    request = requests.message() => request,
                    () = stream.out.closed() => break,
                    // A graceful stop waits for open streams: end them.
                    stopping = stop.wait_for(|stopping| *stopping) => {
                        drop(stopping);
                        let _ = stream
                            .out
                            .try_send(Err(Status::unavailable("the member is stopping")));
                        break;
                    }
                };
                let request = match request {
                    Ok(Some(request)) => request,
                    // The client closed its side or the connection failed.
                    Ok(None) | Err(_) => break,
                };
                watchers.retain(|_, (task, _)| !task.is_finished());
                match request.request {
                    Some(pb::watch_request::Request::Create(create)) => {
                        let id = if create.watch_id != 0 {
                            if create.watch_id < 0 || watchers.contains_key(&create.watch_id) {
                                let mut refused =
                                    stream.response(create.watch_id, backend.local_revision());
                                refused.created = true;
                                refused.canceled = true;
                                refused.cancel_reason = format!(
                                    "watch id {} is {}",
                                    create.watch_id,
                                    if create.watch_id < 0 {
                                        "negative"
                                    } else {
                                        "in use on this stream"
                                    }
                                );
                                stream.send(refused).await;
                                continue;
                            }
                            create.watch_id
                        } else {
                            while watchers.contains_key(&next_id) {
                                next_id += 1;
                            }
                            next_id
                        };
                        let mut created = stream.response(id, backend.local_revision());
                        created.created = true;
                        match backend.watch(create.into()).await {
                            Ok(watcher) => {
                                if !stream.send(created).await {
                                    break;
                                }
                                let control = watcher.controller();
                                let task = tokio::spawn(forward(stream.clone(), id, watcher));
                                watchers.insert(id, (task, control));
                            }
                            Err(e) => {
                                created.canceled = true;
                                if let common_meta::Error::Compacted { compacted, .. } = &e {
                                    created.compact_revision = *compacted;
                                }
                                created.cancel_reason = e.to_string();
                                stream.send(created).await;
                            }
                        }
                    }
                    Some(pb::watch_request::Request::Cancel(cancel)) => {
                        // An unknown id is ignored, as etcd does.
                        if let Some((task, _)) = watchers.remove(&cancel.watch_id) {
                            task.abort();
                            stream.answered(cancel.watch_id, None).await;
                            let mut canceled =
                                stream.response(cancel.watch_id, backend.local_revision());
                            canceled.canceled = true;
                            stream.send(canceled).await;
                        }
                    }
                    Some(pb::watch_request::Request::Progress(_)) => {
                        if watchers.is_empty() {
                            stream
                                .send(stream.response(-1, backend.local_revision()))
                                .await;
                            continue;
                        }
                        let fresh = {
                            let mut round =
                                stream.round.lock().unwrap_or_else(PoisonError::into_inner);
                            if round.is_some() {
                                // One in flight already answers this request too.
                                false
                            } else {
                                *round = Some(Round {
                                    waiting: watchers.keys().copied().collect(),
                                    lowest: None,
                                });
                                true
                            }
                        };
                        if fresh {
                            for (_, watcher) in watchers.values() {
                                // A watcher that has ended answers nothing: its task
                                // clears it from the round as it ends.
                                let _ = watcher.progress().await;
                            }
                        }
                    }
                    None => {}
                }
            }
            for (task, _) in watchers.into_values() {
                task.abort();
            }
        });
        Ok(Response::new(ReceiverStream::new(outbound)))
    }
}

/// Moves one watcher's responses to the stream, tagged with its id, until it ends.
async fn forward(stream: Arc<Stream>, id: i64, mut watcher: WatchStream) {
    while let Some(response) = watcher.next().await {
        let message = match response {
            Ok(WatchResponse::Events { revision, events }) => {
                let mut message = stream.response(id, revision);
                message.events = events.into_iter().map(Into::into).collect();
                message
            }
            Ok(WatchResponse::Progress {
                revision,
                requested: true,
            }) => {
                stream.answered(id, Some(revision)).await;
                continue;
            }
            Ok(WatchResponse::Progress {
                revision,
                requested: false,
            }) => stream.response(id, revision),
            Err(e) => {
                let mut message = stream.response(id, 0);
                message.canceled = true;
                if let common_meta::Error::Compacted { compacted, .. } = &e {
                    message.compact_revision = *compacted;
                }
                message.cancel_reason = e.to_string();
                stream.answered(id, None).await;
                stream.send(message).await;
                return;
            }
        };
        if !stream.send(message).await {
            return;
        }
    }
    stream.answered(id, None).await;
}
