//! The range route catalog in the store: `__route/version`, `__route/next_id` and one
//! `__route/r/{route_id:020}` per route (JSON of
//! [`RouteDescriptor`](crate::model::route::RouteDescriptor)); see `key.rs`.
//!
//! While nothing is stored the catalog reads as the built-in version 1
//! ([`RouteCatalog::initial`]: one route over everything on the initial group), so a new
//! cluster writes nothing until the catalog first changes; the first save writes
//! version 2 with all its routes.
//!
//! Every save is one transaction that compares the stored version with the one the
//! change was made from and moves it by exactly one, after checking the invariants of
//! the whole new catalog: two writers racing, one wins and the other gets
//! [`SaveOutcome::Conflict`] (a value, not an error) and starts again from a fresh load.
//! The version key is written first in the transaction, so a watcher sees it with the
//! route changes of the same revision (`RouteTable`).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::key::{
    ROUTE_ITEM_PREFIX, ROUTE_NEXT_ID_KEY, ROUTE_PREFIX, ROUTE_VERSION_KEY, route_key,
};
use crate::kv::{
    Compare, CompareOp, CompareTarget, DeleteRangeRequest, KvBackend, PutRequest, RangeRequest,
    TxnOp, TxnOpResponse, TxnRequest,
};
use crate::model::route::{RouteCatalog, RouteDescriptor};

use super::{from_json, to_json};

/// What a save did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Saved as this version.
    Saved(u64),
    /// The stored catalog was at another version: nothing was written.
    Conflict {
        /// The version found.
        current: u64,
    },
}

/// Reads and saves the route catalog.
#[derive(Clone)]
pub struct RouteCatalogManager {
    kv: Arc<dyn KvBackend>,
    initial_group: u64,
}

fn decimal(key: &[u8], bytes: &[u8]) -> Result<u64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| Error::Corrupted {
            location: String::from_utf8_lossy(key).into_owned(),
            reason: format!("not a number: {:?}", String::from_utf8_lossy(bytes)),
        })
}

/// One stored entry of the catalog, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `__route/version`.
    Version(u64),
    /// `__route/next_id`.
    NextId(u64),
    /// `__route/r/{id}`: the route, or `None` when deleted.
    Route(u64, Option<RouteDescriptor>),
    /// A key outside the catalog.
    Other,
}

/// Decodes one watched or read entry of the catalog (`value: None`: deleted).
pub fn decode_entry(key: &[u8], value: Option<&[u8]>) -> Result<Entry> {
    Ok(if key == ROUTE_VERSION_KEY {
        Entry::Version(value.map(|v| decimal(key, v)).transpose()?.unwrap_or(0))
    } else if key == ROUTE_NEXT_ID_KEY {
        Entry::NextId(value.map(|v| decimal(key, v)).transpose()?.unwrap_or(0))
    } else if let Some(id) = key.strip_prefix(ROUTE_ITEM_PREFIX) {
        let route = value
            .map(|value| from_json::<RouteDescriptor>(key, value))
            .transpose()?;
        Entry::Route(decimal(key, id)?, route)
    } else {
        Entry::Other
    })
}

impl RouteCatalogManager {
    /// A manager over `kv`, whose built-in first catalog is on group 1.
    pub fn new(kv: Arc<dyn KvBackend>) -> Self {
        RouteCatalogManager {
            kv,
            initial_group: 1,
        }
    }

    /// The same, with the built-in first catalog on `group_id` (`[routes]
    /// initial_group`).
    pub fn with_initial_group(mut self, group_id: u64) -> Self {
        self.initial_group = group_id;
        self
    }

    /// The store the catalog is in.
    pub fn kv(&self) -> Arc<dyn KvBackend> {
        self.kv.clone()
    }

    /// The group of the built-in first catalog.
    pub fn initial_group(&self) -> u64 {
        self.initial_group
    }

    /// The catalog now and the store revision it was read at (one read, so one
    /// version).
    pub async fn load(&self) -> Result<(RouteCatalog, i64)> {
        let read = self.kv.range(RangeRequest::prefix(ROUTE_PREFIX)).await?;
        if !read.kvs.iter().any(|kv| kv.key == ROUTE_VERSION_KEY) {
            return Ok((RouteCatalog::initial(self.initial_group), read.revision));
        }
        let mut catalog = RouteCatalog::default();
        for kv in &read.kvs {
            // One read: every key once, so routes are only added.
            match decode_entry(&kv.key, Some(&kv.value))? {
                Entry::Version(version) => catalog.version = version,
                Entry::NextId(next) => catalog.next_id = next,
                Entry::Route(_, Some(route)) => catalog.routes.push(route),
                Entry::Route(_, None) | Entry::Other => {}
            }
        }
        catalog.sort();
        Ok((catalog, read.revision))
    }

    /// The catalog's version now (one small read; 1 while nothing is stored).
    pub async fn version(&self) -> Result<u64> {
        let read = self
            .kv
            .range(RangeRequest::key(ROUTE_VERSION_KEY.to_vec()))
            .await?;
        match read.kvs.first() {
            Some(kv) => decimal(&kv.key, &kv.value),
            None => Ok(1),
        }
    }

    /// Saves `next` as the version after `base` (the catalog it was made from): its
    /// invariants checked, only changed routes written.
    pub async fn save(&self, base: &RouteCatalog, mut next: RouteCatalog) -> Result<SaveOutcome> {
        next.version = base.version + 1;
        next.sort();
        next.check()?;
        let expected = if base.is_initial() {
            CompareTarget::CreateRevision(0)
        } else {
            CompareTarget::Value(base.version.to_string().into_bytes())
        };
        let mut success = vec![TxnOp::Put(PutRequest::new(
            ROUTE_VERSION_KEY.to_vec(),
            next.version.to_string().into_bytes(),
        ))];
        if base.is_initial() || next.next_id != base.next_id {
            success.push(TxnOp::Put(PutRequest::new(
                ROUTE_NEXT_ID_KEY.to_vec(),
                next.next_id.to_string().into_bytes(),
            )));
        }
        // By id, so a diff of a large catalog costs O(n), not O(n^2).
        let before: std::collections::HashMap<u64, &RouteDescriptor> =
            base.routes.iter().map(|r| (r.route_id, r)).collect();
        let after: std::collections::HashSet<u64> =
            next.routes.iter().map(|r| r.route_id).collect();
        for route in &next.routes {
            // Nothing of the built-in first version is stored: write every route.
            if base.is_initial() || before.get(&route.route_id) != Some(&route) {
                success.push(TxnOp::Put(PutRequest::new(
                    route_key(route.route_id),
                    to_json(route)?,
                )));
            }
        }
        for route in base.routes.iter().filter(|_| !base.is_initial()) {
            if !after.contains(&route.route_id) {
                success.push(TxnOp::DeleteRange(DeleteRangeRequest::key(route_key(
                    route.route_id,
                ))));
            }
        }
        let txn = TxnRequest {
            compare: vec![Compare::new(
                ROUTE_VERSION_KEY.to_vec(),
                CompareOp::Equal,
                expected,
            )],
            success,
            failure: vec![TxnOp::Range(RangeRequest::key(ROUTE_VERSION_KEY.to_vec()))],
        };
        let answer = self.kv.txn(txn).await?;
        if answer.succeeded {
            return Ok(SaveOutcome::Saved(next.version));
        }
        let current = match answer.responses.first() {
            Some(TxnOpResponse::Range(r)) => match r.kvs.first() {
                Some(kv) => decimal(&kv.key, &kv.value)?,
                None => 0,
            },
            _ => 0,
        };
        Ok(SaveOutcome::Conflict { current })
    }

    /// Applies `change` to the newest catalog and saves the result; when another save
    /// won meanwhile, starts again from a fresh load (so no change is lost). Returns
    /// the catalog as saved. A change that refuses (bad input) writes nothing.
    pub async fn update(
        &self,
        change: impl Fn(&RouteCatalog) -> Result<RouteCatalog>,
    ) -> Result<RouteCatalog> {
        loop {
            let (base, _) = self.load().await?;
            let mut next = change(&base)?;
            if let SaveOutcome::Saved(version) = self.save(&base, next.clone()).await? {
                next.version = version;
                next.sort();
                return Ok(next);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryKvBackend;

    #[tokio::test]
    async fn saves_move_the_version_by_one_and_a_lost_race_is_a_value() {
        let kv: Arc<dyn KvBackend> =
            Arc::new(MemoryKvBackend::new(crate::kv::KvLimits::default()).unwrap());
        let routes = RouteCatalogManager::new(kv.clone());
        let routes = routes.with_initial_group(7);
        // Built in: version 1, one route on the initial group, nothing written.
        let (first, revision) = routes.load().await.unwrap();
        assert_eq!((first.version, revision), (1, 0));
        assert_eq!(first.routes.len(), 1);
        assert_eq!(first.owner(b"anything").unwrap().group_id, 7);

        // A split at "m": two children with new ids, the parent recorded.
        let split = first.split_at(b"m").unwrap();
        assert_eq!(
            routes.save(&first, split.clone()).await.unwrap(),
            SaveOutcome::Saved(2)
        );
        let (now, _) = routes.load().await.unwrap();
        assert_eq!(now.version, 2);
        assert!(now.routes.iter().all(|r| r.group_id == 7));
        assert_eq!(
            now.routes.iter().map(|r| r.route_id).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(now.next_id, 4);

        // A writer still holding version 1 loses, and nothing changes.
        assert_eq!(
            routes.save(&first, split.clone()).await.unwrap(),
            SaveOutcome::Conflict { current: 2 }
        );
        // An overlapping catalog is refused before anything is written.
        let mut overlapping = now.clone();
        overlapping.routes[0].end = Some(b"z".to_vec());
        let err = routes
            .save(&now, overlapping)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlap"), "{err}");
        assert_eq!(routes.load().await.unwrap().0, now);

        // Two writers at once: both splits land, one after the other.
        let (a, b) = tokio::join!(
            routes.update(|c| c.split_at(b"c")),
            routes.update(|c| c.split_at(b"x"))
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.version.max(b.version), 4);
        let (last, _) = routes.load().await.unwrap();
        assert_eq!(last.routes.len(), 4, "no split lost: {:?}", last.routes);
        let err = routes.update(|c| c.split_at(b"c")).await.unwrap_err();
        assert!(err.to_string().contains("is the start of route"), "{err}");
        assert_eq!(
            routes.load().await.unwrap().0,
            last,
            "a refused change writes nothing"
        );
    }
}
