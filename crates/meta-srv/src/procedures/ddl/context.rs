//! What every DDL procedure works with: the metadata managers, the ids, the selector
//! and the mailbox to datanodes; and the few things they all do with them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common_meta::manager::{CatalogManager, TableMetadataManager};
use common_meta::model::node::{NodeManager, NodeRole, NodeState};
use common_meta::model::sequence::Sequences;
use common_meta::model::table::{RegionId, TableRoute};
use meta_proto::v1 as pb;
use procedure::Context;

use crate::cluster_plane::heartbeat_chain::ClusterPlane;
use crate::cluster_plane::selector::{Candidate, Selector};
use crate::config::MetadataConfig;

/// How long a cache invalidation may take to reach one node; a node that misses it
/// falls back on its cache's TTL.
const INVALIDATE_DEADLINE: Duration = Duration::from_secs(3);

/// The shared state of DDL procedures (one per server, used by the leader's manager).
pub struct DdlContext {
    /// Tables' keys.
    pub tables: TableMetadataManager,
    /// Catalogs and schemas.
    pub catalogs: CatalogManager,
    /// Registered nodes.
    pub nodes: Arc<NodeManager>,
    /// Liveness and the mailbox to nodes.
    pub plane: Arc<ClusterPlane>,
    /// Id sequences (reset on every leadership change); take ids through
    /// [`DdlContext::next_ids`].
    pub ids: Arc<Sequences>,
    /// The leadership term the sequences' reserved ids belong to.
    pub ids_term: std::sync::atomic::AtomicU64,
    /// Placement of new regions.
    pub selector: Selector,
    /// Timeouts and attempts.
    pub config: MetadataConfig,
    /// The store's limits (a table's info must fit, see `ddl::max_info_bytes`).
    pub limits: common_meta::kv::KvLimits,
    /// Retries the procedure manager gives a step (`ManagerConfig::max_retries`): a
    /// step that must not fail decides before they run out.
    pub step_retries: u32,
}

/// A step's failure from a metadata error: transient errors are retried by the
/// manager (every step is idempotent, so an unknown outcome is retried too); the rest
/// fail the procedure with the error's text, which
/// `common_meta::Error::from_procedure_error` reads back.
pub fn step_error(e: common_meta::Error) -> procedure::Error {
    if e.is_retryable() || e.is_outcome_unknown() {
        procedure::Error::retry_later(e.to_string())
    } else {
        procedure::Error::external(e.to_string())
    }
}

/// Decodes a DDL procedure's saved state (`what` names the DDL in the error).
pub fn load_state<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> procedure::Result<T> {
    serde_json::from_str(json)
        .map_err(|e| procedure::Error::external(format!("bad {what} state: {e}")))
}

/// Encodes a DDL procedure's state to save.
pub fn dump_state<T: serde::Serialize>(data: &T) -> procedure::Result<String> {
    serde_json::to_string(data).map_err(|e| procedure::Error::external(e.to_string()))
}

/// The locks of a DDL of database `catalog.schema` (the schema exclusively).
pub fn locks_for_schema(catalog: &str, schema: &str) -> procedure::LockKey {
    procedure::LockKey::shared(format!("catalog/{catalog}")).with(
        format!("schema/{catalog}/{schema}"),
        procedure::LockMode::Exclusive,
    )
}

/// The regions of `route` by the node that leads or follows them.
pub fn regions_by_node(route: &TableRoute) -> BTreeMap<u64, Vec<u64>> {
    let mut out: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for region in &route.regions {
        for peer in region.leader.iter().chain(&region.followers) {
            out.entry(peer.id).or_default().push(region.region.as_u64());
        }
    }
    out
}

/// What to do when nodes refuse or stay unreachable through every attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Fail the step (the procedure rolls back).
    Fail,
    /// Go on without them (a drop: the metadata no longer names their regions, and a
    /// node that comes back learns from its `__datanode_table` keys what it holds).
    /// Nodes with no stream are waited for up to the attempts too.
    Skip,
}

impl DdlContext {
    /// `count` new ids of sequence `name`. Ids this member reserved in an earlier term
    /// are dropped first (another leader may have handed out higher ones since), even
    /// if the leadership task has not reset the sequences yet.
    pub async fn next_ids(
        &self,
        name: &str,
        count: u64,
    ) -> Result<std::ops::Range<u64>, common_meta::Error> {
        let term = (*self.plane.leadership.borrow())
            .ok_or(common_meta::Error::NotLeader { leader: None })?;
        if self
            .ids_term
            .swap(term, std::sync::atomic::Ordering::SeqCst)
            != term
        {
            self.ids.reset();
        }
        self.ids.next(name, count).await
    }

    /// The datanodes that may take new regions now: active and alive.
    pub async fn candidates(&self) -> Result<Vec<Candidate>, common_meta::Error> {
        let now = common_meta::time::unix_ms();
        let mut out = Vec::new();
        let (mut joining, mut not_alive, mut other) = (0, 0, 0);
        for node in self.nodes.list_local().await? {
            if node.role != NodeRole::Datanode {
                continue;
            }
            let view = self.plane.view(node.id, now);
            match (node.state, view.liveness) {
                (NodeState::Active, pb::Liveness::Alive) => out.push(Candidate {
                    id: node.id,
                    addr: node.addr.clone(),
                    zone: node.labels.get("zone").cloned(),
                    regions: view.regions,
                }),
                (NodeState::Joining, _) => joining += 1,
                (NodeState::Active, _) => not_alive += 1,
                _ => other += 1,
            }
        }
        if out.is_empty() {
            return Err(common_meta::Error::FailedPrecondition {
                message: format!(
                    "no datanode can take regions: {joining} joining (activate them with `metactl node activate ID`), {not_alive} active but not alive, {other} draining or decommissioned"
                ),
            });
        }
        Ok(out)
    }

    /// Sends `make(regions)` to every node of `by_node` at once and checks every
    /// region's outcome. A refusal fails the step for good. A node with a stream that
    /// does not answer makes the step retry, up to `region_attempts`, then
    /// `unreachable` decides. A node with no stream to this leader that the failure
    /// detector does not call failed is waited for (retried within the procedure
    /// manager's budget): after a leader change every node reconnects, which takes a
    /// few heartbeats, and a node that died is called failed within a detection
    /// window.
    pub async fn on_nodes(
        &self,
        ctx: &Context,
        what: &str,
        by_node: &BTreeMap<u64, Vec<u64>>,
        make: impl Fn(Vec<u64>) -> pb::Instruction,
        unreachable: Unreachable,
    ) -> procedure::Result<()> {
        let deadline = Duration::from_millis(self.config.region_timeout_ms);
        let sends = by_node.iter().map(|(node, regions)| {
            let instruction = make(regions.clone());
            async move {
                let reply = self.plane.send(*node, instruction, deadline).await;
                (*node, regions, reply)
            }
        });
        let mut refused = Vec::new();
        let mut silent = Vec::new();
        let mut awaited = Vec::new();
        let attached = self.plane.outbox.attached();
        let now = common_meta::time::unix_ms();
        for (node, regions, reply) in futures_util::future::join_all(sends).await {
            match reply {
                Ok(reply) if !reply.ok => refused.push(format!(
                    "datanode {node} refused to {what}: {}",
                    reply.error
                )),
                Ok(reply) => {
                    for region in regions {
                        let outcome = reply.regions.iter().find(|o| o.region_id == *region);
                        match outcome {
                            Some(o) if o.ok => {}
                            Some(o) => refused.push(format!(
                                "datanode {node} refused to {what} region {}: {}",
                                RegionId::from(*region),
                                o.error
                            )),
                            None => refused.push(format!(
                                "datanode {node} did not say whether it could {what} region {}",
                                RegionId::from(*region)
                            )),
                        }
                    }
                }
                Err(e)
                    if !attached.contains(&node)
                        && self.plane.view(node, now).liveness != pb::Liveness::Failed =>
                {
                    awaited.push(format!("datanode {node}: {e}"))
                }
                Err(e) => silent.push(format!("datanode {node}: {e}")),
            }
        }
        let attempts = self.config.region_attempts;
        let last = ctx.attempt + 1 >= attempts;
        if unreachable == Unreachable::Skip {
            // Going forward whatever happens: what refuses, and what stays away past
            // the attempts, is told and left (no key names its regions any more).
            // Nodes with no stream are waited for as long as the manager lets the step
            // retry (after a leader change they take a few heartbeats to come back).
            let last_wait = ctx.attempt + 1 >= self.step_retries.max(attempts);
            let mut left: Vec<&String> = refused.iter().collect();
            if last {
                left.extend(&silent);
            }
            if last_wait {
                left.extend(&awaited);
            }
            if !left.is_empty() {
                tracing::warn!(procedure = %ctx.procedure_id, nodes = ?left, "went on without datanodes");
            }
            let waiting = (!last && !silent.is_empty()) || (!last_wait && !awaited.is_empty());
            if !waiting {
                return Ok(());
            }
            return Err(procedure::Error::retry_later(
                silent
                    .iter()
                    .chain(&awaited)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        if !refused.is_empty() {
            return Err(step_error(common_meta::Error::FailedPrecondition {
                message: refused.join("; "),
            }));
        }
        if silent.is_empty() && awaited.is_empty() {
            return Ok(());
        }
        if silent.is_empty() {
            return Err(procedure::Error::retry_later(format!(
                "waiting for datanodes to connect: {}",
                awaited.join("; ")
            )));
        }
        if !last {
            return Err(procedure::Error::retry_later(silent.join("; ")));
        }
        Err(step_error(common_meta::Error::FailedPrecondition {
            message: format!(
                "could not {what} after {attempts} attempts: {}",
                silent.join("; ")
            ),
        }))
    }

    /// Tells every connected node to drop what it cached under `idents` (best effort:
    /// a node that misses it relies on its cache's TTL).
    pub async fn invalidate(&self, idents: Vec<pb::CacheIdent>) {
        let instruction = pb::Instruction {
            kind: Some(pb::instruction::Kind::InvalidateCache(
                pb::InvalidateCache {
                    keys: Vec::new(),
                    idents,
                },
            )),
        };
        let sends = self.plane.outbox.attached().into_iter().map(|node| {
            let instruction = instruction.clone();
            async move {
                if let Err(e) = self
                    .plane
                    .outbox
                    .send(node, instruction, INVALIDATE_DEADLINE)
                    .await
                {
                    tracing::debug!(node, error = %e, "cache invalidation not delivered");
                }
            }
        });
        futures_util::future::join_all(sends).await;
    }
}

/// Cache idents of a table.
pub fn table_idents(id: u32, catalog: &str, schema: &str, name: &str) -> Vec<pb::CacheIdent> {
    use pb::cache_ident::Kind;
    vec![
        pb::CacheIdent {
            kind: Some(Kind::TableId(id)),
        },
        pb::CacheIdent {
            kind: Some(Kind::TableName(format!("{catalog}.{schema}.{name}"))),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use common_meta::Error;

    fn error_of(text: &str) -> Error {
        Error::from_procedure_error(text)
    }

    #[test]
    fn a_failed_procedures_text_reads_back_as_its_error() {
        let cases = [
            common_meta::Error::AlreadyExists {
                what: "table a.b.c (id 1024)".into(),
            },
            common_meta::Error::NotFound {
                what: "schema a.b".into(),
            },
            common_meta::Error::invalid_argument("bad column"),
            common_meta::Error::FailedPrecondition {
                message: "no datanode".into(),
            },
            // A refusal whose own words end like another error's display.
            common_meta::Error::FailedPrecondition {
                message: "datanode 3 refused to create region 1024.0: region 4398046511104 already exists".into(),
            },
        ];
        for error in cases {
            let text = step_error(error).to_string();
            let back = error_of(&format!("{text} (rolled back)"));
            assert_eq!(back.to_string(), text);
            assert_eq!(error_of(&text).to_string(), text);
        }
        let retried = step_error(common_meta::Error::Unavailable {
            message: "x".into(),
        });
        assert!(retried.is_retryable());
        // Retries ran out and everything was undone: nothing was kept.
        assert!(matches!(
            error_of(&format!("{retried} (rolled back)")),
            common_meta::Error::FailedPrecondition { .. }
        ));
        // Its effects may stay, or it may be resumed: the outcome is not known.
        for text in [
            retried.to_string(),
            "retryable: outcome unknown: raft wait timed out (rolled back)".to_string(),
            "failed precondition: x; rollback failed: retryable: unavailable: y".to_string(),
            "procedure ddl-1 could not be saved after 21 attempts: disk".to_string(),
        ] {
            assert!(error_of(&text).is_outcome_unknown(), "{text}");
        }
    }
}
