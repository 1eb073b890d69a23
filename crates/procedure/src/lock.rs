//! Key locks held by running procedures: shared or exclusive, taken in sorted order.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::procedure::{LockKey, LockMode};

#[derive(Default)]
struct Holders {
    exclusive: Option<String>,
    shared: Vec<String>,
}

impl Holders {
    fn can_take(&self, owner: &str, mode: LockMode) -> bool {
        match mode {
            LockMode::Shared => self.exclusive.as_deref().is_none_or(|o| o == owner),
            LockMode::Exclusive => {
                self.exclusive.as_deref().is_none_or(|o| o == owner)
                    && self.shared.iter().all(|o| o == owner)
            }
        }
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
    /// A subprocedure (with its `ancestors`, parent first) may share keys an ancestor
    /// holds shared; a key whose mode conflicts with an ancestor's fails at once instead
    /// of waiting forever for a procedure that waits for it.
    pub async fn acquire(&self, owner: &str, ancestors: &[String], lock: &LockKey) -> Result<()> {
        for (key, mode) in lock.keys() {
            loop {
                let released = self.released.notified();
                {
                    let mut held = self.held();
                    let holders = held.entry(key.clone()).or_default();
                    for parent in ancestors {
                        let parent_holds = holders.exclusive.as_deref() == Some(parent.as_str())
                            || holders.shared.iter().any(|o| o == parent);
                        let compatible = *mode == LockMode::Shared
                            && holders.exclusive.as_deref() != Some(parent.as_str());
                        if parent_holds && !compatible {
                            drop(held);
                            self.release(owner);
                            return Err(Error::LockConflictWithParent {
                                child: owner.to_string(),
                                parent: parent.to_string(),
                                key: key.clone(),
                            });
                        }
                    }
                    if holders.can_take(owner, *mode) {
                        match mode {
                            LockMode::Shared => holders.shared.push(owner.to_string()),
                            LockMode::Exclusive => holders.exclusive = Some(owner.to_string()),
                        }
                        break;
                    }
                }
                released.await;
            }
        }
        Ok(())
    }

    /// Releases every key `owner` holds.
    pub fn release(&self, owner: &str) {
        let mut held = self.held();
        held.retain(|_, holders| {
            if holders.exclusive.as_deref() == Some(owner) {
                holders.exclusive = None;
            }
            holders.shared.retain(|o| o != owner);
            holders.exclusive.is_some() || !holders.shared.is_empty()
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
    async fn a_descendant_conflicting_with_an_ancestor_fails_instead_of_waiting() {
        let table = LockTable::default();
        table
            .acquire("root", &[], &LockKey::exclusive("table/1"))
            .await
            .unwrap();
        let chain = ["parent".to_string(), "root".to_string()];
        let err = table
            .acquire("grandchild", &chain, &LockKey::exclusive("table/1"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::LockConflictWithParent { .. }), "{err}");
        // Other keys are fine.
        table
            .acquire("grandchild", &chain, &LockKey::exclusive("region/1"))
            .await
            .unwrap();
    }
}
