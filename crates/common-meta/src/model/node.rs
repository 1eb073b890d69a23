//! Nodes of the data plane (datanodes, frontends, flownodes) and their topology state,
//! stored as JSON `NodeInfo` under `__node/{id}`.
//!
//! Topology states move only along these edges; everything else is refused:
//!
//! ```text
//! Joining -> Active -> Draining -> Decommissioned -> (removed)
//!              ^           |
//!              +-----------+   (a drain can be cancelled)
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::{MetaKey, NodeKey};
use crate::kv::{
    Compare, CompareOp, CompareTarget, DeleteRangeRequest, KvBackend, PutRequest, TxnOp, TxnRequest,
};

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// Stores regions.
    Datanode,
    /// Serves queries.
    Frontend,
    /// Runs flows.
    Flownode,
}

/// Where a node is in its life in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Registered, not yet given work.
    Joining,
    /// Serving.
    Active,
    /// Having its work moved away; gets no new work.
    Draining,
    /// Holds no work; may be removed.
    Decommissioned,
}

impl NodeState {
    /// Whether a node may go from `self` to `to`.
    pub fn can_become(self, to: NodeState) -> bool {
        use NodeState::*;
        matches!(
            (self, to),
            (Joining, Active)
                | (Active, Draining)
                | (Draining, Active)
                | (Draining, Decommissioned)
        )
    }
}

/// A registered node, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id, unique in the cluster.
    pub id: u64,
    /// Its role.
    pub role: NodeRole,
    /// Address other components reach it at.
    pub addr: String,
    /// Free-form labels (zone, rack...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Topology state.
    pub state: NodeState,
    /// Software version it reported.
    #[serde(default)]
    pub version: String,
    /// When it (last) started, ms since the Unix epoch, as it reported.
    #[serde(default)]
    pub start_time_ms: u64,
    /// The SHA-256 (hex) of the join token it was admitted with, when the cluster
    /// requires tokens: only that token lets it back in while it stays registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token: Option<String>,
}

/// Reads and changes `NodeInfo`s with compare-and-put, so concurrent changers cannot
/// overwrite each other.
pub struct NodeManager {
    kv: Arc<dyn KvBackend>,
}

fn encode(info: &NodeInfo) -> Result<Vec<u8>> {
    serde_json::to_vec(info)
        .map_err(|e| Error::invalid_argument(format!("encoding node {}: {e}", info.id)))
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<NodeInfo> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupted {
        location: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl NodeManager {
    /// A manager over `kv`.
    pub fn new(kv: Arc<dyn KvBackend>) -> Self {
        NodeManager { kv }
    }

    /// The node, with the mod revision its record has (for a later compare).
    async fn load(&self, id: u64) -> Result<Option<(NodeInfo, i64)>> {
        let key = NodeKey::new(id).encode();
        match self.kv.get(&key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
        }
    }

    /// One node.
    pub async fn get(&self, id: u64) -> Result<Option<NodeInfo>> {
        Ok(self.load(id).await?.map(|(info, _)| info))
    }

    /// Every node, by id.
    pub async fn list(&self) -> Result<Vec<NodeInfo>> {
        Self::decode_all(self.kv.range(NodeKey::scan_all()).await?)
    }

    fn decode_all(range: crate::kv::RangeResponse) -> Result<Vec<NodeInfo>> {
        range
            .kvs
            .iter()
            .map(|kv| decode(&kv.key, &kv.value))
            .collect()
    }

    /// Every node as this member's own state has them (serializable: no round trip to
    /// the leader's quorum, maybe a moment stale). For placement on the leader, where
    /// a state change a moment old makes no difference.
    pub async fn list_local(&self) -> Result<Vec<NodeInfo>> {
        Self::decode_all(self.kv.range_serializable(NodeKey::scan_all()).await?)
    }

    /// Registers a node, or refreshes the facts a restarted node reports (address,
    /// labels, version, start time) while keeping its topology state. A node that is
    /// decommissioned cannot come back under the same id. Returns the stored record.
    pub async fn register(&self, reported: NodeInfo) -> Result<NodeInfo> {
        loop {
            if let Some(info) = self.try_register(&reported).await? {
                return Ok(info);
            }
            // Someone changed it meanwhile: read again and retry.
        }
    }

    /// The node with the mod revision of its record, for a later compare.
    pub async fn get_with_revision(&self, id: u64) -> Result<Option<(NodeInfo, i64)>> {
        self.load(id).await
    }

    /// One attempt of [`NodeManager::register`]; `None` when the record changed
    /// meanwhile.
    pub async fn try_register(&self, reported: &NodeInfo) -> Result<Option<NodeInfo>> {
        let existing = self.load(reported.id).await?;
        self.register_over(existing, reported, Vec::new(), Vec::new())
            .await
    }

    /// Registers `reported` over `existing` (as read by the caller, with its mod
    /// revision), in one transaction that also requires `compares` and writes `ops`
    /// (consuming a join token). `None` when the record or a compare changed since;
    /// with no `ops` and nothing new to record, nothing is written (the compares are
    /// still checked). A node reporting an earlier start than the registered one is
    /// refused: it is an older incarnation.
    pub async fn register_over(
        &self,
        existing: Option<(NodeInfo, i64)>,
        reported: &NodeInfo,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<NodeInfo>> {
        let (next, compare) = match &existing {
            None => (
                NodeInfo {
                    state: NodeState::Joining,
                    ..reported.clone()
                },
                CompareTarget::CreateRevision(0),
            ),
            Some((old, _)) if old.state == NodeState::Decommissioned => {
                return Err(Error::invalid_argument(format!(
                    "node {} is decommissioned; remove it before reusing its id",
                    old.id
                )));
            }
            Some((old, _)) if old.role != reported.role => {
                return Err(Error::invalid_argument(format!(
                    "node {} is registered as {:?}, not {:?}",
                    old.id, old.role, reported.role
                )));
            }
            Some((old, _)) if old.start_time_ms > reported.start_time_ms => {
                // A handshake of an older incarnation that arrives late (a dead
                // process's stream) must not overwrite the running one's address.
                return Err(Error::invalid_argument(format!(
                    "node {}: a newer start of this node (at {} ms) is registered; this \
                     one started at {} ms",
                    old.id, old.start_time_ms, reported.start_time_ms
                )));
            }
            Some((old, revision)) => {
                let next = NodeInfo {
                    state: old.state,
                    ..reported.clone()
                };
                if next == *old && ops.is_empty() && compares.is_empty() {
                    return Ok(Some(next));
                }
                (next, CompareTarget::ModRevision(*revision))
            }
        };
        let key = NodeKey::new(next.id).encode();
        let unchanged = existing.as_ref().is_some_and(|(old, _)| *old == next);
        let mut request = TxnRequest {
            compare: vec![Compare::new(key.clone(), CompareOp::Equal, compare)],
            // Nothing new to record: the transaction only checks the compares.
            success: if unchanged && ops.is_empty() {
                Vec::new()
            } else {
                vec![TxnOp::Put(PutRequest::new(key, encode(&next)?))]
            },
            failure: Vec::new(),
        };
        request.compare.extend(compares);
        request.success.extend(ops);
        Ok(self.kv.txn(request).await?.succeeded.then_some(next))
    }

    /// Moves node `id` to `to`, refusing transitions the diagram does not allow.
    pub async fn set_state(&self, id: u64, to: NodeState) -> Result<NodeInfo> {
        loop {
            let (mut info, revision) = self
                .load(id)
                .await?
                .ok_or_else(|| Error::invalid_argument(format!("unknown node {id}")))?;
            if info.state == to {
                return Ok(info);
            }
            if !info.state.can_become(to) {
                return Err(Error::invalid_argument(format!(
                    "node {id} cannot go from {:?} to {to:?}",
                    info.state
                )));
            }
            info.state = to;
            if self
                .put_if(&info, CompareTarget::ModRevision(revision))
                .await?
            {
                return Ok(info);
            }
        }
    }

    /// Removes a decommissioned node.
    pub async fn remove(&self, id: u64) -> Result<()> {
        let (info, revision) = self
            .load(id)
            .await?
            .ok_or_else(|| Error::invalid_argument(format!("unknown node {id}")))?;
        if info.state != NodeState::Decommissioned {
            return Err(Error::invalid_argument(format!(
                "node {id} is {:?}; decommission it before removing it",
                info.state
            )));
        }
        let key = NodeKey::new(id).encode();
        let done = self
            .kv
            .txn(TxnRequest {
                compare: vec![Compare::new(
                    key.clone(),
                    CompareOp::Equal,
                    CompareTarget::ModRevision(revision),
                )],
                success: vec![TxnOp::DeleteRange(DeleteRangeRequest::key(key))],
                failure: Vec::new(),
            })
            .await?;
        if done.succeeded {
            Ok(())
        } else {
            Err(Error::invalid_argument(format!(
                "node {id} changed while being removed; retry"
            )))
        }
    }

    async fn put_if(&self, info: &NodeInfo, target: CompareTarget) -> Result<bool> {
        let key = NodeKey::new(info.id).encode();
        let response = self
            .kv
            .txn(TxnRequest {
                compare: vec![Compare::new(key.clone(), CompareOp::Equal, target)],
                success: vec![TxnOp::Put(PutRequest::new(key, encode(info)?))],
                failure: Vec::new(),
            })
            .await?;
        Ok(response.succeeded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryKvBackend;

    fn node(id: u64, addr: &str) -> NodeInfo {
        NodeInfo {
            id,
            role: NodeRole::Datanode,
            addr: addr.to_string(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            state: NodeState::Active,
            version: "1.0".to_string(),
            start_time_ms: 1,
            join_token: None,
        }
    }

    #[test]
    fn transitions_follow_the_diagram() {
        use NodeState::*;
        let all = [Joining, Active, Draining, Decommissioned];
        let allowed = [
            (Joining, Active),
            (Active, Draining),
            (Draining, Active),
            (Draining, Decommissioned),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn register_restart_drain_decommission_remove() {
        let nodes = NodeManager::new(Arc::new(MemoryKvBackend::default()));
        let first = nodes.register(node(7, "h:1")).await.unwrap();
        assert_eq!(
            first.state,
            NodeState::Joining,
            "a new node joins, whatever it claims"
        );
        nodes.set_state(7, NodeState::Active).await.unwrap();

        // A restart with a new address keeps the topology state.
        let restarted = NodeInfo {
            start_time_ms: 5,
            ..node(7, "h:2")
        };
        let again = nodes.register(restarted).await.unwrap();
        assert_eq!(
            (again.addr.as_str(), again.state),
            ("h:2", NodeState::Active)
        );
        // A late handshake of the earlier start cannot take the address back.
        let err = nodes.register(node(7, "h:1")).await.unwrap_err();
        assert!(
            err.to_string().contains("a newer start of this node"),
            "{err}"
        );

        let err = nodes
            .set_state(7, NodeState::Decommissioned)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot go from Active to Decommissioned"),
            "{err}"
        );
        let err = nodes.remove(7).await.unwrap_err();
        assert!(
            err.to_string().contains("decommission it before removing"),
            "{err}"
        );

        nodes.set_state(7, NodeState::Draining).await.unwrap();
        nodes.set_state(7, NodeState::Decommissioned).await.unwrap();
        let err = nodes.register(node(7, "h:3")).await.unwrap_err();
        assert!(err.to_string().contains("is decommissioned"), "{err}");
        nodes.remove(7).await.unwrap();
        assert_eq!(nodes.get(7).await.unwrap(), None);
        assert_eq!(
            nodes.register(node(7, "h:4")).await.unwrap().state,
            NodeState::Joining
        );
    }

    #[tokio::test]
    async fn errors_name_the_node_and_roles_cannot_change() {
        let nodes = NodeManager::new(Arc::new(MemoryKvBackend::default()));
        let err = nodes.set_state(3, NodeState::Active).await.unwrap_err();
        assert!(err.to_string().contains("unknown node 3"), "{err}");
        nodes.register(node(3, "h:1")).await.unwrap();
        let frontend = NodeInfo {
            role: NodeRole::Frontend,
            ..node(3, "h:1")
        };
        let err = nodes.register(frontend).await.unwrap_err();
        assert!(err.to_string().contains("registered as Datanode"), "{err}");
        assert_eq!(nodes.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_registrations_of_one_node_all_succeed_consistently() {
        let nodes = Arc::new(NodeManager::new(Arc::new(MemoryKvBackend::default())));
        let mut tasks = Vec::new();
        for i in 0..16 {
            let nodes = nodes.clone();
            tasks.push(tokio::spawn(async move {
                nodes.register(node(1, &format!("h:{i}"))).await
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let stored = nodes.get(1).await.unwrap().unwrap();
        assert_eq!(stored.state, NodeState::Joining);
    }
}
