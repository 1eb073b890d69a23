//! `Members`: member ids and their addresses, shared by the transport, the services and
//! the HTTP API.
//!
//! Addresses travel with the configuration: a conf change that adds a member carries
//! its address in its context, and every member records it when the change is applied.
//! The map is persisted as system values of the state machine (`member/{id BE}` ->
//! address, see `SledKvStore`), written by the driver in the same batch as the applied
//! index and the configuration ([`Members::writes_for`]), so the map, the configuration
//! and the data never disagree after a crash. [`Members`] itself is the in-memory copy.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use common_meta::Error;
use common_meta::kv::{SledKvStore, SystemWrite};

/// The system-value prefix of member addresses (see [`Members::parse`]).
pub const MEMBER_PREFIX: &[u8] = b"member/";

/// Member ids and addresses; see the module doc.
#[derive(Debug, Default)]
pub struct Members {
    map: RwLock<BTreeMap<u64, String>>,
}

fn member_key(id: u64) -> Vec<u8> {
    let mut key = MEMBER_PREFIX.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

impl Members {
    /// An unpersisted map (in-process tests).
    pub fn in_memory(initial: BTreeMap<u64, String>) -> Members {
        Members {
            map: RwLock::new(initial),
        }
    }

    /// Loads the persisted map from `store`; when there is none yet, takes it from the
    /// sled tree `members` of `db` (where the first data format kept it; an explicit,
    /// logged migration) or else stores `initial`. Not flushed.
    pub fn open(
        store: &SledKvStore,
        db: &sled::Db,
        initial: &BTreeMap<u64, String>,
    ) -> Result<Members, Error> {
        let persisted = store.system_scan(MEMBER_PREFIX)?;
        let mut map = Self::parse(persisted.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))?;
        if map.is_empty() {
            map = legacy(db)?;
            if map.is_empty() {
                map.clone_from(initial);
            } else {
                tracing::info!(members = ?map, "data format migration: member addresses move into the state machine");
            }
            store.write_system(
                map.iter()
                    .map(|(id, addr)| (member_key(*id), Some(addr.clone().into_bytes())))
                    .collect(),
            )?;
        }
        Ok(Members::in_memory(map))
    }

    /// The map held by system values `(name, value)` under the member prefix (as
    /// `SledKvStore::system_scan` or a store copy lists them).
    pub fn parse<'a>(
        values: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<BTreeMap<u64, String>, Error> {
        let mut map = BTreeMap::new();
        for (key, value) in values {
            let id = key
                .strip_prefix(MEMBER_PREFIX)
                .and_then(|id| <[u8; 8]>::try_from(id).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| Error::Corrupted {
                    location: "system values".to_string(),
                    reason: format!("bad member key {key:?}"),
                })?;
            map.insert(id, String::from_utf8_lossy(value).into_owned());
        }
        Ok(map)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, String>> {
        // Only whole-value updates happen under the lock: a poisoned map is still whole.
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The address of member `id`.
    pub fn addr(&self, id: u64) -> Option<String> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned()
    }

    /// Every member and its address.
    pub fn all(&self) -> BTreeMap<u64, String> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The system writes that record `id` at `addr` (`None`: forget it); the caller
    /// writes them with the entry that changed the configuration, then calls
    /// [`Members::changed`].
    pub fn writes_for(id: u64, addr: Option<&str>) -> SystemWrite {
        (member_key(id), addr.map(|a| a.as_bytes().to_vec()))
    }

    /// Updates the in-memory copy once the change is persisted.
    pub fn changed(&self, id: u64, addr: Option<&str>) {
        match addr {
            Some(addr) => self.write().insert(id, addr.to_string()),
            None => self.write().remove(&id),
        };
    }

    /// Replaces the in-memory copy (after installing a snapshot, which brought the
    /// persisted map with the state machine).
    pub fn replace_all(&self, map: BTreeMap<u64, String>) {
        *self.write() = map;
    }
}

/// The map the first data format kept in its own tree, if any.
fn legacy(db: &sled::Db) -> Result<BTreeMap<u64, String>, Error> {
    let storage = |source| Error::Storage {
        context: "reading the legacy members tree".to_string(),
        source,
    };
    if !db
        .tree_names()
        .iter()
        .any(|name| name.as_ref() == b"members")
    {
        return Ok(BTreeMap::new());
    }
    let tree = db.open_tree("members").map_err(storage)?;
    let mut map = BTreeMap::new();
    for item in tree.iter() {
        let (key, value) = item.map_err(storage)?;
        if let Ok(id) = <[u8; 8]>::try_from(key.as_ref()) {
            map.insert(
                u64::from_be_bytes(id),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persisted_map_wins_over_the_initial_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = SledKvStore::open_in(db.clone(), Default::default()).unwrap();
        let initial = BTreeMap::from([(1, "a:1".to_string()), (2, "b:2".to_string())]);
        let members = Members::open(&store, &db, &initial).unwrap();
        assert_eq!(members.all(), initial);
        store
            .write_system(vec![
                Members::writes_for(3, Some("c:3")),
                Members::writes_for(1, None),
            ])
            .unwrap();
        let reopened = Members::open(&store, &db, &initial).unwrap();
        assert_eq!(
            reopened.all(),
            BTreeMap::from([(2, "b:2".to_string()), (3, "c:3".to_string())])
        );
    }

    #[test]
    fn a_first_format_members_tree_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let old = db.open_tree("members").unwrap();
        old.insert(7u64.to_be_bytes(), "old:7").unwrap();
        let store = SledKvStore::open_in(db.clone(), Default::default()).unwrap();
        let initial = BTreeMap::from([(1, "a:1".to_string())]);
        let members = Members::open(&store, &db, &initial).unwrap();
        assert_eq!(members.all(), BTreeMap::from([(7, "old:7".to_string())]));
        assert_eq!(
            store.system_scan(MEMBER_PREFIX).unwrap().len(),
            1,
            "now kept with the state machine"
        );
    }
}
