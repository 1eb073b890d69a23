//! The cluster plane (leader only): what the leader knows about the datanodes,
//! frontends and flownodes that heartbeat to it.
//!
//! | module | what |
//! | --- | --- |
//! | `failure_detector` | phi-accrual detector per node (pure, time passed in) |
//! | `live_nodes` | the leader's in-memory detectors and stats, rebuilt after a leader change |
//! | `node_mailbox` | instructions to nodes over their streams, replies correlated by id, with deadlines |
//! | `handshake` | the heartbeat chain's validation and decision, as a pure function |

pub mod failure_detector;
pub mod handshake;
pub mod live_nodes;
pub mod node_mailbox;
