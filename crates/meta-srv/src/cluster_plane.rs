//! The cluster plane (leader only): what the leader knows about the datanodes,
//! frontends and flownodes that heartbeat to it.
//!
//! | module | what |
//! | --- | --- |
//! | `failure_detector` | phi-accrual detector per node (pure, time passed in) |
//! | `live_nodes` | the leader's in-memory detectors and stats, rebuilt after a leader change |
//! | `node_mailbox` | instructions to nodes over their streams, replies correlated by id, with deadlines |
//! | `heartbeat_chain` | the ordered, named handlers run on every heartbeat, with their pure decisions |
//! | `region_lease` | region leases in heartbeat answers (pure decision), grant records and the fence bound, migrations in flight |
//! | `supervisor` | the region supervisor: failover, drain and balancer moves, maintenance mode; `supervisor/plan.rs` its pure decisions |
//! | `hotspot` | route load from heartbeats by window (`RouteLoads`), hot routes split at their load's weighted median (`Hotspots`, pure), the leader's splitter task |
//! | `selector` | placement of new regions on datanodes (round-robin, lease-based, load-based; followers across zones) |

pub mod failure_detector;
pub mod heartbeat_chain;
pub mod hotspot;
pub mod live_nodes;
pub mod node_mailbox;
pub mod region_lease;
pub mod selector;
pub mod supervisor;
