//! The `meta.v1.Watch` service: one bidirectional stream carries many watchers, each a
//! [`WatchStream`] on this member's own applied state (any member serves watches).
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use common_meta::kv::watch::WatchControl;
use common_meta::kv::{KvBackend, WatchResponse, WatchStream};
use common_meta::rpc;
use futures_util::stream::{AbortHandle, Abortable, SelectAll};
use meta_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::raft::backend::RaftKvBackend;

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
    Send(pb::WatchResponse),
    /// Serve this watcher (its `created` answer went ahead as a [`Command::Send`]).
    Add(i64, WatchStream),
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
fn response(member_id: u64, watch_id: i64, revision: i64) -> pb::WatchResponse {
    pb::WatchResponse {
        header: rpc::header(member_id, revision),
        watch_id,
        ..Default::default()
    }
}

/// One stream's responses (see the module doc).
struct Outbound {
    member_id: u64,
    commands: mpsc::Receiver<Command>,
    /// Every watcher's feed, polled as it wakes (not scanned: a stream may carry
    /// thousands).
    feeds: SelectAll<Abortable<Feed>>,
    /// The running watchers: how to drop one and how to ask it for progress.
    watchers: HashMap<i64, (AbortHandle, WatchControl)>,
    /// The ids of watchers that run, shared with the reader (which allocates them).
    live: Arc<Mutex<HashSet<i64>>>,
    round: Option<Round>,
    ready: VecDeque<Result<pb::WatchResponse, Status>>,
    /// A failure went out: the stream ends.
    done: bool,
}

impl Outbound {
    fn response(&self, watch_id: i64, revision: i64) -> pb::WatchResponse {
        response(self.member_id, watch_id, revision)
    }

    fn forget(&mut self, id: i64) {
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
            self.ready.push_back(Ok(combined));
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Send(message) => self.ready.push_back(Ok(message)),
            Command::Add(id, watcher) => {
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
                    self.ready.push_back(Ok(canceled));
                }
            }
            Command::Progress { revision } => {
                if self.watchers.is_empty() {
                    let answer = self.response(-1, revision);
                    self.ready.push_back(Ok(answer));
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
                        self.ready.push_back(Ok(self.response(-1, revision)));
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
            Fed::Response(Ok(WatchResponse::Events { revision, events })) => {
                let mut message = self.response(id, revision);
                message.events = events.into_iter().map(Into::into).collect();
                message
            }
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
        self.ready.push_back(Ok(message));
    }
}

impl Stream for Outbound {
    type Item = Result<pb::WatchResponse, Status>;

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

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (commands, queued) = mpsc::channel(COMMAND_QUEUE);
        let live = Arc::new(Mutex::new(HashSet::new()));
        let outbound = Outbound {
            member_id: self.member_id,
            commands: queued,
            feeds: SelectAll::new(),
            watchers: HashMap::new(),
            live: live.clone(),
            round: None,
            ready: VecDeque::new(),
            done: false,
        };
        let reader = Reader {
            backend: self.backend.clone(),
            member_id: self.member_id,
            commands,
            live,
            next_id: 0,
        };
        tokio::spawn(reader.run(request.into_inner(), self.stop.clone()));
        Ok(Response::new(Box::pin(outbound)))
    }
}

/// Reads one stream's requests.
struct Reader {
    backend: RaftKvBackend,
    member_id: u64,
    commands: mpsc::Sender<Command>,
    live: Arc<Mutex<HashSet<i64>>>,
    next_id: i64,
}

impl Reader {
    async fn run(
        mut self,
        mut requests: Streaming<pb::WatchRequest>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let request = tokio::select! {
                request = requests.message() => request,
                () = self.commands.closed() => return,
                // A graceful stop waits for open streams: end them.
                () = async { let _ = stop.wait_for(|stopping| *stopping).await; } => {
                    let status = Status::unavailable("the member is stopping");
                    let _ = self.commands.send(Command::Fail(status)).await;
                    return;
                }
            };
            let request = match request {
                Ok(Some(request)) => request,
                // The client closed its side or the connection failed.
                Ok(None) | Err(_) => return,
            };
            let command = match request.request {
                Some(pb::watch_request::Request::Create(create)) => self.create(create).await,
                Some(pb::watch_request::Request::Cancel(cancel)) => {
                    // An unknown id is ignored, as etcd does.
                    Some(Command::Cancel {
                        id: cancel.watch_id,
                        revision: self.backend.local_revision(),
                    })
                }
                Some(pb::watch_request::Request::Progress(_)) => Some(Command::Progress {
                    revision: self.backend.local_revision(),
                }),
                None => None,
            };
            if let Some(command) = command
                && self.commands.send(command).await.is_err()
            {
                return;
            }
        }
    }

    /// A `created` answer at the member's revision now.
    fn created(&self, watch_id: i64) -> pb::WatchResponse {
        pb::WatchResponse {
            created: true,
            ..response(self.member_id, watch_id, self.backend.local_revision())
        }
    }

    /// Starts a watcher; its `created` answer is sent here, the watcher handed over
    /// as the returned command.
    async fn create(&mut self, create: pb::WatchCreateRequest) -> Option<Command> {
        let id = {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let id = if create.watch_id != 0 {
                if create.watch_id < 0 || live.contains(&create.watch_id) {
                    None
                } else {
                    Some(create.watch_id)
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
            let mut refused = self.created(create.watch_id);
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
            return Some(Command::Send(refused));
        };
        let mut created = self.created(id);
        match self.backend.watch(create.into()).await {
            Ok(watcher) => {
                if self.commands.send(Command::Send(created)).await.is_err() {
                    return None;
                }
                Some(Command::Add(id, watcher))
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
                created.cancel_reason = e.to_string();
                Some(Command::Send(created))
            }
        }
    }
}
