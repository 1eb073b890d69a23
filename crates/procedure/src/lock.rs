//! Key locks held by running procedures: shared or exclusive, taken in sorted order.
//!
//! **No deadlock between procedure trees.** A root procedure takes its keys in one
//! sorted order and waits for nothing else while taking them. A subprocedure takes only
//! keys within its ancestors' locks (the rule chosen over "lock the whole tree up
//! front", since children are only known when their parent suspends): a key an
//! ancestor holds exclusively may be taken in any mode, one an ancestor holds shared
//! only shared; any other key fails at once ([`Error::LockOutsideAncestors`],
//! [`Error::LockConflictWithParent`]). So a child waits only for other descendants of
//! its own root (siblings contending for the same key, each in sorted order), never
//! for another root, and no cycle of waits can cross two trees.
//!
//! **No starved writer.** A root waiting to take a key exclusively is queued on it, and
//! roots asking for it shared after that wait behind it (otherwise a steady stream of
//! shared holders, table DDL under a schema's shared lock, would keep a drop of the
//! schema waiting for ever); queued writers take the key in arrival order. This adds
//! no cycle: a root waits on one key at a time, holding only keys before it in the
//! sorted order, and whoever it waits behind waits on the same key or holds it.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::procedure::{LockKey, LockMode};

#[derive(Default)]
struct Holders {
    /// The root holding the key exclusively.
    exclusive: Option<String>,
    /// Roots holding it shared.
    shared: Vec<String>,
    /// Subprocedures holding it within an ancestor's lock, and how.
    nested: Vec<(String, LockMode)>,
    /// Roots waiting to take it exclusively, in arrival order.
    writers: Vec<String>,
}

impl Holders {
    /// Whether root `owner` may take the key in `mode` now, queued writers first.
    fn can_take_fairly(&self, owner: &str, mode: LockMode) -> bool {
        let queued_ahead = match mode {
            LockMode::Shared => !self.writers.is_empty() && !self.holds(owner),
            LockMode::Exclusive => self.writers.first().is_some_and(|w| w != owner),
        };
        !queued_ahead && self.can_take(owner, mode)
    }

    fn holds(&self, owner: &str) -> bool {
        self.exclusive.as_deref() == Some(owner) || self.shared.iter().any(|o| o == owner)
    }

    fn is_empty(&self) -> bool {
        self.exclusive.is_none()
            && self.shared.is_empty()
            && self.nested.is_empty()
            && self.writers.is_empty()
    }

    fn can_take(&self, owner: &str, mode: LockMode) -> bool {
        match mode {
            LockMode::Shared => self.exclusive.as_deref().is_none_or(|o| o == owner),
            LockMode::Exclusive => {
                self.exclusive.as_deref().is_none_or(|o| o == owner)
                    && self.shared.iter().all(|o| o == owner)
            }
        }
    }

    /// How the nearest of `ancestors` holding the key holds it.
    fn held_by<'a>(&self, ancestors: &'a [String]) -> Option<(&'a str, LockMode)> {
        ancestors.iter().find_map(|a| {
            if self.exclusive.as_deref() == Some(a.as_str()) {
                Some((a.as_str(), LockMode::Exclusive))
            } else if self.shared.iter().any(|o| o == a) {
                Some((a.as_str(), LockMode::Shared))
            } else {
                self.nested
                    .iter()
                    .find(|(o, _)| o == a)
                    .map(|(_, mode)| (a.as_str(), *mode))
            }
        })
    }

    /// Whether a subprocedure may take the key now: no other descendant (outside its own
    /// ancestors) holds it in a conflicting mode.
    fn nested_can_take(&self, owner: &str, ancestors: &[String], mode: LockMode) -> bool {
        self.nested
            .iter()
            .filter(|(o, _)| o != owner && !ancestors.contains(o))
            .all(|(_, held)| mode == LockMode::Shared && *held == LockMode::Shared)
    }
}

/// The lock table of one manager.
#[derive(Default)]
pub struct LockTable {
    held: Mutex<HashMap<String, Holders>>,
    released: Notify,
}

impl LockTable {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Holders>> {
        // Every critical section updates one entry completely: never torn.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes every key of `lock` for `owner`, in sorted order, waiting as needed.
    ///
    /// A subprocedure (with its `ancestors`, parent first) takes keys only within its
    /// ancestors' locks (see the module doc); any other key fails at once, and what it
    /// took so far is released.
    pub async fn acquire(&self, owner: &str, ancestors: &[String], lock: &LockKey) -> Result<()> {
        for (key, mode) in lock.keys() {
            loop {
                let released = self.released.notified();
                {
                    let mut held = self.held();
                    let holders = held.entry(key.clone()).or_default();
                    if ancestors.is_empty() {
                        if holders.can_take_fairly(owner, *mode) {
                            holders.writers.retain(|w| w != owner);
                            match mode {
                                LockMode::Shared => holders.shared.push(owner.to_string()),
                                LockMode::Exclusive => {
                                    holders.exclusive = Some(owner.to_string());
                                }
                            }
                            break;
                        }
                        if *mode == LockMode::Exclusive
                            && !holders.writers.iter().any(|w| w == owner)
                        {
                            // Queued until it gets the key, or until `release` (which
                            // the runner's guard calls however it ends).
                            holders.writers.push(owner.to_string());
                        }
                    } else {
                        let refusal = match holders.held_by(ancestors) {
                            None => Some(Error::LockOutsideAncestors {
                                child: owner.to_string(),
                                key: key.clone(),
                            }),
                            Some((parent, LockMode::Shared)) if *mode == LockMode::Exclusive => {
                                Some(Error::LockConflictWithParent {
                                    child: owner.to_string(),
                                    parent: parent.to_string(),
                                    key: key.clone(),
                                })
                            }
                            Some(_) => None,
                        };
                        if let Some(refusal) = refusal {
                            if holders.is_empty() {
                                held.remove(key);
                            }
                            drop(held);
                            self.release(owner);
                            return Err(refusal);
                        }
                        if holders.nested_can_take(owner, ancestors, *mode) {
                            holders.nested.push((owner.to_string(), *mode));
                            break;
                        }
                    }
                }
                released.await;
            }
        }
        Ok(())
    }

    /// Takes every key of `lock` for root `owner` if all are free for it now, else
    /// none (no waiting). Recovery uses it so that recovered procedures hold their
    /// keys before anything new can be submitted.
    pub fn try_acquire(&self, owner: &str, lock: &LockKey) -> bool {
        let mut held = self.held();
        let free = lock.keys().iter().all(|(key, mode)| {
            held.get(key)
                .is_none_or(|holders| holders.can_take_fairly(owner, *mode))
        });
        if !free {
            return false;
        }
        for (key, mode) in lock.keys() {
            let holders = held.entry(key.clone()).or_default();
            match mode {
                LockMode::Shared => holders.shared.push(owner.to_string()),
                LockMode::Exclusive => holders.exclusive = Some(owner.to_string()),
            }
        }
        true
    }

    /// Releases every key `owner` holds.
    pub fn release(&self, owner: &str) {
        let mut held = self.held();
        held.retain(|_, holders| {
            if holders.exclusive.as_deref() == Some(owner) {
                holders.exclusive = None;
            }
            holders.shared.retain(|o| o != owner);
            holders.nested.retain(|(o, _)| o != owner);
            holders.writers.retain(|o| o != owner);
            !holders.is_empty()
        });
        drop(held);
        self.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_shared_shares() {
        let table = Arc::new(LockTable::default());
        table
            .acquire("a", &[], &LockKey::shared("k"))
            .await
            .unwrap();
        table
            .acquire("b", &[], &LockKey::shared("k"))
            .await
            .unwrap();
        let waiter = {
            let table = table.clone();
            tokio::spawn(async move { table.acquire("c", &[], &LockKey::exclusive("k")).await })
        };
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "exclusive waits for the shared holders"
        );
        table.release("a");
        table.release("b");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("granted once released")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_queued_writer_goes_before_later_readers() {
        let table = Arc::new(LockTable::default());
        table
            .acquire("reader-1", &[], &LockKey::shared("schema"))
            .await
            .unwrap();
        let spawn = |owner: &'static str, lock: LockKey| {
            let table = table.clone();
            tokio::spawn(async move { table.acquire(owner, &[], &lock).await })
        };
        let writer = spawn("writer", LockKey::exclusive("schema"));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // A reader arriving after the writer waits behind it, though the key is only
        // held shared.
        let reader = spawn("reader-2", LockKey::shared("schema"));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!writer.is_finished() && !reader.is_finished());
        table.release("reader-1");
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer is next")
            .unwrap()
            .unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!reader.is_finished(), "the reader waits for the writer");
        table.release("writer");
        tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("then the reader")
            .unwrap()
            .unwrap();
        // A writer that gives up (its runner aborted) leaves no queue behind.
        let quitter = spawn("quitter", LockKey::exclusive("schema"));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        quitter.abort();
        table.release("quitter");
        table.release("reader-2");
        tokio::time::timeout(
            Duration::from_secs(5),
            table.acquire("reader-3", &[], &LockKey::shared("schema")),
        )
        .await
        .expect("no queue left")
        .unwrap();
    }

    #[tokio::test]
    async fn descendants_lock_only_within_their_ancestors_locks() {
        let table = Arc::new(LockTable::default());
        table
            .acquire("root", &[], &LockKey::exclusive("table/1"))
            .await
            .unwrap();
        table
            .acquire("other", &[], &LockKey::shared("catalog"))
            .await
            .unwrap();
        let chain = ["parent".to_string(), "root".to_string()];
        // Within the root's exclusive lock: granted, in any mode.
        table
            .acquire("grandchild", &chain, &LockKey::exclusive("table/1"))
            .await
            .unwrap();
        // A sibling waits for it (descendants of one root serialise among themselves).
        let sibling = {
            let table = table.clone();
            let chain = chain.clone();
            tokio::spawn(async move {
                table
                    .acquire("sibling", &chain, &LockKey::shared("table/1"))
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert!(!sibling.is_finished(), "the sibling waits");
        table.release("grandchild");
        tokio::time::timeout(Duration::from_secs(5), sibling)
            .await
            .expect("granted once released")
            .unwrap()
            .unwrap();
        // A key no ancestor holds fails at once (it could wait for another root).
        let err = table
            .acquire("grandchild", &chain, &LockKey::exclusive("region/1"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LockOutsideAncestors { .. }), "{err}");
        // Exclusive under a shared ancestor fails at once too.
        let err = table
            .acquire(
                "child-of-other",
                &["other".to_string()],
                &LockKey::exclusive("catalog"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LockConflictWithParent { .. }), "{err}");
    }

    #[tokio::test]
    async fn children_of_two_roots_cannot_deadlock() {
        // Root a holds k1, root b holds k2; each child wants the other's key. Under the
        // rule both fail at once instead of waiting for each other forever.
        let table = LockTable::default();
        table
            .acquire("a", &[], &LockKey::exclusive("k1"))
            .await
            .unwrap();
        table
            .acquire("b", &[], &LockKey::exclusive("k2"))
            .await
            .unwrap();
        for (child, root, key) in [("a1", "a", "k2"), ("b1", "b", "k1")] {
            let err = tokio::time::timeout(
                Duration::from_secs(5),
                table.acquire(child, &[root.to_string()], &LockKey::exclusive(key)),
            )
            .await
            .expect("no wait")
            .unwrap_err();
            assert!(matches!(err, Error::LockOutsideAncestors { .. }), "{err}");
        }
    }
}
