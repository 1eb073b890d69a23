//! Typed metadata values stored under the keys of [`crate::key`] (as JSON, so
//! `metactl` shows them readably), and the managers that change them safely.

pub mod join_token;
pub mod node;
pub mod route;
pub mod sequence;
pub mod table;
