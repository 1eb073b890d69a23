//! Watch streams, whatever their wire: one bidirectional stream carries many watchers,
//! each a [`WatchStream`] on this member's own applied state (any member serves
//! watches). The `meta.v1.Watch` service ([`WatchService`]) and etcd's `Watch`
//! (`etcd/watch.rs`) are two [`Wire`]s over this one engine: a wire turns its requests
//! into [`Incoming`] and [`Outgoing`] into its responses.
//!
//! Per stream, a reader task takes the client's requests in order and turns them into
//! [`Command`]s; the response stream itself ([`Outbound`]) owns the watchers and is
//! polled by the server's connection: it hands out the commands' answers and each
//! watcher's responses, tagged with its id, with no task or queue of its own between a
//! watcher and the connection. A create is answered `created` first (then cancelled at
//! once, in band, if it cannot run: a bad range, a compacted start); a cancel drops the
//! watcher (an unknown id is ignored); a progress request asks every watcher and is
//! answered once, `watch_id = -1`, with the lowest revision they all reached (each
//! watcher's own answer follows its events, so the combined one does too).

use crate::auth::{Caller, Checked};
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use common_meta::kv::watch::WatchControl;
use common_meta::kv::{Event, KvBackend, WatchRequest, WatchResponse, WatchStream};
use common_meta::rpc;
use futures_util::stream::{AbortHandle, Abortable, BoxStream, SelectAll};
use meta_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::raft::backend::RaftKvBackend;

/// A client's request on a watch stream, whatever its wire.
#[derive(Debug)]
pub enum Incoming {
    /// Start a watcher; `watch_id` 0 lets the server choose.
    Create {
        /// The id the client chose, or 0.
        watch_id: i64,
        /// What to watch.
        request: WatchRequest,
        /// Split responses too large for one message (where the wire can).
        fragment: bool,
    },
    /// Stop a watcher (an unknown id is ignored).
    Cancel(i64),
    /// Answer once every watcher reached a revision.
    Progress,
}

/// One message of a watch stream, whatever its wire.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// The watcher it concerns; -1 for the whole stream.
    pub watch_id: i64,
    /// The revision the message is as of.
    pub revision: i64,
    /// The answer to a create.
    pub created: bool,
    /// The watcher ended.
    pub canceled: bool,
    /// Set when a watcher's start revision was compacted: the compacted revision.
    pub compact_revision: i64,
    /// Why the watcher ended, when it did not end on request.
    pub cancel_reason: String,
    /// The changes, whole revisions.
    pub events: Vec<Event>,
}

/// A watch stream's wire: its responses built from [`Outgoing`].
pub trait Wire: Send + Sync + 'static {
    /// A message of the stream on this wire.
    type Response: Send + 'static;

    /// The messages that carry `out` (more than one when the wire splits a large
    /// one).
    fn encode(&self, out: Outgoing, fragment: bool) -> Vec<Self::Response>;
}

/// Serves one watch stream over `backend`: `requests` as they come, the answers in
/// the returned stream; `stop` ends it (UNAVAILABLE, so clients resume elsewhere).
/// Each watcher's range is checked as it is created against the permissions of the
/// stream's user at that moment (`auth`), so a stream outlives no token, user or grant.
pub fn serve<W: Wire>(
    backend: RaftKvBackend,
    auth: StreamAuth,
    wire: Arc<W>,
    requests: BoxStream<'static, Result<Incoming, Status>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Pin<Box<dyn Stream<Item = Result<W::Response, Status>> + Send>> {
    let (commands, queued) = mpsc::channel(COMMAND_QUEUE);
    let live = Arc::new(Mutex::new(HashSet::new()));
    let outbound = Outbound {
        wire,
        commands: queued,
        feeds: SelectAll::new(),
        watchers: HashMap::new(),
        fragmented: HashSet::new(),
        live: live.clone(),
        round: None,
        ready: VecDeque::new(),
        done: false,
    };
    let reader = Reader {
        backend,
        auth,
        commands,
        live,
        next_id: 0,
    };
    tokio::spawn(reader.run(requests, stop));
    Box::pin(outbound)
}

/// What a watch stream decides its caller from at each watcher it creates: the gRPC
/// method and the stream's metadata (its token).
pub struct StreamAuth {
    path: &'static str,
    headers: http::HeaderMap,
}

impl StreamAuth {
    /// The stream of `request` to method `path`.
    pub fn of<T>(path: &'static str, request: &Request<T>) -> Self {
        StreamAuth {
            path,
            headers: request.metadata().clone().into_headers(),
        }
    }

    /// The caller now, by the member's current auth state.
    fn caller(&self, backend: &RaftKvBackend) -> Result<Caller, common_meta::auth::AuthError> {
        crate::auth::decide(
            backend.store().auth(),
            self.path,
            &self.headers,
            common_meta::time::unix_ms(),
        )
    }
}

/// Commands a stream's reader may have queued for its response stream.
const COMMAND_QUEUE: usize = 64;

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

/// What a stream's reader asks of its response stream, in request order.
enum Command {
    /// Send this message.
    Send(Outgoing),
    /// Serve this watcher (its `created` answer went ahead as a [`Command::Send`]);
    /// `true`: split its large responses.
    Add(i64, WatchStream, bool),
    /// Drop this watcher and say so, at the member's `revision`.
    Cancel { id: i64, revision: i64 },
    /// Answer a progress request; `revision` is the member's own when no watcher runs.
    Progress { revision: i64 },
    /// End the stream with this status.
    Fail(Status),
}

/// A watcher's responses tagged with its id, then one [`Fed::Ended`] item when it
/// ends on its own.
struct Feed {
    id: i64,
    watcher: WatchStream,
    ended: bool,
}

enum Fed {
    Response(common_meta::Result<WatchResponse>),
    Ended,
}

impl Stream for Feed {
    type Item = (i64, Fed);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<(i64, Fed)>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.watcher.poll_next(cx) {
            Poll::Ready(Some(response)) => Poll::Ready(Some((self.id, Fed::Response(response)))),
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some((self.id, Fed::Ended)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A combined progress request in flight: the watchers yet to answer and the lowest
/// revision so far.
struct Round {
    waiting: HashSet<i64>,
    lowest: Option<i64>,
}

/// A message of one stream: `watch_id` at `revision`.
fn response(watch_id: i64, revision: i64) -> Outgoing {
    Outgoing {
        watch_id,
        revision,
        ..Default::default()
    }
}

/// One stream's responses (see the module doc).
struct Outbound<W: Wire> {
    wire: Arc<W>,
    commands: mpsc::Receiver<Command>,
    /// Every watcher's feed, polled as it wakes (not scanned: a stream may carry
    /// thousands).
    feeds: SelectAll<Abortable<Feed>>,
    /// The running watchers: how to drop one and how to ask it for progress.
    watchers: HashMap<i64, (AbortHandle, WatchControl)>,
    /// The watchers whose large responses are split.
    fragmented: HashSet<i64>,
    /// The ids of watchers that run, shared with the reader (which allocates them).
    live: Arc<Mutex<HashSet<i64>>>,
    round: Option<Round>,
    ready: VecDeque<Result<W::Response, Status>>,
    /// A failure went out: the stream ends.
    done: bool,
}

impl<W: Wire> Outbound<W> {
    fn response(&self, watch_id: i64, revision: i64) -> Outgoing {
        response(watch_id, revision)
    }

    /// Queues `out` as its wire's messages.
    fn push(&mut self, out: Outgoing) {
        let fragment = self.fragmented.contains(&out.watch_id);
        for message in self.wire.encode(out, fragment) {
            self.ready.push_back(Ok(message));
        }
    }

    fn forget(&mut self, id: i64) {
        self.fragmented.remove(&id);
        if let Some((feed, _)) = self.watchers.remove(&id) {
            // Its feed ends at the next poll, dropping the watcher.
            feed.abort();
        }
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        self.answered(id, None);
    }

    /// Records a watcher's progress answer (`None`: it will give none); queues the
    /// combined one when it was the last.
    fn answered(&mut self, id: i64, revision: Option<i64>) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if !round.waiting.remove(&id) {
            return;
        }
        if let Some(revision) = revision {
            round.lowest = Some(round.lowest.map_or(revision, |l| l.min(revision)));
        }
        if round.waiting.is_empty()
            && let Some(revision) = self.round.take().and_then(|r| r.lowest)
        {
            let combined = self.response(-1, revision);
            self.push(combined);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Send(message) => self.push(message),
            Command::Add(id, watcher, fragment) => {
                if fragment {
                    self.fragmented.insert(id);
                }
                let (handle, registration) = AbortHandle::new_pair();
                self.watchers.insert(id, (handle, watcher.controller()));
                let feed = Feed {
                    id,
                    watcher,
                    ended: false,
                };
                self.feeds.push(Abortable::new(feed, registration));
            }
            Command::Cancel { id, revision } => {
                if self.watchers.contains_key(&id) {
                    self.forget(id);
                    let mut canceled = self.response(id, revision);
                    canceled.canceled = true;
                    self.push(canceled);
                }
            }
            Command::Progress { revision } => {
                if self.watchers.is_empty() {
                    let answer = self.response(-1, revision);
                    self.push(answer);
                } else if self.round.is_none() {
                    // A round in flight answers this request too.
                    let mut waiting = HashSet::new();
                    for (id, (_, control)) in &self.watchers {
                        // A watcher that has ended answers nothing; its end clears it.
                        if control.try_progress().is_ok() {
                            waiting.insert(*id);
                        }
                    }
                    if waiting.is_empty() {
                        let answer = self.response(-1, revision);
                        self.push(answer);
                    } else {
                        self.round = Some(Round {
                            waiting,
                            lowest: None,
                        });
                    }
                }
            }
            Command::Fail(status) => {
                self.ready.push_back(Err(status));
                self.done = true;
            }
        }
    }

    fn fed(&mut self, id: i64, fed: Fed) {
        let message = match fed {
            Fed::Response(Ok(WatchResponse::Events { revision, events })) => Outgoing {
                events,
                ..self.response(id, revision)
            },
            Fed::Response(Ok(WatchResponse::Progress {
                revision,
                requested: true,
            })) => {
                self.answered(id, Some(revision));
                return;
            }
            Fed::Response(Ok(WatchResponse::Progress {
                revision,
                requested: false,
            })) => self.response(id, revision),
            Fed::Response(Err(e)) => {
                let mut message = self.response(id, 0);
                message.canceled = true;
                if let common_meta::Error::Compacted { compacted, .. } = &e {
                    message.compact_revision = *compacted;
                }
                message.cancel_reason = e.to_string();
                self.forget(id);
                message
            }
            Fed::Ended => {
                self.forget(id);
                return;
            }
        };
        self.push(message);
    }
}

// Nothing of an `Outbound` is pinned in place: it is polled through `&mut`.
impl<W: Wire> Unpin for Outbound<W> {}

impl<W: Wire> Stream for Outbound<W> {
    type Item = Result<W::Response, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(message) = this.ready.pop_front() {
                return Poll::Ready(Some(message));
            }
            if this.done {
                return Poll::Ready(None);
            }
            // Commands first: a watcher's `created` answer precedes its events.
            match this.commands.poll_recv(cx) {
                Poll::Ready(Some(command)) => {
                    this.command(command);
                    continue;
                }
                // The reader ended: the client closed its side or the member stops.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            match Pin::new(&mut this.feeds).poll_next(cx) {
                Poll::Ready(Some((id, fed))) => this.fed(id, fed),
                // No watcher: the commands' waker is registered.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// `meta.v1`'s wire: its header names the member.
struct MetaWire {
    member_id: u64,
}

impl Wire for MetaWire {
    type Response = pb::WatchResponse;

    fn encode(&self, out: Outgoing, _fragment: bool) -> Vec<pb::WatchResponse> {
        vec![pb::WatchResponse {
            header: rpc::header(self.member_id, out.revision),
            watch_id: out.watch_id,
            created: out.created,
            canceled: out.canceled,
            compact_revision: out.compact_revision,
            cancel_reason: out.cancel_reason,
            events: out.events.into_iter().map(Into::into).collect(),
        }]
    }
}

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let auth = StreamAuth::of("/meta.v1.Watch/Watch", &request);
        let requests: BoxStream<'static, Result<Incoming, Status>> =
            Box::pin(request.into_inner().filter_map(|request| {
                let incoming = match request {
                    Err(status) => return Some(Err(status)),
                    Ok(request) => match request.request? {
                        pb::watch_request::Request::Create(create) => Incoming::Create {
                            watch_id: create.watch_id,
                            request: create.into(),
                            fragment: false,
                        },
                        pb::watch_request::Request::Cancel(cancel) => {
                            Incoming::Cancel(cancel.watch_id)
                        }
                        pb::watch_request::Request::Progress(_) => Incoming::Progress,
                    },
                };
                Some(Ok(incoming))
            }));
        let wire = Arc::new(MetaWire {
            member_id: self.member_id,
        });
        Ok(Response::new(serve(
            self.backend.clone(),
            auth,
            wire,
            requests,
            self.stop.clone(),
        )))
    }
}

/// Reads one stream's requests.
struct Reader {
    backend: RaftKvBackend,
    auth: StreamAuth,
    commands: mpsc::Sender<Command>,
    live: Arc<Mutex<HashSet<i64>>>,
    next_id: i64,
}

impl Reader {
    async fn run(
        mut self,
        mut requests: BoxStream<'static, Result<Incoming, Status>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let request = tokio::select! {
                request = requests.next() => request,
                () = self.commands.closed() => return,
                // A graceful stop waits for open streams: end them.
                () = async { let _ = stop.wait_for(|stopping| *stopping).await; } => {
                    let status = Status::unavailable("the member is stopping");
                    let _ = self.commands.send(Command::Fail(status)).await;
                    return;
                }
            };
            let request = match request {
                Some(Ok(request)) => request,
                // The client closed its side or the connection failed.
                None | Some(Err(_)) => return,
            };
            let command = match request {
                Incoming::Create {
                    watch_id,
                    request,
                    fragment,
                } => self.create(watch_id, request, fragment).await,
                // An unknown id is ignored, as etcd does.
                Incoming::Cancel(id) => Some(Command::Cancel {
                    id,
                    revision: self.backend.local_revision(),
                }),
                Incoming::Progress => Some(Command::Progress {
                    revision: self.backend.local_revision(),
                }),
            };
            if let Some(command) = command
                && self.commands.send(command).await.is_err()
            {
                return;
            }
        }
    }

    /// A `created` answer at the member's revision now.
    fn created(&self, watch_id: i64) -> Outgoing {
        Outgoing {
            created: true,
            ..response(watch_id, self.backend.local_revision())
        }
    }

    /// Starts a watcher; its `created` answer is sent here, the watcher handed over
    /// as the returned command.
    async fn create(
        &mut self,
        asked: i64,
        request: WatchRequest,
        fragment: bool,
    ) -> Option<Command> {
        let id = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let id = if asked != 0 {
                if asked < 0 || live.contains(&asked) {
                    None
                } else {
                    Some(asked)
                }
            } else {
                while live.contains(&self.next_id) {
                    self.next_id += 1;
                }
                Some(self.next_id)
            };
            if let Some(id) = id {
                live.insert(id);
            }
            id
        };
        let Some(id) = id else {
            let mut refused = self.created(asked);
            refused.canceled = true;
            refused.cancel_reason = format!(
                "watch id {asked} is {}",
                if asked < 0 {
                    "negative"
                } else {
                    "in use on this stream"
                }
            );
            return Some(Command::Send(refused));
        };
        let mut created = self.created(id);
        let checked = match self.auth.caller(&self.backend) {
            Ok(caller) => Checked::new(&self.backend, caller).watch(request).await,
            Err(e) => Err(common_meta::Error::Auth(e)),
        };
        match checked {
            Ok(watcher) => {
                if self.commands.send(Command::Send(created)).await.is_err() {
                    return None;
                }
                Some(Command::Add(id, watcher, fragment))
            }
            Err(e) => {
                self.live
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                created.canceled = true;
                if let common_meta::Error::Compacted { compacted, .. } = &e {
                    created.compact_revision = *compacted;
                }
                created.cancel_reason = match &e {
                    // etcd's text, which its clients know.
                    common_meta::Error::Auth(e) => {
                        crate::etcd::status::auth_status(e).message().to_string()
                    }
                    e => e.to_string(),
                };
                Some(Command::Send(created))
            }
        }
    }
}
