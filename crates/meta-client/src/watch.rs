//! Watches that outlive the member serving them, all carried by one stream:
//! [`MetaClient`]'s `watch` (the [`KvBackend`](common_meta::kv::KvBackend) method) adds
//! a watcher to the client's shared `meta.v1.Watch` stream (as etcd's own client does),
//! so a thousand watchers cost the member one stream, not a thousand. When that stream
//! breaks (the member stopped, the connection failed), another is opened on the next
//! member and every watcher is created again from the revision after the last one it
//! delivered: no gap, no event twice.
//!
//! The stream is run by one task ([`Mux`]), started with the first watcher and ended
//! with the last. It picks the watch ids itself (so a re-created watcher keeps its id)
//! and never waits on a consumer: what one has not read yet stays queued for it, as in
//! etcd's client, so a slow consumer delays no other watcher.
//!
//! What a watcher resumes from: its last event's revision + 1, raised by each progress
//! notice (a notice of the whole stream, `watch_id = -1`, claims a revision every one
//! of its watchers has delivered through); for a watch started "now", one past the
//! revision the member reported when it created the watcher. A member behind the
//! others waits for that revision (a start revision in the future is allowed). A
//! compacted resume point ends that watcher with [`Error::Compacted`], as a local
//! watcher does.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};

use common_meta::kv::watch::{Control, WatchStream};
use common_meta::kv::{WatchRequest, WatchResponse};
use common_meta::{Error, Result};
use futures_util::stream::{self, SelectAll, StreamExt};
use meta_proto::v1 as pb;
use meta_proto::v1::watch_client::WatchClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{MetaClient, jittered};
use crate::status::from_status;

/// Requests queued for the member.
const REQUEST_QUEUE: usize = 64;

/// The handle of a client's shared watch stream, if one runs.
#[derive(Debug, Default)]
pub(crate) struct MuxSlot(Mutex<Option<mpsc::UnboundedSender<Add>>>);

/// A watcher to add to the shared stream.
pub(crate) struct Add {
    req: WatchRequest,
    out: mpsc::UnboundedSender<Result<WatchResponse>>,
    controls: mpsc::Receiver<Control>,
    /// Told once the member created the watcher (or refused it).
    created: oneshot::Sender<Result<()>>,
}

impl MetaClient {
    /// See the module doc.
    pub(crate) async fn remote_watch(&self, req: WatchRequest) -> Result<WatchStream> {
        common_meta::kv::watch::check_request(&req)?;
        let (out, responses) = mpsc::unbounded_channel();
        let (control, controls) = mpsc::channel(4);
        let (created, confirmed) = oneshot::channel();
        self.add_watcher(Add {
            req,
            out,
            controls,
            created,
        });
        let deadline = self.options().deadline;
        match tokio::time::timeout(deadline, confirmed).await {
            Ok(Ok(Ok(()))) => Ok(WatchStream::unbounded(responses, control)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(Error::Unavailable {
                message: "the watch stream ended before the watcher was created".to_string(),
            }),
            // Dropping `responses` and `control` removes the watcher from the stream.
            Err(_) => Err(Error::Unavailable {
                message: format!(
                    "no member of [{}] served the watch within {deadline:?}",
                    self.endpoints().join(", "),
                ),
            }),
        }
    }

    /// Hands a watcher to the running stream task, or starts one.
    fn add_watcher(&self, add: Add) {
        let slot = &self.inner_ref().watch_mux;
        let mut running = slot.0.lock().unwrap_or_else(PoisonError::into_inner);
        let add = match running.as_ref() {
            Some(adds) => match adds.send(add) {
                Ok(()) => return,
                Err(mpsc::error::SendError(add)) => add,
            },
            None => add,
        };
        let (adds, queued) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is in hand.
        let _ = adds.send(add);
        *running = Some(adds);
        let mux = Mux {
            client: self.clone(),
            adds: queued,
            watchers: HashMap::new(),
            controls: SelectAll::new(),
            next_id: 1,
            asked: HashSet::new(),
            progress_pending: false,
        };
        tokio::spawn(mux.run());
    }
}

/// One watcher on the shared stream.
struct Watcher {
    req: WatchRequest,
    /// The revision it must deliver next (0: "now", until the member says when that is).
    next: i64,
    out: mpsc::UnboundedSender<Result<WatchResponse>>,
    /// Waiting for the first `created` answer.
    created: Option<oneshot::Sender<Result<()>>>,
}

/// An open server stream.
struct Open {
    index: usize,
    requests: mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<pb::WatchResponse>,
}

/// Opens a stream on the client's current member.
async fn open(client: MetaClient) -> std::result::Result<Open, String> {
    let (index, endpoint, channel) = client.current_endpoint();
    client.ensure_token(&channel).await.map_err(|status| {
        client.skip_endpoint(index);
        format!("{endpoint}: {}", status.message())
    })?;
    let (requests, outbound) = mpsc::channel(REQUEST_QUEUE);
    match WatchClient::new(channel)
        .watch(ReceiverStream::new(outbound))
        .await
    {
        Ok(response) => Ok(Open {
            index,
            requests,
            responses: response.into_inner(),
        }),
        Err(status) => {
            client.note_refusal(&status);
            client.skip_endpoint(index);
            Err(format!("{endpoint}: {}", status.message()))
        }
    }
}

/// A watcher's progress requests, then `None` once its consumer let go.
type Controls = stream::BoxStream<'static, (i64, Option<Control>)>;

/// The task that runs a client's shared stream (see the module doc).
struct Mux {
    client: MetaClient,
    adds: mpsc::UnboundedReceiver<Add>,
    watchers: HashMap<i64, Watcher>,
    controls: SelectAll<Controls>,
    next_id: i64,
    /// Watchers waiting for a progress answer.
    asked: HashSet<i64>,
    /// A progress request is out on the current stream.
    progress_pending: bool,
}

/// Why serving a stream stopped.
enum Ended {
    /// The stream broke: open another.
    Broke(String),
    /// No watcher is left and none is being added.
    Idle,
}

impl Mux {
    async fn run(mut self) {
        let mut backoff = self.client.options().initial_backoff;
        loop {
            let opening = open(self.client.clone());
            tokio::pin!(opening);
            let open = tokio::select! {
                open = &mut opening => open,
                () = self.idle_wait() => return,
            };
            let mut open = match open {
                Ok(open) => {
                    backoff = self.client.options().initial_backoff;
                    open
                }
                Err(why) => {
                    tracing::debug!(error = %why, "watch stream failed; trying the next member");
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(self.client.options().max_backoff);
                    continue;
                }
            };
            match self.serve(&mut open).await {
                Ended::Idle => return,
                Ended::Broke(why) => {
                    tracing::info!(error = %why, "watch stream broke; resuming on another member");
                    self.client.skip_endpoint(open.index);
                }
            }
        }
    }

    /// Takes watchers that come or go while no stream is open; returns once none is
    /// left.
    async fn idle_wait(&mut self) {
        loop {
            tokio::select! {
                add = self.adds.recv() => match add {
                    Some(add) => { self.register(add); }
                    None => return,
                },
                Some((id, control)) = self.controls.next() => {
                    if control.is_none() {
                        self.watchers.remove(&id);
                        self.asked.remove(&id);
                    }
                }
            }
            if self.watchers.is_empty() {
                match self.retire() {
                    Ok(()) => return,
                    Err(add) => {
                        self.register(add);
                    }
                }
            }
        }
    }

    /// Takes a new watcher; returns its id.
    fn register(&mut self, add: Add) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        let controls = ReceiverStream::new(add.controls)
            .map(move |control| (id, Some(control)))
            .chain(stream::once(async move { (id, None) }));
        self.controls.push(controls.boxed());
        self.watchers.insert(
            id,
            Watcher {
                next: add.req.start_revision,
                req: add.req,
                out: add.out,
                created: Some(add.created),
            },
        );
        id
    }

    /// Ends this task if no watcher is being added (under the slot's lock, so an add
    /// either reaches this task first or starts a new one); an add that came first is
    /// handed back.
    fn retire(&mut self) -> std::result::Result<(), Add> {
        let client = self.client.clone();
        let mut running = client
            .inner_ref()
            .watch_mux
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match self.adds.try_recv() {
            Ok(add) => Err(add),
            Err(_) => {
                *running = None;
                Ok(())
            }
        }
    }

    fn create_request(&self, id: i64) -> Option<pb::WatchRequest> {
        let watcher = self.watchers.get(&id)?;
        let create = pb::WatchCreateRequest {
            start_revision: watcher.next,
            watch_id: id,
            ..watcher.req.clone().into()
        };
        Some(pb::WatchRequest {
            request: Some(pb::watch_request::Request::Create(create)),
        })
    }

    /// Runs one stream until it breaks or no watcher is left.
    async fn serve(&mut self, open: &mut Open) -> Ended {
        self.progress_pending = false;
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            if let Some(create) = self.create_request(id)
                && open.requests.send(create).await.is_err()
            {
                return Ended::Broke("the request queue closed".to_string());
            }
        }
        if !self.asked.is_empty() && !self.ask_progress(open).await {
            return Ended::Broke("the request queue closed".to_string());
        }
        loop {
            tokio::select! {
                message = open.responses.message() => {
                    let message = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => return Ended::Broke("the member ended the stream".to_string()),
                        Err(status) => return Ended::Broke(from_status(&status).to_string()),
                    };
                    if let Some(recreate) = self.route(message)
                        && let Some(create) = self.create_request(recreate)
                        && open.requests.send(create).await.is_err()
                    {
                        return Ended::Broke("the request queue closed".to_string());
                    }
                }
                add = self.adds.recv() => {
                    let Some(add) = add else { return Ended::Idle };
                    if !self.add_on(open, add).await {
                        return Ended::Broke("the request queue closed".to_string());
                    }
                }
                Some((id, control)) = self.controls.next() => match control {
                    Some(Control::Progress) => {
                        self.asked.insert(id);
                        if !self.progress_pending && !self.ask_progress(open).await {
                            return Ended::Broke("the request queue closed".to_string());
                        }
                    }
                    None => {
                        self.watchers.remove(&id);
                        self.asked.remove(&id);
                        let cancel = pb::WatchRequest {
                            request: Some(pb::watch_request::Request::Cancel(
                                pb::WatchCancelRequest { watch_id: id },
                            )),
                        };
                        if open.requests.send(cancel).await.is_err() {
                            return Ended::Broke("the request queue closed".to_string());
                        }
                    }
                },
            }
            if self.watchers.is_empty() {
                match self.retire() {
                    Ok(()) => return Ended::Idle,
                    Err(add) => {
                        if !self.add_on(open, add).await {
                            return Ended::Broke("the request queue closed".to_string());
                        }
                    }
                }
            }
        }
    }

    /// Registers a watcher and creates it on the open stream; `false` if the stream
    /// broke.
    async fn add_on(&mut self, open: &Open, add: Add) -> bool {
        let id = self.register(add);
        match self.create_request(id) {
            Some(create) => open.requests.send(create).await.is_ok(),
            None => true,
        }
    }

    async fn ask_progress(&mut self, open: &Open) -> bool {
        self.progress_pending = true;
        let progress = pb::WatchRequest {
            request: Some(pb::watch_request::Request::Progress(
                pb::WatchProgressRequest {},
            )),
        };
        open.requests.send(progress).await.is_ok()
    }

    /// Hands a message to its watcher; returns the id of a watcher to create again.
    fn route(&mut self, message: pb::WatchResponse) -> Option<i64> {
        let revision = message.header.as_ref().map_or(0, |h| h.revision);
        if message.watch_id == -1 {
            // The whole stream's progress: every watcher delivered through it.
            self.progress_pending = false;
            for (id, watcher) in &mut self.watchers {
                if watcher.created.is_some() {
                    continue;
                }
                watcher.next = watcher.next.max(revision + 1);
                if self.asked.contains(id) {
                    let _ = watcher.out.send(Ok(WatchResponse::Progress {
                        revision,
                        requested: true,
                    }));
                }
            }
            self.asked.clear();
            return None;
        }
        let id = message.watch_id;
        let watcher = self.watchers.get_mut(&id)?;
        if message.created {
            if message.canceled {
                let error = if message.compact_revision > 0 {
                    Error::Compacted {
                        requested: watcher.next,
                        compacted: message.compact_revision,
                    }
                } else {
                    Error::invalid_argument(message.cancel_reason)
                };
                self.end(id, error);
                return None;
            }
            if watcher.next == 0 {
                watcher.next = revision + 1;
            }
            if let Some(created) = watcher.created.take() {
                let _ = created.send(Ok(()));
            }
            return None;
        }
        if message.canceled {
            if message.compact_revision > 0 {
                let error = Error::Compacted {
                    requested: watcher.next,
                    compacted: message.compact_revision,
                };
                self.end(id, error);
                return None;
            }
            // The member gave up on this watcher (it fell too far behind): create it
            // again from where it is.
            return Some(id);
        }
        let response = if message.events.is_empty() {
            watcher.next = watcher.next.max(revision + 1);
            WatchResponse::Progress {
                revision,
                requested: false,
            }
        } else {
            let events: Vec<common_meta::kv::Event> =
                message.events.into_iter().map(Into::into).collect();
            let last = events
                .iter()
                .map(|e| e.kv.mod_revision)
                .max()
                .unwrap_or(revision);
            watcher.next = watcher.next.max(last + 1);
            WatchResponse::Events { revision, events }
        };
        // A consumer that let go has dropped its controls too: their end cancels the
        // watcher on the member.
        let _ = watcher.out.send(Ok(response));
        None
    }

    /// Ends one watcher with an error (its creator's, if it was never created).
    fn end(&mut self, id: i64, error: Error) {
        self.asked.remove(&id);
        if let Some(watcher) = self.watchers.remove(&id) {
            match watcher.created {
                Some(created) => {
                    let _ = created.send(Err(error));
                }
                None => {
                    let _ = watcher.out.send(Err(error));
                }
            }
        }
    }
}
