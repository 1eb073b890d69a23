//! Watches that outlive the member serving them: [`MetaClient`]'s `watch` (the
//! [`KvBackend`](common_meta::kv::KvBackend) method) opens a `meta.v1.Watch` stream on
//! one member and, when that stream breaks (the member stopped, the connection
//! failed), opens another on the next member, from the revision after the last one it
//! delivered: no gap, no event twice.
//!
//! What it resumes from: the last event's revision + 1, raised by each progress notice
//! (every matching change at or below a notice's revision was delivered); for a watch
//! started "now", one past the revision the first member reported when it created the
//! watcher. A member behind the others waits for that revision (a start revision in the
//! future is allowed). A compacted resume point ends the stream with
//! [`Error::Compacted`], as a local watcher does.

use common_meta::kv::watch::{Control, WatchStream};
use common_meta::kv::{WatchRequest, WatchResponse};
use common_meta::{Error, Result};
use meta_proto::v1 as pb;
use meta_proto::v1::watch_client::WatchClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{MetaClient, jittered};
use crate::status::from_status;

/// Responses queued for the consumer.
const QUEUE: usize = 64;

/// One open server stream.
struct Open {
    index: usize,
    requests: mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<pb::WatchResponse>,
}

/// How an attempt to open a stream ended.
enum Opened {
    Yes(Open),
    /// The server refused the watcher itself: final.
    Refused(Error),
    /// The member could not be reached or failed: try another.
    Failed(String),
}

impl MetaClient {
    /// See the module doc.
    pub(crate) async fn remote_watch(&self, req: WatchRequest) -> Result<WatchStream> {
        common_meta::kv::watch::check_request(&req)?;
        let mut next = req.start_revision;
        let open = self.open_watch(&req, &mut next, true).await?;
        let (out, responses) = mpsc::channel(QUEUE);
        let (control, controls) = mpsc::channel(4);
        let task = Resume {
            client: self.clone(),
            req,
            next,
            out,
            controls,
        };
        tokio::spawn(task.run(open));
        Ok(WatchStream::new(responses, control))
    }

    /// Opens a stream and creates the watcher from `next` (0: now, and `next` becomes
    /// the revision after the one the member reports). Retries other members until
    /// the client's deadline; with `first`, a refusal is returned as the error.
    async fn open_watch(&self, req: &WatchRequest, next: &mut i64, first: bool) -> Result<Open> {
        let started = std::time::Instant::now();
        let mut backoff = self.options().initial_backoff;
        loop {
            match self.try_open(req, next).await {
                Opened::Yes(open) => return Ok(open),
                Opened::Refused(e) => return Err(e),
                Opened::Failed(why) => {
                    if first && started.elapsed() + backoff >= self.options().deadline {
                        return Err(Error::Unavailable {
                            message: format!(
                                "no member of [{}] served the watch within {:?}: {why}",
                                self.endpoints().join(", "),
                                self.options().deadline
                            ),
                        });
                    }
                    tracing::debug!(error = %why, "watch stream failed; trying the next member");
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(self.options().max_backoff);
                }
            }
        }
    }

    async fn try_open(&self, req: &WatchRequest, next: &mut i64) -> Opened {
        let (index, endpoint, channel) = self.current_endpoint();
        let (requests, outbound) = mpsc::channel(4);
        let create = pb::WatchCreateRequest {
            start_revision: *next,
            ..req.clone().into()
        };
        let sent = requests
            .send(pb::WatchRequest {
                request: Some(pb::watch_request::Request::Create(create)),
            })
            .await;
        if sent.is_err() {
            return Opened::Failed("the request queue closed".to_string());
        }
        let failed = |why: String| {
            self.skip_endpoint(index);
            Opened::Failed(format!("{endpoint}: {why}"))
        };
        let mut responses = match WatchClient::new(channel)
            .watch(ReceiverStream::new(outbound))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return failed(status.message().to_string()),
        };
        let created = match responses.message().await {
            Ok(Some(created)) => created,
            Ok(None) => return failed("the stream ended before the watcher was created".into()),
            Err(status) => return failed(status.message().to_string()),
        };
        if created.canceled {
            if created.compact_revision > 0 {
                return Opened::Refused(Error::Compacted {
                    requested: *next,
                    compacted: created.compact_revision,
                });
            }
            return Opened::Refused(Error::invalid_argument(created.cancel_reason));
        }
        if *next == 0 {
            *next = created.header.map_or(0, |h| h.revision) + 1;
        }
        Opened::Yes(Open {
            index,
            requests,
            responses,
        })
    }
}

/// The task behind a remote [`WatchStream`]. It holds the client: a watch keeps
/// working after the caller drops its handle, until the stream itself is dropped.
struct Resume {
    client: MetaClient,
    req: WatchRequest,
    next: i64,
    out: mpsc::Sender<Result<WatchResponse>>,
    controls: mpsc::Receiver<Control>,
}

impl Resume {
    async fn run(mut self, mut open: Open) {
        loop {
            let why = match self.serve(&mut open).await {
                Ok(()) => return,
                Err(Some(why)) => why,
                Err(None) => return,
            };
            tracing::info!(error = %why, next = self.next, "watch stream broke; resuming on another member");
            self.client.skip_endpoint(open.index);
            let client = self.client.clone();
            let reopened = tokio::select! {
                reopened = client.open_watch(&self.req, &mut self.next, false) => reopened,
                () = self.out.closed() => return,
            };
            match reopened {
                Ok(fresh) => open = fresh,
                Err(e) => {
                    let _ = self.out.send(Err(e)).await;
                    return;
                }
            }
        }
    }

    /// Relays one stream until it breaks (`Err(Some(why))`), the watcher ends for good
    /// (`Err(None)`, after the final error went out) or the consumer leaves (`Ok`).
    async fn serve(&mut self, open: &mut Open) -> std::result::Result<(), Option<String>> {
        loop {
            let message = tokio::select! {
                message = open.responses.message() => message,
                control = self.controls.recv() => {
                    match control {
                        Some(Control::Progress) => {
                            let _ = open.requests.send(pb::WatchRequest {
                                request: Some(pb::watch_request::Request::Progress(
                                    pb::WatchProgressRequest {},
                                )),
                            }).await;
                            continue;
                        }
                        None => return Ok(()),
                    }
                }
                () = self.out.closed() => return Ok(()),
            };
            let message = match message {
                Ok(Some(message)) => message,
                Ok(None) => return Err(Some("the member ended the stream".to_string())),
                Err(status) => return Err(Some(from_status(&status).to_string())),
            };
            let revision = message.header.as_ref().map_or(0, |h| h.revision);
            if message.canceled {
                let error = if message.compact_revision > 0 {
                    Error::Compacted {
                        requested: self.next,
                        compacted: message.compact_revision,
                    }
                } else {
                    // The server gave up on this watcher (it fell too far behind, or the
                    // member is stopping): resume elsewhere rather than end.
                    return Err(Some(message.cancel_reason));
                };
                let _ = self.out.send(Err(error)).await;
                return Err(None);
            }
            let response = if message.events.is_empty() {
                self.next = self.next.max(revision + 1);
                WatchResponse::Progress {
                    revision,
                    requested: message.watch_id == -1,
                }
            } else {
                let events: Vec<_> = message.events.into_iter().map(Into::into).collect();
                let last = events
                    .iter()
                    .map(|e: &common_meta::kv::Event| e.kv.mod_revision)
                    .max()
                    .unwrap_or(revision);
                self.next = self.next.max(last + 1);
                WatchResponse::Events { revision, events }
            };
            if self.out.send(Ok(response)).await.is_err() {
                return Ok(());
            }
        }
    }
}
