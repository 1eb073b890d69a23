//! `TableCache`: a node's cache of table infos and routes, kept current by the
//! leader's `InvalidateCache` pushes, with a TTL as the fallback for a push the node
//! missed (it was disconnected, or the leader changed).
//!
//! The two directions of a node's client stay apart (no cycle): the cache holds the
//! RPC client (it reads through it); the node's event loop (`HeartbeatTask`) holds an
//! [`InvalidatingHandler`], which holds the cache and the node's own handler. Neither
//! the client nor the cache holds the event loop.
//!
//! ```no_run
//! # use std::sync::Arc; use std::time::Duration;
//! # use meta_client::{MetaClient, HeartbeatTask, NodeIdentity, InstructionHandler, StatsProvider};
//! # use meta_client::table_cache::{TableCache, InvalidatingHandler};
//! # fn demo(client: MetaClient, identity: NodeIdentity, stats: Arc<dyn StatsProvider>, mine: Arc<dyn InstructionHandler>) {
//! let cache = TableCache::new(client.clone(), Duration::from_secs(600));
//! let handler = Arc::new(InvalidatingHandler::new(cache.clone(), mine));
//! let task = HeartbeatTask::start(client, identity, stats, handler);
//! // A new stream may follow missed pushes: start from a clean cache.
//! let _follow = cache.clear_on_reconnect(task.state());
//! # }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common_meta::Result;
use common_meta::model::table::{TableInfo, TableRoute};
use meta_proto::v1 as pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::MetaClient;
use crate::heartbeat::{HeartbeatState, InstructionHandler};

/// A table as cached: its info and route together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedTable {
    /// Its info.
    pub info: TableInfo,
    /// Its route.
    pub route: TableRoute,
}

#[derive(Default)]
struct Entries {
    /// Bumped by every invalidation and clear: a read that started before one must not
    /// put what it read into the cache (it may be what was just invalidated).
    generation: u64,
    /// `catalog.schema.table` -> id, with when it was read.
    names: HashMap<String, (u32, Instant)>,
    /// id -> table, with when it was read.
    tables: HashMap<u32, (Arc<CachedTable>, Instant)>,
}

/// See the module doc.
pub struct TableCache {
    client: MetaClient,
    ttl: Duration,
    entries: Mutex<Entries>,
    /// Reads that went to the server.
    fetches: AtomicU64,
}

impl TableCache {
    /// A cache reading through `client`, trusting an entry for at most `ttl`.
    pub fn new(client: MetaClient, ttl: Duration) -> Arc<Self> {
        Arc::new(TableCache {
            client,
            ttl,
            entries: Mutex::default(),
            fetches: AtomicU64::new(0),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        // Every critical section is one map update: never torn.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.ttl
    }

    /// Table `catalog.schema.table`, from the cache when it holds it.
    pub async fn table(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> Result<Arc<CachedTable>> {
        let name = format!("{catalog}.{schema}.{table}");
        let cached = self
            .entries()
            .names
            .get(&name)
            .filter(|(_, at)| self.fresh(*at))
            .map(|(id, _)| *id);
        if let Some(id) = cached {
            return self.table_by_id(id).await;
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let generation = self.entries().generation;
        let (info, route) = self.client.table(catalog, schema, table).await?;
        let id = info.id;
        let entry = Arc::new(CachedTable { info, route });
        let now = Instant::now();
        let mut entries = self.entries();
        if entries.generation == generation {
            entries.names.insert(name, (id, now));
            entries.tables.insert(id, (entry.clone(), now));
        }
        Ok(entry)
    }

    /// Table `id`, from the cache when it holds it.
    pub async fn table_by_id(&self, id: u32) -> Result<Arc<CachedTable>> {
        let cached = self
            .entries()
            .tables
            .get(&id)
            .filter(|(_, at)| self.fresh(*at))
            .map(|(table, _)| table.clone());
        if let Some(table) = cached {
            return Ok(table);
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let generation = self.entries().generation;
        let (info, route) = self.client.table_by_id(id).await?;
        let entry = Arc::new(CachedTable { info, route });
        let mut entries = self.entries();
        if entries.generation == generation {
            entries.tables.insert(id, (entry.clone(), Instant::now()));
        }
        Ok(entry)
    }

    /// Drops what is cached under `idents` (a schema drops every table in it).
    pub fn invalidate(&self, idents: &[pb::CacheIdent]) {
        use pb::cache_ident::Kind;
        let mut entries = self.entries();
        entries.generation += 1;
        for ident in idents {
            match &ident.kind {
                Some(Kind::TableId(id)) => {
                    entries.tables.remove(id);
                }
                Some(Kind::TableName(name)) => {
                    entries.names.remove(name);
                }
                Some(Kind::Schema(schema)) => {
                    let prefix = format!("{schema}.");
                    entries.names.retain(|name, _| !name.starts_with(&prefix));
                    entries.tables.retain(|_, (t, _)| {
                        format!("{}.{}", t.info.catalog, t.info.schema) != *schema
                    });
                }
                None => {}
            }
        }
    }

    /// Drops everything.
    pub fn clear(&self) {
        let mut entries = self.entries();
        let generation = entries.generation + 1;
        *entries = Entries {
            generation,
            ..Entries::default()
        };
    }

    /// Reads that went to the server since the cache was made.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Clears the cache every time the node's heartbeat task opens a new stream (it
    /// may have missed pushes while it had none), however quickly one stream follows
    /// another. Runs until the task's state ends or the returned handle is aborted.
    pub fn clear_on_reconnect(
        self: &Arc<Self>,
        mut state: watch::Receiver<HeartbeatState>,
    ) -> JoinHandle<()> {
        let cache = Arc::downgrade(self);
        // The stream the cache was filled on: read now, not when the task first runs.
        let mut seen = state.borrow_and_update().streams;
        tokio::spawn(async move {
            while state.changed().await.is_ok() {
                let streams = state.borrow_and_update().streams;
                if streams != seen {
                    seen = streams;
                    let Some(cache) = cache.upgrade() else { return };
                    cache.clear();
                }
            }
        })
    }
}

/// A node's instruction handler that first applies cache invalidations to a
/// [`TableCache`], and hands every other instruction to the node's own handler.
pub struct InvalidatingHandler {
    cache: Arc<TableCache>,
    inner: Arc<dyn InstructionHandler>,
}

impl InvalidatingHandler {
    /// Invalidates `cache`, passing other instructions to `inner`.
    pub fn new(cache: Arc<TableCache>, inner: Arc<dyn InstructionHandler>) -> Self {
        InvalidatingHandler { cache, inner }
    }
}

#[async_trait]
impl InstructionHandler for InvalidatingHandler {
    async fn handle(
        &self,
        instruction: pb::Instruction,
    ) -> std::result::Result<Vec<pb::RegionOutcome>, String> {
        if let Some(pb::instruction::Kind::InvalidateCache(invalidate)) = &instruction.kind {
            self.cache.invalidate(&invalidate.idents);
        }
        // The node may keep caches of its own: it sees invalidations too.
        self.inner.handle(instruction).await
    }
}
