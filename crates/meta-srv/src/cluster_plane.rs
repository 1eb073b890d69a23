//! The cluster plane (leader only): what the leader knows about the datanodes and
//! frontends that heartbeat to it. So far: failure detection.

pub mod failure_detector;
