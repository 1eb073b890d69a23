//! `RouteTable`: the range route catalog in memory, kept current by a watch on the
//! catalog's keys (not by polling), with the last [`RING`] versions kept so a caller
//! can ask who owned a key at a version it saw before.
//!
//! It loads the catalog once, then watches `__route/` from the next revision. Every
//! save is one transaction, so one revision; a watch response holds all events of a
//! revision, so each revision's events are applied to a copy of the newest version and
//! the result installed as the next version: every saved version is seen, in order,
//! without gaps. A broken or compacted watch reloads and watches again (the ring then
//! may lack the versions in between: [`OwnerAt::Evicted`] for them).
//!
//! Versions are persistent maps (routes by start key, and start keys by id) that share
//! what did not change: a copy costs O(1), a change and a lookup O(log n), and the ring
//! of a catalog of 100,000 routes holds one catalog's memory plus what its last
//! versions changed.

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use imbl::{HashMap as SharedMap, OrdMap};
use tokio::sync::watch;

use crate::error::Result;
use crate::key::ROUTE_PREFIX;
use crate::kv::{EventKind, KvBackend, WatchRequest, WatchResponse};
use crate::manager::route::{Entry, RouteCatalogManager, decode_entry};
use crate::model::route::{RouteCatalog, RouteDescriptor};

/// Versions kept.
pub const RING: usize = 32;

/// Who owned a key at a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerAt {
    /// The route owning it then (`None`: no route covered it).
    Owner(Option<RouteDescriptor>),
    /// The version is older than the ring keeps (or was never seen here).
    Evicted,
    /// The version is newer than what this table has seen.
    Unknown,
}

/// One version of the catalog, sharing what did not change with its neighbours.
#[derive(Clone, Default)]
struct Version {
    version: u64,
    next_id: u64,
    /// Routes by start key.
    routes: OrdMap<Vec<u8>, Arc<RouteDescriptor>>,
    /// Start keys by route id.
    starts: SharedMap<u64, Vec<u8>>,
}

impl Version {
    fn from_catalog(catalog: &RouteCatalog) -> Version {
        let mut version = Version {
            version: catalog.version,
            next_id: catalog.next_id,
            ..Version::default()
        };
        for route in &catalog.routes {
            version.put(route.clone());
        }
        version
    }

    fn put(&mut self, route: RouteDescriptor) {
        self.remove(route.route_id);
        self.starts.insert(route.route_id, route.start.clone());
        self.routes.insert(route.start.clone(), Arc::new(route));
    }

    fn remove(&mut self, id: u64) {
        if let Some(start) = self.starts.remove(&id)
            && self.routes.get(&start).is_some_and(|r| r.route_id == id)
        {
            self.routes.remove(&start);
        }
    }

    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Version(version) => self.version = version,
            Entry::NextId(next) => self.next_id = next,
            Entry::Route(id, Some(route)) if route.route_id == id => self.put(route),
            Entry::Route(id, _) => self.remove(id),
            Entry::Other => {}
        }
    }

    /// The route owning `key`, in O(log n).
    fn owner(&self, key: &[u8]) -> Option<RouteDescriptor> {
        self.routes
            .range(..=key.to_vec())
            .next_back()
            .map(|(_, route)| route)
            .filter(|route| route.contains(key))
            .map(|route| (**route).clone())
    }

    fn catalog(&self) -> RouteCatalog {
        RouteCatalog {
            version: self.version,
            next_id: self.next_id,
            routes: self.routes.values().map(|r| (**r).clone()).collect(),
        }
    }
}

/// The versions kept, oldest first.
type Ring = VecDeque<Arc<Version>>;

/// The route catalog in memory, following the store.
pub struct RouteTable {
    ring: Arc<RwLock<Ring>>,
    versions: watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteTable")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl Drop for RouteTable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn read(ring: &RwLock<Ring>) -> std::sync::RwLockReadGuard<'_, Ring> {
    // Only whole-value updates happen under the lock: never torn.
    ring.read().unwrap_or_else(PoisonError::into_inner)
}

/// Adds `version` as the newest when it is newer; returns whether it was.
fn install(ring: &RwLock<Ring>, versions: &watch::Sender<u64>, version: Version) -> bool {
    let number = version.version;
    {
        let mut ring = ring.write().unwrap_or_else(PoisonError::into_inner);
        if ring.back().is_some_and(|newest| newest.version >= number) {
            return false;
        }
        ring.push_back(Arc::new(version));
        while ring.len() > RING {
            ring.pop_front();
        }
    }
    let _ = versions.send(number);
    true
}

impl RouteTable {
    /// Loads the catalog from `kv` and follows it from then on (a cluster whose
    /// catalog never changed reads as the built-in first version on group 1).
    pub async fn follow(kv: Arc<dyn KvBackend>) -> Result<RouteTable> {
        Self::follow_with(kv, 1).await
    }

    /// [`RouteTable::follow`] for a cluster whose `[routes] initial_group` is
    /// `initial_group`.
    pub async fn follow_with(kv: Arc<dyn KvBackend>, initial_group: u64) -> Result<RouteTable> {
        let manager = RouteCatalogManager::new(kv.clone()).with_initial_group(initial_group);
        let (catalog, revision) = manager.load().await?;
        let (sender, versions) = watch::channel(catalog.version);
        let first = Arc::new(Version::from_catalog(&catalog));
        let ring = Arc::new(RwLock::new(VecDeque::from([first])));
        let task = tokio::spawn(follow(kv, manager, ring.clone(), sender, revision + 1));
        Ok(RouteTable {
            ring,
            versions,
            task,
        })
    }

    fn newest(&self) -> Arc<Version> {
        // The ring always holds at least the loaded version.
        read(&self.ring).back().cloned().unwrap_or_default()
    }

    /// The newest version seen, as a whole catalog (built on each call: O(n)).
    pub fn current(&self) -> Arc<RouteCatalog> {
        Arc::new(self.newest().catalog())
    }

    /// The newest version's number.
    pub fn version(&self) -> u64 {
        self.newest().version
    }

    /// The number of routes in the newest version.
    pub fn len(&self) -> usize {
        self.newest().routes.len()
    }

    /// Whether the newest version has no route.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The route owning `key` in the newest version, in O(log n).
    pub fn owner_of(&self, key: &[u8]) -> Option<RouteDescriptor> {
        self.newest().owner(key)
    }

    /// Route `id` in the newest version, with that version's number, in O(log n).
    pub fn route(&self, id: u64) -> (Option<RouteDescriptor>, u64) {
        let newest = self.newest();
        let route = newest
            .starts
            .get(&id)
            .and_then(|start| newest.routes.get(start))
            .filter(|route| route.route_id == id)
            .map(|route| (**route).clone());
        (route, newest.version)
    }

    /// The route that owned `key` at `version`.
    pub fn owner_at(&self, key: &[u8], version: u64) -> OwnerAt {
        let ring = read(&self.ring);
        if ring.back().is_none_or(|newest| version > newest.version) {
            return OwnerAt::Unknown;
        }
        match ring.iter().find(|c| c.version == version) {
            Some(kept) => OwnerAt::Owner(kept.owner(key)),
            None => OwnerAt::Evicted,
        }
    }

    /// The versions kept, oldest first.
    pub fn kept(&self) -> Vec<u64> {
        read(&self.ring).iter().map(|c| c.version).collect()
    }

    /// Waits until the table has seen `version` (or a later one), up to `patience`;
    /// whether it has.
    pub async fn wait_for(&self, version: u64, patience: Duration) -> bool {
        let mut versions = self.versions.clone();
        tokio::time::timeout(patience, versions.wait_for(|v| *v >= version))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }
}

/// Applies every saved version from a watch starting at `from`; reloads and watches
/// again when the watch breaks.
async fn follow(
    kv: Arc<dyn KvBackend>,
    manager: RouteCatalogManager,
    ring: Arc<RwLock<Ring>>,
    versions: watch::Sender<u64>,
    mut from: i64,
) {
    loop {
        if let Ok(mut stream) = kv
            .watch(WatchRequest::prefix(ROUTE_PREFIX).from_revision(from))
            .await
        {
            while let Some(Ok(response)) = stream.next().await {
                let WatchResponse::Events { events, .. } = response else {
                    continue;
                };
                let mut working: Option<(i64, Version)> = None;
                for event in events {
                    let revision = event.kv.mod_revision;
                    if working.as_ref().is_some_and(|(r, _)| *r != revision)
                        && let Some((_, done)) = working.take()
                    {
                        install(&ring, &versions, done);
                    }
                    let (_, version) = working.get_or_insert_with(|| {
                        let newest = read(&ring).back().cloned().unwrap_or_default();
                        let mut copy = (*newest).clone();
                        if copy.version <= 1 {
                            // Nothing of the built-in version is stored: the first save
                            // writes every route of its own.
                            copy.routes = OrdMap::new();
                            copy.starts = SharedMap::new();
                        }
                        (revision, copy)
                    });
                    let value = (event.kind == EventKind::Put).then_some(event.kv.value.as_slice());
                    match decode_entry(&event.kv.key, value) {
                        Ok(entry) => version.apply(entry),
                        Err(e) => {
                            tracing::warn!(error = %e, "a route catalog change could not be read")
                        }
                    }
                    from = revision + 1;
                }
                if let Some((_, done)) = working {
                    install(&ring, &versions, done);
                }
            }
        }
        // The watch broke (compacted, or the server went): start again from a load.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok((catalog, revision)) = manager.load().await {
            install(&ring, &versions, Version::from_catalog(&catalog));
            from = revision + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryKvBackend;
    use crate::manager::route::SaveOutcome;
    use crate::model::route::RouteState;

    /// `base` with the route owning `at` split there.
    fn split(base: &RouteCatalog, at: &[u8]) -> RouteCatalog {
        base.split_at(at).unwrap()
    }

    #[tokio::test]
    async fn every_version_is_seen_and_owners_are_answered_at_past_versions() {
        let kv: Arc<dyn KvBackend> =
            Arc::new(MemoryKvBackend::new(crate::kv::KvLimits::default()).unwrap());
        let manager = RouteCatalogManager::new(kv.clone());
        let (v1, _) = manager.load().await.unwrap();
        let table = RouteTable::follow(kv.clone()).await.unwrap();
        assert_eq!(table.version(), 1);

        let v2 = split(&v1, b"m");
        assert_eq!(
            manager.save(&v1, v2.clone()).await.unwrap(),
            SaveOutcome::Saved(2)
        );
        // A move of [m, +inf) to group 2.
        let (v2, _) = manager.load().await.unwrap();
        let mut v3 = v2.clone();
        let moved = v3.routes.iter_mut().find(|r| r.start == b"m").unwrap();
        moved.group_id = 2;
        moved.state = RouteState::Active;
        assert_eq!(manager.save(&v2, v3).await.unwrap(), SaveOutcome::Saved(3));
        // Many saves in a row: each one a version the table sees.
        let mut base = manager.load().await.unwrap().0;
        for i in 0..40u8 {
            let next = split(&base, &[b'a', i]);
            assert!(matches!(
                manager.save(&base, next).await.unwrap(),
                SaveOutcome::Saved(_)
            ));
            base = manager.load().await.unwrap().0;
        }
        assert!(table.wait_for(base.version, Duration::from_secs(10)).await);
        let kept = table.kept();
        assert_eq!(kept.len(), RING);
        assert!(
            kept.windows(2).all(|w| w[1] == w[0] + 1),
            "no gap: {kept:?}"
        );
        assert_eq!(table.current().routes, base.routes);

        let owner = |version| match table.owner_at(b"q", version) {
            OwnerAt::Owner(route) => route.map(|r| (r.route_id, r.group_id)),
            other => panic!("version {version}: {other:?}"),
        };
        let newest = table.version();
        assert_eq!(
            owner(newest),
            table.owner_of(b"q").map(|r| (r.route_id, r.group_id))
        );
        assert_eq!(
            table.owner_at(b"q", 1),
            OwnerAt::Evicted,
            "older than the ring"
        );
        assert_eq!(table.owner_at(b"q", newest + 1), OwnerAt::Unknown);
    }

    #[tokio::test]
    async fn a_split_and_a_move_are_answered_at_each_version() {
        let kv: Arc<dyn KvBackend> =
            Arc::new(MemoryKvBackend::new(crate::kv::KvLimits::default()).unwrap());
        let manager = RouteCatalogManager::new(kv.clone());
        let (v1, _) = manager.load().await.unwrap();
        let table = RouteTable::follow(kv.clone()).await.unwrap();
        manager.save(&v1, split(&v1, b"m")).await.unwrap();
        let (v2, _) = manager.load().await.unwrap();
        let mut v3 = v2.clone();
        v3.routes
            .iter_mut()
            .find(|r| r.start == b"m")
            .unwrap()
            .group_id = 2;
        manager.save(&v2, v3).await.unwrap();
        assert!(table.wait_for(3, Duration::from_secs(10)).await);
        let at = |version| match table.owner_at(b"q", version) {
            OwnerAt::Owner(Some(r)) => (r.route_id, r.group_id),
            other => panic!("{other:?}"),
        };
        assert_eq!(at(1), (1, 1), "before the split: the whole range");
        assert_eq!(at(2), (3, 1), "after the split: the right child");
        assert_eq!(at(3), (3, 2), "after the move: group 2");
        assert_eq!(
            match table.owner_at(b"a", 2) {
                OwnerAt::Owner(Some(r)) => r.route_id,
                other => panic!("{other:?}"),
            },
            2
        );
    }
}
