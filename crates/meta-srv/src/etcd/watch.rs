//! etcd's `Watch` service: the member's watch stream engine (`service/watch.rs`) on
//! etcd's wire: etcd's header, `mvccpb` events, fragments when a watcher asked for
//! them (a response over the request size limit split into several, all but the last
//! marked `fragment`, as etcd does), and etcd's shape of refusals: a compacted start
//! is a watcher created and then cancelled with the compacted revision, any other
//! refused create answers `watch_id = -1` with the reason. Any member serves watches
//! from its own state.

use std::pin::Pin;
use std::sync::Arc;

use common_meta::kv::KvLimits;
use futures_util::stream::BoxStream;
use meta_proto::etcd::etcdserverpb as epb;
use meta_proto::etcd::mvccpb;
use prost::Message;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Etcd;
use crate::service::watch::{Incoming, Outgoing, Wire, serve};

/// etcd's Watch service of one member.
pub struct WatchService {
    etcd: Arc<Etcd>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl WatchService {
    /// The service over the member's shared etcd state; `stop` ends every stream.
    pub fn new(etcd: Arc<Etcd>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        WatchService { etcd, stop }
    }
}

/// etcd's wire for watch streams.
struct EtcdWire {
    etcd: Arc<Etcd>,
    limits: KvLimits,
}

impl Wire for EtcdWire {
    type Response = epb::WatchResponse;

    fn encode(&self, mut out: Outgoing, fragment: bool) -> Vec<epb::WatchResponse> {
        if out.created && out.canceled {
            if out.compact_revision != 0 {
                // etcd creates a watcher whose start was compacted, then cancels it
                // with the compacted revision and no reason: its clients read that as
                // "compacted" for this watcher, where a refused create ends the stream.
                let canceled = Outgoing {
                    watch_id: out.watch_id,
                    revision: out.revision,
                    canceled: true,
                    compact_revision: out.compact_revision,
                    ..Outgoing::default()
                };
                let created = Outgoing {
                    watch_id: out.watch_id,
                    revision: out.revision,
                    created: true,
                    ..Outgoing::default()
                };
                let mut both = self.encode(created, fragment);
                both.extend(self.encode(canceled, fragment));
                return both;
            }
            // A refused create names no watcher, as etcd's does.
            out.watch_id = -1;
        }
        let whole = epb::WatchResponse {
            header: self.etcd.responder().header(out.revision),
            watch_id: out.watch_id,
            created: out.created,
            canceled: out.canceled,
            compact_revision: out.compact_revision,
            cancel_reason: out.cancel_reason,
            fragment: false,
            events: out.events.into_iter().map(mvccpb::Event::from).collect(),
        };
        if fragment {
            fragments(whole, self.limits.max_request_bytes)
        } else {
            vec![whole]
        }
    }
}

/// `whole` split into messages of at most `limit` bytes of events (one event each at
/// least), every one but the last marked `fragment`; as it is when it fits.
fn fragments(whole: epb::WatchResponse, limit: usize) -> Vec<epb::WatchResponse> {
    if whole.encoded_len() <= limit || whole.events.len() < 2 {
        return vec![whole];
    }
    let mut pieces = Vec::new();
    let mut current: Vec<mvccpb::Event> = Vec::new();
    let mut size = 0;
    let template = epb::WatchResponse {
        events: Vec::new(),
        ..whole.clone()
    };
    for event in whole.events {
        let len = event.encoded_len();
        if !current.is_empty() && size + len > limit {
            pieces.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(event);
    }
    pieces.push(current);
    let last = pieces.len() - 1;
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, events)| epb::WatchResponse {
            events,
            fragment: i < last,
            ..template.clone()
        })
        .collect()
}

#[tonic::async_trait]
impl epb::watch_server::Watch for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<epb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<Streaming<epb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use epb::watch_request::RequestUnion;
        let metadata = request.metadata().clone();
        let auth = crate::service::watch::StreamAuth::of("/etcdserverpb.Watch/Watch", &request);
        let requests: BoxStream<'static, Result<Incoming, Status>> =
            Box::pin(request.into_inner().filter_map(|request| {
                let incoming = match request {
                    Err(status) => return Some(Err(status)),
                    Ok(request) => match request.request_union? {
                        RequestUnion::CreateRequest(create) => Incoming::Create {
                            watch_id: create.watch_id,
                            fragment: create.fragment,
                            request: create.into(),
                        },
                        RequestUnion::CancelRequest(cancel) => Incoming::Cancel(cancel.watch_id),
                        RequestUnion::ProgressRequest(_) => Incoming::Progress,
                    },
                };
                Some(Ok(incoming))
            }));
        let wire = Arc::new(EtcdWire {
            etcd: self.etcd.clone(),
            limits: self.etcd.limits,
        });
        let served = serve(
            self.etcd.backend.clone(),
            auth,
            wire,
            requests,
            self.stop.clone(),
        );
        Ok(Response::new(self.etcd.require_leader(&metadata, served)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(size: usize) -> mvccpb::Event {
        mvccpb::Event {
            kv: Some(mvccpb::KeyValue {
                key: b"k".to_vec(),
                value: vec![b'v'; size],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_large_response_is_split_into_marked_fragments() {
        let whole = epb::WatchResponse {
            watch_id: 3,
            events: (0..5).map(|_| event(400)).collect(),
            ..Default::default()
        };
        let pieces = fragments(whole.clone(), 1_000);
        assert_eq!(pieces.len(), 3, "two events of ~400 bytes fit in 1,000");
        assert!(pieces[..2].iter().all(|p| p.fragment) && !pieces[2].fragment);
        assert!(pieces.iter().all(|p| p.watch_id == 3));
        let events: Vec<_> = pieces.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(events, whole.events, "every event once, in order");
        // A response that fits, or holds one event, goes whole.
        assert_eq!(fragments(whole.clone(), 1_000_000), vec![whole]);
        let single = epb::WatchResponse {
            events: vec![event(5_000)],
            ..Default::default()
        };
        assert_eq!(fragments(single.clone(), 1_000), vec![single]);
    }
}
