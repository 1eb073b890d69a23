//! The first handlers of the heartbeat chain as pure functions: validating a request
//! against the stream's state and deciding what it registers and reports. The service
//! (`service/heartbeat.rs`) runs, in order: check leader -> [`decide`] -> register the
//! node durably on a handshake (through raft, only then) -> feed the failure detector and
//! the stats -> answer with the heartbeat interval.

use std::collections::BTreeMap;

use common_meta::model::node::{NodeInfo, NodeRole, NodeState};
use meta_proto::v1 as pb;

/// What a heartbeat stream has established so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    /// The node id from the handshake, once received.
    pub node_id: Option<u64>,
}

/// What one request asks the service to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Register (or refresh) the node, then count the heartbeat.
    Register(NodeInfo),
    /// Count the heartbeat with this many regions.
    Stats {
        /// The node.
        node_id: u64,
        /// Regions it reported.
        regions: usize,
    },
}

/// Validates `request` on a stream in `state` and decides what to do; an `Err` is the
/// message of an InvalidArgument that ends this stream only.
pub fn decide(state: &StreamState, request: &pb::HeartbeatRequest) -> Result<Decision, String> {
    match (&request.body, state.node_id) {
        (None, _) => Err("empty heartbeat request".to_string()),
        (Some(pb::heartbeat_request::Body::Handshake(_)), Some(id)) => Err(format!(
            "node {id} already sent its handshake on this stream"
        )),
        (Some(pb::heartbeat_request::Body::Handshake(h)), None) => {
            if h.node_id == 0 {
                return Err("the handshake has no node_id (ids start at 1)".to_string());
            }
            let role = match pb::NodeRole::try_from(h.role) {
                Ok(pb::NodeRole::Datanode) => NodeRole::Datanode,
                Ok(pb::NodeRole::Frontend) => NodeRole::Frontend,
                Ok(pb::NodeRole::Flownode) => NodeRole::Flownode,
                _ => return Err(format!("node {}: unknown role {}", h.node_id, h.role)),
            };
            if h.addr.is_empty() {
                return Err(format!("node {}: the handshake has no addr", h.node_id));
            }
            Ok(Decision::Register(NodeInfo {
                id: h.node_id,
                role,
                addr: h.addr.clone(),
                labels: h
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>(),
                state: NodeState::Joining,
                version: h.version.clone(),
                start_time_ms: h.start_time_ms,
            }))
        }
        (Some(pb::heartbeat_request::Body::Stats(_)), None) => {
            Err("the first message of a heartbeat stream must be a handshake".to_string())
        }
        (Some(pb::heartbeat_request::Body::Stats(stats)), Some(node_id)) => Ok(Decision::Stats {
            node_id,
            regions: stats.regions.len(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(node_id: u64, role: i32, addr: &str) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            body: Some(pb::heartbeat_request::Body::Handshake(pb::NodeHandshake {
                node_id,
                role,
                addr: addr.to_string(),
                ..Default::default()
            })),
            replies: Vec::new(),
        }
    }

    fn stats(regions: usize) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            body: Some(pb::heartbeat_request::Body::Stats(pb::NodeStats {
                regions: vec![pb::RegionStat::default(); regions],
            })),
            replies: Vec::new(),
        }
    }

    #[test]
    fn decisions() {
        let fresh = StreamState::default();
        let known = StreamState { node_id: Some(4) };
        // Each case: stream state, request, and the decision or a fragment of the error.
        let cases: Vec<(&StreamState, pb::HeartbeatRequest, Result<&str, &str>)> = vec![
            (&fresh, handshake(4, 1, "h:1"), Ok("register 4")),
            (&fresh, stats(2), Err("must be a handshake")),
            (&fresh, handshake(0, 1, "h:1"), Err("no node_id")),
            (&fresh, handshake(4, 0, "h:1"), Err("unknown role 0")),
            (&fresh, handshake(4, 9, "h:1"), Err("unknown role 9")),
            (&fresh, handshake(4, 1, ""), Err("no addr")),
            (
                &fresh,
                pb::HeartbeatRequest {
                    body: None,
                    replies: Vec::new(),
                },
                Err("empty"),
            ),
            (&known, stats(2), Ok("stats 4 2")),
            (
                &known,
                handshake(4, 1, "h:1"),
                Err("already sent its handshake"),
            ),
        ];
        for (state, request, want) in cases {
            let got = decide(state, &request).map(|d| match d {
                Decision::Register(info) => format!("register {}", info.id),
                Decision::Stats { node_id, regions } => format!("stats {node_id} {regions}"),
            });
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w),
                (Err(w), Err(g)) => assert!(g.contains(w), "{g:?} lacks {w:?}"),
                (w, g) => panic!("{request:?}: wanted {w:?}, got {g:?}"),
            }
        }
    }
}
