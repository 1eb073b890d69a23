//! Keys of the cluster's nodes: `__node/{node_id}` and `__datanode_table/{node_id}/{table_id}`.

use super::{MetaKey, U32_WIDTH, U64_WIDTH, parse_u32, parse_u64, segments};
use crate::error::Result;

/// `__node/{node_id:020}`: a registered node's `NodeInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeKey {
    /// The node's id.
    pub node_id: u64,
}

impl NodeKey {
    /// The key of node `node_id`.
    pub fn new(node_id: u64) -> Self {
        NodeKey { node_id }
    }
}

impl MetaKey for NodeKey {
    const PREFIX: &'static str = "__node";

    fn encode(&self) -> Vec<u8> {
        format!("{}/{:0w$}", Self::PREFIX, self.node_id, w = U64_WIDTH).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let [id] = segments(bytes, Self::PREFIX)?;
        Ok(NodeKey::new(parse_u64(bytes, id, "node id")?))
    }
}

/// `__datanode_table/{node_id:020}/{table_id:010}`: the regions of a table on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DatanodeTableKey {
    /// The datanode's id.
    pub node_id: u64,
    /// The table's id.
    pub table_id: u32,
}

impl DatanodeTableKey {
    /// The key of table `table_id` on node `node_id`.
    pub fn new(node_id: u64, table_id: u32) -> Self {
        DatanodeTableKey { node_id, table_id }
    }
}

impl MetaKey for DatanodeTableKey {
    const PREFIX: &'static str = "__datanode_table";

    fn encode(&self) -> Vec<u8> {
        format!(
            "{}/{:0nw$}/{:0tw$}",
            Self::PREFIX,
            self.node_id,
            self.table_id,
            nw = U64_WIDTH,
            tw = U32_WIDTH
        )
        .into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let [node, table] = segments(bytes, Self::PREFIX)?;
        Ok(DatanodeTableKey::new(
            parse_u64(bytes, node, "node id")?,
            parse_u32(bytes, table, "table id")?,
        ))
    }
}
