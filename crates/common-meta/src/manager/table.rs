//! `TableMetadataManager`: a table's keys changed together.
//!
//! A table is four kinds of keys: its name (`__table_name`, what makes it visible),
//! its info, its route, and one `__datanode_table` key per node holding its regions.
//!
//! - **Create** writes them all in one transaction that requires the name and the info
//!   to be absent and the schema to exist. Running it again with the same values succeeds (a recovered
//!   procedure repeats its last step); a different table under the name is
//!   [`CreateOutcome::Exists`]. When the keys are more than one transaction may hold
//!   (`max_txn_ops`), the per-node keys are written first in chunks and the name, info
//!   and route last in one transaction: the table is never visible half-written (the
//!   caller holds the procedure's lock on the name meanwhile).
//! - **Drop** moves every key to `__tombstone/{key}` (name, info and route first, in
//!   one transaction: the table disappears at once), **restore** moves them back (name
//!   last), **purge** deletes the tombstones. Each is idempotent.
//! - **Rename**, **update info** and **update route** compare the current value (the
//!   bytes read, see [`Versioned`]); a lost race answers `false`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::Result;
use crate::key::{
    DatanodeTableKey, MetaKey, SchemaKey, TableInfoKey, TableNameKey, TableRouteKey, tombstone,
};
use crate::kv::{
    BatchGetRequest, Compare, CompareOp, CompareTarget, DeleteRangeRequest, KvBackend, PutRequest,
    RangeRequest, TxnOp, TxnOpResponse, TxnRequest,
};
use crate::model::table::{DatanodeTable, TableInfo, TableNameValue, TableRoute};

use super::catalog::{absent, is_default};
use super::{from_json, to_json};

/// A value with the exact bytes it was read as: the operand of a later compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The decoded value.
    pub value: T,
    /// The bytes in the store.
    pub raw: Vec<u8>,
}

/// What a create found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The table is there as asked (created now, or by an earlier run of the same
    /// create).
    Created,
    /// Another table holds the name: its id.
    Exists(u32),
}

/// Reads and writes tables' keys; see the module doc.
#[derive(Clone)]
pub struct TableMetadataManager {
    kv: Arc<dyn KvBackend>,
    max_txn_ops: usize,
}

/// How a manager read is served.
#[derive(Debug, Clone, Copy)]
enum Read {
    /// Through the store's linearizable read.
    Linearizable,
    /// From this member's applied state.
    Local,
}

/// A table's keys: (name, info and route; the per-node keys).
type TableKeys = (Vec<Vec<u8>>, Vec<Vec<u8>>);

fn name_key(info: &TableInfo) -> Result<Vec<u8>> {
    Ok(info.name_key()?.encode())
}

impl TableMetadataManager {
    /// A manager over `kv`, writing at most `max_txn_ops` operations per transaction
    /// (the store's limit).
    pub fn new(kv: Arc<dyn KvBackend>, max_txn_ops: usize) -> Self {
        TableMetadataManager {
            kv,
            // A create needs at least its name, info and route in one transaction.
            max_txn_ops: max_txn_ops.max(3),
        }
    }

    /// The id of table `catalog.schema.table`, if it exists.
    pub async fn table_id(&self, catalog: &str, schema: &str, table: &str) -> Result<Option<u32>> {
        self.name_of(catalog, schema, table, Read::Linearizable)
            .await
    }

    /// Like [`TableMetadataManager::table_id`], from this member's own applied state
    /// (serializable: no quorum round trip). Right on the leader for a writer that
    /// holds the name's procedure lock (whoever held it before committed, and the
    /// leader applies a commit before answering it); a check, never the guard: the
    /// create's compare is.
    pub async fn table_id_local(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> Result<Option<u32>> {
        self.name_of(catalog, schema, table, Read::Local).await
    }

    async fn name_of(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
        read: Read,
    ) -> Result<Option<u32>> {
        let key = TableNameKey::new(catalog, schema, table)?.encode();
        let name: Option<Versioned<TableNameValue>> = self.versioned(key, read).await?;
        Ok(name.map(|n| n.value.table_id))
    }

    /// The value at `key`, with its bytes.
    async fn versioned<T: serde::de::DeserializeOwned>(
        &self,
        key: Vec<u8>,
        read: Read,
    ) -> Result<Option<Versioned<T>>> {
        let found = match read {
            Read::Linearizable => self.kv.get(&key).await?,
            Read::Local => self
                .kv
                .range_serializable(RangeRequest::key(key.clone()))
                .await?
                .kvs
                .into_iter()
                .next(),
        };
        match found {
            Some(kv) => Ok(Some(Versioned {
                value: from_json(&key, &kv.value)?,
                raw: kv.value,
            })),
            None => Ok(None),
        }
    }

    /// Table `id`'s info and route from this member's applied state (see
    /// [`TableMetadataManager::table_id_local`] for when that is right).
    pub async fn table_local(
        &self,
        id: u32,
    ) -> Result<(Option<Versioned<TableInfo>>, Option<Versioned<TableRoute>>)> {
        let info = self
            .versioned(TableInfoKey::new(id).encode(), Read::Local)
            .await?;
        let route = self
            .versioned(TableRouteKey::new(id).encode(), Read::Local)
            .await?;
        Ok((info, route))
    }

    /// Table `id`'s info.
    pub async fn table_info(&self, id: u32) -> Result<Option<Versioned<TableInfo>>> {
        self.versioned(TableInfoKey::new(id).encode(), Read::Linearizable)
            .await
    }

    /// Table `id`'s route.
    pub async fn table_route(&self, id: u32) -> Result<Option<Versioned<TableRoute>>> {
        self.versioned(TableRouteKey::new(id).encode(), Read::Linearizable)
            .await
    }

    /// Every table of `catalog.schema` (of every schema of `catalog` for `None`), by
    /// name.
    pub async fn tables(&self, catalog: &str, schema: Option<&str>) -> Result<Vec<TableInfo>> {
        let prefix = match schema {
            Some(schema) => {
                crate::key::SchemaKey::new(catalog, schema)?;
                format!("{}/{catalog}/{schema}/", TableNameKey::PREFIX)
            }
            None => {
                crate::key::CatalogKey::new(catalog)?;
                format!("{}/{catalog}/", TableNameKey::PREFIX)
            }
        };
        let names = self
            .kv
            .range(RangeRequest::prefix(prefix.into_bytes()))
            .await?;
        let mut keys = Vec::with_capacity(names.kvs.len());
        for kv in &names.kvs {
            let id = from_json::<TableNameValue>(&kv.key, &kv.value)?.table_id;
            keys.push(TableInfoKey::new(id).encode());
        }
        let mut out = Vec::with_capacity(keys.len());
        // Read in chunks a transaction may hold.
        for chunk in keys.chunks(self.max_txn_ops) {
            let infos = self
                .kv
                .batch_get(BatchGetRequest {
                    keys: chunk.to_vec(),
                })
                .await?;
            for kv in infos.kvs {
                out.push(from_json::<TableInfo>(&kv.key, &kv.value)?);
            }
        }
        out.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        Ok(out)
    }

    /// The tables with regions on node `node`, by table id.
    pub async fn datanode_tables(&self, node: u64) -> Result<BTreeMap<u32, DatanodeTable>> {
        let prefix = format!("{}/{node:020}/", DatanodeTableKey::PREFIX);
        let response = self
            .kv
            .range(RangeRequest::prefix(prefix.into_bytes()))
            .await?;
        let mut out = BTreeMap::new();
        for kv in response.kvs {
            let key = DatanodeTableKey::decode(&kv.key)?;
            out.insert(key.table_id, from_json(&kv.key, &kv.value)?);
        }
        Ok(out)
    }

    /// Creates table `info` with `route`; see the module doc.
    pub async fn create_table(
        &self,
        info: &TableInfo,
        route: &TableRoute,
    ) -> Result<CreateOutcome> {
        let name = name_key(info)?;
        let info_key = TableInfoKey::new(info.id).encode();
        let mut node_puts = Vec::new();
        for (node, table) in route.datanode_tables(info) {
            node_puts.push(TxnOp::Put(PutRequest::new(
                DatanodeTableKey::new(node, info.id).encode(),
                to_json(&table)?,
            )));
        }
        let mut success = vec![
            TxnOp::Put(PutRequest::new(
                name.clone(),
                to_json(&TableNameValue { table_id: info.id })?,
            )),
            TxnOp::Put(PutRequest::new(info_key.clone(), to_json(info)?)),
            TxnOp::Put(PutRequest::new(
                TableRouteKey::new(info.id).encode(),
                to_json(route)?,
            )),
        ];
        let written_ahead = success.len() + node_puts.len() > self.max_txn_ops;
        if !written_ahead {
            success.append(&mut node_puts);
        } else {
            // Invisible until the name exists; the name's lock keeps others out.
            for chunk in node_puts.chunks(self.max_txn_ops) {
                self.write(chunk.to_vec()).await?;
            }
        }
        let mut compare = vec![absent(&name), absent(&info_key)];
        // The schema must still exist (the built-in default always does): a drop of
        // the database that won the race leaves no table behind in it.
        let schema_key = SchemaKey::new(&info.catalog, &info.schema)?.encode();
        let builtin = is_default(&info.catalog, &info.schema);
        if !builtin {
            compare.push(Compare::new(
                schema_key.clone(),
                CompareOp::Greater,
                CompareTarget::CreateRevision(0),
            ));
        }
        let txn = TxnRequest {
            compare,
            success,
            failure: vec![
                TxnOp::Range(RangeRequest::key(name.clone())),
                TxnOp::Range(RangeRequest::key(info_key.clone())),
                TxnOp::Range(RangeRequest::key(schema_key)),
            ],
        };
        let response = self.kv.txn(txn).await?;
        if response.succeeded {
            return Ok(CreateOutcome::Created);
        }
        let found = |i: usize| match response.responses.get(i) {
            Some(TxnOpResponse::Range(r)) => r.kvs.first().map(|kv| kv.value.clone()),
            _ => None,
        };
        // Table ids are never reused: info under this id means an earlier run of this
        // very create committed (the table may have been altered or renamed since).
        if found(1).is_some() {
            return Ok(CreateOutcome::Created);
        }
        // Nothing of this create is kept: per-node keys written ahead in chunks go.
        if written_ahead {
            let ops: Vec<TxnOp> = route
                .datanode_tables(info)
                .into_keys()
                .map(|node| {
                    TxnOp::DeleteRange(DeleteRangeRequest::key(
                        DatanodeTableKey::new(node, info.id).encode(),
                    ))
                })
                .collect();
            for chunk in ops.chunks(self.max_txn_ops) {
                self.write(chunk.to_vec()).await?;
            }
        }
        if !builtin && found(2).is_none() {
            return Err(crate::Error::NotFound {
                what: format!("schema {}.{}", info.catalog, info.schema),
            });
        }
        match found(0) {
            Some(bytes) => Ok(CreateOutcome::Exists(
                from_json::<TableNameValue>(&name, &bytes)?.table_id,
            )),
            // Neither the name nor the info: the compare failed on neither (a race
            // with a drop of the name between the two): let the caller try again.
            None => Err(crate::Error::Unavailable {
                message: format!(
                    "table {}.{}.{} changed while it was created; retry",
                    info.catalog, info.schema, info.name
                ),
            }),
        }
    }

    /// Whether table `id` has no info, decided by a write: a transaction through the
    /// log that fails when the info exists. Any earlier write of this leader that could
    /// still commit is ordered before it, so `true` means the table was not created
    /// and will not be by an earlier attempt (what a rollback must know before it
    /// drops regions).
    pub async fn fence_absent(&self, id: u32) -> Result<bool> {
        let info_key = TableInfoKey::new(id).encode();
        let txn = TxnRequest {
            compare: vec![absent(&info_key)],
            // A write that changes nothing, so the transaction goes through the log.
            success: vec![TxnOp::DeleteRange(DeleteRangeRequest::key(
                crate::key::FENCE_KEY.as_bytes().to_vec(),
            ))],
            failure: vec![],
        };
        Ok(self.kv.txn(txn).await?.succeeded)
    }

    async fn write(&self, ops: Vec<TxnOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        self.kv
            .txn(TxnRequest {
                compare: vec![],
                success: ops,
                failure: vec![],
            })
            .await?;
        Ok(())
    }

    /// The keys of a table: name, info and route first, then the per-node keys.
    fn keys_of(info: &TableInfo, route: &TableRoute) -> Result<TableKeys> {
        let head = vec![
            name_key(info)?,
            TableInfoKey::new(info.id).encode(),
            TableRouteKey::new(info.id).encode(),
        ];
        let nodes = route
            .datanode_tables(info)
            .into_keys()
            .map(|node| DatanodeTableKey::new(node, info.id).encode())
            .collect();
        Ok((head, nodes))
    }

    /// Moves each `from` key that exists to its `to` key, at most a transaction's worth
    /// at a time.
    async fn move_keys(&self, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        let per_txn = (self.max_txn_ops / 2).max(1);
        for chunk in pairs.chunks(per_txn) {
            let found = self
                .kv
                .batch_get(BatchGetRequest {
                    keys: chunk.iter().map(|(from, _)| from.clone()).collect(),
                })
                .await?;
            let mut ops = Vec::new();
            for kv in found.kvs {
                let Some((_, to)) = chunk.iter().find(|(from, _)| *from == kv.key) else {
                    continue;
                };
                ops.push(TxnOp::Put(PutRequest::new(to.clone(), kv.value)));
                ops.push(TxnOp::DeleteRange(DeleteRangeRequest::key(kv.key)));
            }
            self.write(ops).await?;
        }
        Ok(())
    }

    /// Moves the table's keys to tombstones: it is gone for readers, and
    /// [`TableMetadataManager::restore_table`] can bring it back.
    pub async fn tombstone_table(&self, info: &TableInfo, route: &TableRoute) -> Result<()> {
        let (mut head, nodes) = Self::keys_of(info, route)?;
        // The name moves only while it still names this table: a table created under
        // the name since (after this drop's first run) keeps it.
        let name = head[0].clone();
        if let Some(kv) = self.kv.get(&name).await?
            && from_json::<TableNameValue>(&name, &kv.value)?.table_id != info.id
        {
            head.remove(0);
        }
        let to_tomb = |keys: Vec<Vec<u8>>| {
            keys.into_iter()
                .map(|k| {
                    let t = tombstone(&k);
                    (k, t)
                })
                .collect::<Vec<_>>()
        };
        if 2 * (head.len() + nodes.len()) <= self.max_txn_ops {
            // All in one transaction.
            head.extend(nodes);
            return self.move_keys(to_tomb(head)).await;
        }
        // The name goes first: the table disappears in one step.
        self.move_keys(to_tomb(head)).await?;
        self.move_keys(to_tomb(nodes)).await
    }

    /// Puts a tombstoned table back (the name last, so it reappears whole).
    pub async fn restore_table(&self, info: &TableInfo, route: &TableRoute) -> Result<()> {
        let (mut head, mut nodes) = Self::keys_of(info, route)?;
        // A table created under the name meanwhile keeps it; this one stays nameless
        // (its tombstoned name is purged with the rest).
        if self.kv.get(&head[0]).await?.is_some() {
            head.remove(0);
        }
        let from_tomb = |keys: Vec<Vec<u8>>| {
            keys.into_iter()
                .map(|k| (tombstone(&k), k))
                .collect::<Vec<_>>()
        };
        if 2 * (head.len() + nodes.len()) <= self.max_txn_ops {
            nodes.extend(head);
            return self.move_keys(from_tomb(nodes)).await;
        }
        self.move_keys(from_tomb(nodes)).await?;
        self.move_keys(from_tomb(head)).await
    }

    /// Deletes a dropped table's tombstones: the drop is final.
    pub async fn purge_table(&self, info: &TableInfo, route: &TableRoute) -> Result<()> {
        let (mut keys, nodes) = Self::keys_of(info, route)?;
        keys.extend(nodes);
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::DeleteRange(DeleteRangeRequest::key(tombstone(k))))
            .collect();
        for chunk in ops.chunks(self.max_txn_ops) {
            self.write(chunk.to_vec()).await?;
        }
        Ok(())
    }

    /// Renames the table whose info is `current` to `new_name` in its schema (info
    /// version + 1). False when the info changed meanwhile or the new name is taken.
    pub async fn rename_table(
        &self,
        current: &Versioned<TableInfo>,
        new_name: &str,
        now_ms: u64,
    ) -> Result<bool> {
        let old = &current.value;
        let mut renamed = old.clone();
        renamed.name = new_name.to_string();
        renamed.version += 1;
        renamed.updated_ms = now_ms;
        let new_key = name_key(&renamed)?;
        let info_key = TableInfoKey::new(old.id).encode();
        let txn = TxnRequest {
            compare: vec![value_is(&info_key, &current.raw), absent(&new_key)],
            success: vec![
                TxnOp::DeleteRange(DeleteRangeRequest::key(name_key(old)?)),
                TxnOp::Put(PutRequest::new(
                    new_key,
                    to_json(&TableNameValue { table_id: old.id })?,
                )),
                TxnOp::Put(PutRequest::new(info_key, to_json(&renamed)?)),
            ],
            failure: vec![],
        };
        Ok(self.kv.txn(txn).await?.succeeded)
    }

    /// Replaces the info `current` with `new` (same id and name); false when it changed
    /// meanwhile.
    pub async fn update_table_info(
        &self,
        current: &Versioned<TableInfo>,
        new: &TableInfo,
    ) -> Result<bool> {
        let key = TableInfoKey::new(current.value.id).encode();
        let txn = TxnRequest {
            compare: vec![value_is(&key, &current.raw)],
            success: vec![TxnOp::Put(PutRequest::new(key, to_json(new)?))],
            failure: vec![],
        };
        Ok(self.kv.txn(txn).await?.succeeded)
    }

    /// Replaces route `current` of table `info` with `new` (its version must be
    /// `current`'s + 1), moving the per-node keys along in the same transaction; false
    /// when the route changed meanwhile.
    pub async fn update_table_route(
        &self,
        info: &TableInfo,
        current: &Versioned<TableRoute>,
        new: &TableRoute,
    ) -> Result<bool> {
        if new.version != current.value.version + 1 {
            return Err(crate::Error::invalid_argument(format!(
                "a new route of table {} must have version {}, not {}",
                info.id,
                current.value.version + 1,
                new.version
            )));
        }
        let key = TableRouteKey::new(info.id).encode();
        let before = current.value.datanode_tables(info);
        let after = new.datanode_tables(info);
        let mut success = vec![TxnOp::Put(PutRequest::new(key.clone(), to_json(new)?))];
        for node in before.keys().filter(|n| !after.contains_key(n)) {
            success.push(TxnOp::DeleteRange(DeleteRangeRequest::key(
                DatanodeTableKey::new(*node, info.id).encode(),
            )));
        }
        for (node, table) in &after {
            if before.get(node) != Some(table) {
                success.push(TxnOp::Put(PutRequest::new(
                    DatanodeTableKey::new(*node, info.id).encode(),
                    to_json(table)?,
                )));
            }
        }
        let txn = TxnRequest {
            compare: vec![value_is(&key, &current.raw)],
            success,
            failure: vec![],
        };
        Ok(self.kv.txn(txn).await?.succeeded)
    }
}

fn value_is(key: &[u8], raw: &[u8]) -> Compare {
    Compare::new(
        key.to_vec(),
        CompareOp::Equal,
        CompareTarget::Value(raw.to_vec()),
    )
}

#[cfg(test)]
mod tests;
