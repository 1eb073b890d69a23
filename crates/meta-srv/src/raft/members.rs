//! `Members`: member ids and their addresses, shared by the transport, the services and
//! the HTTP API.
//!
//! Addresses travel with the configuration: a conf change that adds a member carries
//! its address in its context, and every member records it when the change is applied.
//! The map is persisted in the sled tree `members` (id, big-endian -> address), so a
//! restarted member knows its peers before it has replayed anything.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use common_meta::Error;

/// Member ids and addresses; see the module doc.
#[derive(Debug, Default)]
pub struct Members {
    map: RwLock<BTreeMap<u64, String>>,
    tree: Option<sled::Tree>,
}

fn storage(context: &str) -> impl FnOnce(sled::Error) -> Error + '_ {
    move |source| Error::Storage {
        context: context.to_string(),
        source,
    }
}

impl Members {
    /// An unpersisted map (in-process tests).
    pub fn in_memory(initial: BTreeMap<u64, String>) -> Members {
        Members {
            map: RwLock::new(initial),
            tree: None,
        }
    }

    /// Loads the persisted map from `db`; when there is none yet, stores `initial`.
    pub fn open(db: &sled::Db, initial: &BTreeMap<u64, String>) -> Result<Members, Error> {
        let tree = db
            .open_tree("members")
            .map_err(storage("opening the members tree"))?;
        let mut map = BTreeMap::new();
        for item in tree.iter() {
            let (key, value) = item.map_err(storage("reading members"))?;
            let id = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Corrupted {
                    location: "tree members".to_string(),
                    reason: format!("bad member key {key:?}"),
                })?;
            map.insert(id, String::from_utf8_lossy(&value).into_owned());
        }
        let members = Members {
            map: RwLock::new(BTreeMap::new()),
            tree: Some(tree),
        };
        if map.is_empty() {
            for (id, addr) in initial {
                members.set(*id, addr)?;
            }
        } else {
            *members.write() = map;
        }
        Ok(members)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, String>> {
        // Updated only after the sled write succeeded: a poisoned map is still whole.
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

    /// Records `id`'s address.
    pub fn set(&self, id: u64, addr: &str) -> Result<(), Error> {
        if let Some(tree) = &self.tree {
            tree.insert(id.to_be_bytes(), addr.as_bytes())
                .map_err(storage("writing a member"))?;
        }
        self.write().insert(id, addr.to_string());
        Ok(())
    }

    /// Replaces the whole map (installing a snapshot).
    pub fn replace_all(&self, map: BTreeMap<u64, String>) -> Result<(), Error> {
        if let Some(tree) = &self.tree {
            let mut batch = sled::Batch::default();
            for key in tree.iter().keys() {
                batch.remove(key.map_err(storage("reading members"))?);
            }
            for (id, addr) in &map {
                batch.insert(&id.to_be_bytes(), addr.as_bytes());
            }
            tree.apply_batch(batch)
                .map_err(storage("replacing members"))?;
        }
        *self.write() = map;
        Ok(())
    }

    /// Forgets `id`.
    pub fn remove(&self, id: u64) -> Result<(), Error> {
        if let Some(tree) = &self.tree {
            tree.remove(id.to_be_bytes())
                .map_err(storage("removing a member"))?;
        }
        self.write().remove(&id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persisted_map_wins_over_the_initial_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let initial = BTreeMap::from([(1, "a:1".to_string()), (2, "b:2".to_string())]);
        let members = Members::open(&db, &initial).unwrap();
        members.set(3, "c:3").unwrap();
        members.remove(1).unwrap();
        drop(members);
        let reopened = Members::open(&db, &initial).unwrap();
        assert_eq!(
            reopened.all(),
            BTreeMap::from([(2, "b:2".to_string()), (3, "c:3".to_string())])
        );
    }
}
