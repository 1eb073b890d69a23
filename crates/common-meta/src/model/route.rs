//! The range route catalog's model: which raft group of the data plane owns which
//! half-open key range, in which state, at which catalog version.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A route's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteState {
    /// Serving reads and writes.
    Active,
    /// Writes are refused (a move is about to cut over).
    WriteFenced,
    /// The source side of a move in progress.
    MigratingSource,
    /// The target side of a move in progress.
    MigratingTarget,
}

/// One route: the keys `[start, end)` (`end: None` is +infinity) owned by `group_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDescriptor {
    /// Unique in the catalog; never reused.
    pub route_id: u64,
    /// First key (inclusive).
    pub start: Vec<u8>,
    /// End key (exclusive); `None` for no end.
    pub end: Option<Vec<u8>>,
    /// The raft group of the data plane that owns the range.
    pub group_id: u64,
    /// Its state.
    pub state: RouteState,
    /// The route it was split or merged from, if any.
    pub parent_route_id: Option<u64>,
}

impl RouteState {
    /// Whether the route's group may write the range in this state: every state but
    /// `WriteFenced` (a moving route is written at its source until the fence, and at
    /// its target from the cut-over on).
    pub fn writable(self) -> bool {
        self != RouteState::WriteFenced
    }
}

impl RouteDescriptor {
    /// The group that may write the route's keys now, if any.
    pub fn writer(&self) -> Option<u64> {
        self.state.writable().then_some(self.group_id)
    }

    /// Whether `key` is in the route's range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// What a finished split, merge or move made: the output of its procedure (JSON), read
/// by the server's answer and by clients that poll the procedure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteChange {
    /// The catalog version it saved last.
    pub version: u64,
    /// The routes it made or changed, as saved.
    pub routes: Vec<RouteDescriptor>,
}

impl RouteChange {
    /// As a procedure's output.
    pub fn output(&self) -> Option<String> {
        serde_json::to_string(self).ok()
    }
}

/// The whole catalog at one version: routes sorted by start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteCatalog {
    /// Moves by exactly one per save; 0 before the first.
    pub version: u64,
    /// The next route id to hand out.
    pub next_id: u64,
    /// The routes, sorted by start.
    pub routes: Vec<RouteDescriptor>,
}

impl RouteCatalog {
    /// The catalog every cluster starts with, built in (read as version 1 while nothing
    /// is stored, never written as such): one `Active` route over the whole key space
    /// on `group_id`.
    pub fn initial(group_id: u64) -> RouteCatalog {
        RouteCatalog {
            version: 1,
            next_id: 2,
            routes: vec![RouteDescriptor {
                route_id: 1,
                start: Vec::new(),
                end: None,
                group_id,
                state: RouteState::Active,
                parent_route_id: None,
            }],
        }
    }

    /// Whether this is the built-in first version (nothing of it is in the store).
    pub fn is_initial(&self) -> bool {
        self.version <= 1
    }

    /// Checks the invariants every saved catalog holds: routes sorted by start, each
    /// non-empty (`start < end`), none overlapping the next, ids unique and below
    /// `next_id`.
    pub fn check(&self) -> Result<()> {
        let bad = |message: String| Err(Error::invalid_argument(message));
        let mut ids = std::collections::BTreeSet::new();
        for route in &self.routes {
            if !ids.insert(route.route_id) {
                return bad(format!("route id {} appears twice", route.route_id));
            }
            if route.route_id == 0 || route.route_id >= self.next_id.max(1) {
                return bad(format!(
                    "route id {} is not below the next id {}",
                    route.route_id, self.next_id
                ));
            }
            if let Some(end) = &route.end
                && end.as_slice() <= route.start.as_slice()
            {
                return bad(format!(
                    "route {} is empty: its end is not above its start",
                    route.route_id
                ));
            }
        }
        for pair in self.routes.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.start >= b.start {
                return bad(format!(
                    "routes {} and {} are not sorted by start",
                    a.route_id, b.route_id
                ));
            }
            match &a.end {
                Some(end) if end.as_slice() <= b.start.as_slice() => {}
                _ => {
                    return bad(format!("routes {} and {} overlap", a.route_id, b.route_id));
                }
            }
        }
        Ok(())
    }

    /// The route owning `key`, in O(log n).
    pub fn owner(&self, key: &[u8]) -> Option<&RouteDescriptor> {
        let after = self.routes.partition_point(|r| r.start.as_slice() <= key);
        after
            .checked_sub(1)
            .map(|at| &self.routes[at])
            .filter(|route| route.contains(key))
    }

    /// The route with id `id`.
    pub fn route(&self, id: u64) -> Option<&RouteDescriptor> {
        self.routes.iter().find(|r| r.route_id == id)
    }

    /// This catalog with route `id` changed by `change` (which sees the route as it is).
    /// Refused when there is no such route.
    pub fn with_route(
        &self,
        id: u64,
        change: impl FnOnce(&mut RouteDescriptor) -> Result<()>,
    ) -> Result<RouteCatalog> {
        let mut next = self.clone();
        let route = next
            .routes
            .iter_mut()
            .find(|r| r.route_id == id)
            .ok_or_else(|| Error::NotFound {
                what: format!("route {id}"),
            })?;
        change(route)?;
        Ok(next)
    }

    /// The routes sorted by start (after changes made in place).
    pub fn sort(&mut self) {
        self.routes.sort_by(|a, b| a.start.cmp(&b.start));
    }

    /// This catalog with the route owning `key` split there: two children with new
    /// ids on the same group, each recording the parent. Refused when no route owns
    /// `key`, when `key` is the route's start (one child would be empty), or when the
    /// route is not `Active` (a move is under way).
    pub fn split_at(&self, key: &[u8]) -> Result<RouteCatalog> {
        let parent = self
            .owner(key)
            .ok_or_else(|| Error::invalid_argument(format!("no route owns key {key:?}")))?
            .clone();
        if parent.start.as_slice() == key {
            return Err(Error::invalid_argument(format!(
                "key {key:?} is the start of route {}: a split there would leave an empty route",
                parent.route_id
            )));
        }
        if parent.state != RouteState::Active {
            return Err(Error::FailedPrecondition {
                message: format!(
                    "route {} is {:?}: only an Active route is split",
                    parent.route_id, parent.state
                ),
            });
        }
        let mut next = self.clone();
        next.routes.retain(|r| r.route_id != parent.route_id);
        let (left, right) = (self.next_id.max(1), self.next_id.max(1) + 1);
        next.next_id = right + 1;
        next.routes.push(RouteDescriptor {
            route_id: left,
            end: Some(key.to_vec()),
            parent_route_id: Some(parent.route_id),
            ..parent.clone()
        });
        next.routes.push(RouteDescriptor {
            route_id: right,
            start: key.to_vec(),
            parent_route_id: Some(parent.route_id),
            ..parent
        });
        next.sort();
        Ok(next)
    }

    /// This catalog with route `id` merged with its right neighbour into one route
    /// with a new id. Refused when there is no such route, no neighbour starting where
    /// it ends, the two are on different groups, or either is not `Active`.
    pub fn merge_right(&self, id: u64) -> Result<RouteCatalog> {
        let left = self
            .route(id)
            .ok_or_else(|| Error::invalid_argument(format!("no route {id}")))?
            .clone();
        let right = left
            .end
            .as_ref()
            .and_then(|end| self.routes.iter().find(|r| &r.start == end))
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "route {id} has no adjacent route to its right to merge with"
                ))
            })?
            .clone();
        if left.group_id != right.group_id {
            return Err(Error::invalid_argument(format!(
                "routes {} and {} are on groups {} and {}: only routes of one group merge",
                left.route_id, right.route_id, left.group_id, right.group_id
            )));
        }
        if left.state != RouteState::Active || right.state != RouteState::Active {
            return Err(Error::FailedPrecondition {
                message: format!(
                    "routes {} and {} must both be Active to merge",
                    left.route_id, right.route_id
                ),
            });
        }
        let mut next = self.clone();
        next.routes
            .retain(|r| r.route_id != left.route_id && r.route_id != right.route_id);
        let merged = self.next_id.max(1);
        next.next_id = merged + 1;
        next.routes.push(RouteDescriptor {
            route_id: merged,
            end: right.end.clone(),
            parent_route_id: Some(left.route_id),
            ..left
        });
        next.sort();
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(id: u64, start: &[u8], end: Option<&[u8]>) -> RouteDescriptor {
        RouteDescriptor {
            route_id: id,
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            group_id: 1,
            state: RouteState::Active,
            parent_route_id: None,
        }
    }

    fn catalog(routes: Vec<RouteDescriptor>) -> RouteCatalog {
        RouteCatalog {
            version: 1,
            next_id: 100,
            routes,
        }
    }

    #[test]
    fn each_broken_invariant_is_named() {
        let cases = [
            (
                vec![route(1, b"a", None), route(1, b"b", None)],
                "appears twice",
            ),
            (vec![route(1, b"b", Some(b"b"))], "is empty"),
            (
                vec![route(1, b"b", None), route(2, b"a", Some(b"b"))],
                "not sorted",
            ),
            (
                vec![route(1, b"a", Some(b"c")), route(2, b"b", None)],
                "overlap",
            ),
            (vec![route(1, b"a", None), route(2, b"b", None)], "overlap"),
            (vec![route(100, b"a", None)], "not below the next id"),
        ];
        for (routes, want) in cases {
            let err = catalog(routes).check().unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        let whole = catalog(vec![route(1, b"", Some(b"m")), route(2, b"m", None)]);
        whole.check().unwrap();
        assert_eq!(whole.owner(b"").unwrap().route_id, 1);
        assert_eq!(whole.owner(b"l").unwrap().route_id, 1);
        assert_eq!(whole.owner(b"m").unwrap().route_id, 2);
        assert_eq!(whole.owner(b"zzz").unwrap().route_id, 2);
        let gap = catalog(vec![route(1, b"b", Some(b"c"))]);
        assert!(gap.owner(b"a").is_none() && gap.owner(b"c").is_none());
    }

    #[test]
    fn splits_and_merges_keep_the_invariants_and_refuse_bad_input() {
        let whole = RouteCatalog {
            version: 1,
            next_id: 2,
            routes: vec![route(1, b"", None)],
        };
        let split = whole.split_at(b"m").unwrap();
        split.check().unwrap();
        let ids: Vec<(u64, Option<u64>)> = split
            .routes
            .iter()
            .map(|r| (r.route_id, r.parent_route_id))
            .collect();
        assert_eq!(ids, [(2, Some(1)), (3, Some(1))]);
        assert_eq!(split.owner(b"m").unwrap().route_id, 3);
        let err = split.split_at(b"m").unwrap_err().to_string();
        assert!(err.contains("is the start of route 3"), "{err}");
        let mut gap = split.clone();
        gap.routes.remove(0);
        assert!(
            gap.split_at(b"a")
                .unwrap_err()
                .to_string()
                .contains("no route owns")
        );

        let merged = split.merge_right(2).unwrap();
        merged.check().unwrap();
        assert_eq!(merged.routes.len(), 1);
        assert_eq!(
            (
                merged.routes[0].route_id,
                merged.routes[0].start.as_slice(),
                merged.routes[0].end.clone()
            ),
            (4, &b""[..], None)
        );
        let err = split.merge_right(3).unwrap_err().to_string();
        assert!(err.contains("no adjacent route"), "{err}");
        assert!(
            split
                .merge_right(9)
                .unwrap_err()
                .to_string()
                .contains("no route 9")
        );
        let mut other_group = split.clone();
        other_group.routes[1].group_id = 2;
        let err = other_group.merge_right(2).unwrap_err().to_string();
        assert!(err.contains("only routes of one group merge"), "{err}");
        let mut fenced = split.clone();
        fenced.routes[1].state = RouteState::WriteFenced;
        assert!(fenced.merge_right(2).is_err() && fenced.split_at(b"x").is_err());
    }

    proptest! {
        /// Cutting the key space at any sorted, distinct points gives a valid catalog
        /// whose owner of every key is the one route containing it.
        #[test]
        fn owners_agree_with_a_linear_scan(
            cuts in proptest::collection::btree_set(proptest::collection::vec(any::<u8>(), 1..4), 0..20),
            probes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..4), 1..50),
        ) {
            let mut bounds: Vec<Vec<u8>> = vec![Vec::new()];
            bounds.extend(cuts);
            let routes: Vec<RouteDescriptor> = bounds
                .iter()
                .enumerate()
                .map(|(i, start)| route(i as u64 + 1, start, bounds.get(i + 1).map(Vec::as_slice)))
                .collect();
            let c = RouteCatalog { version: 1, next_id: routes.len() as u64 + 1, routes };
            prop_assert!(c.check().is_ok());
            for key in probes {
                let scan: Vec<u64> = c.routes.iter().filter(|r| r.contains(&key)).map(|r| r.route_id).collect();
                prop_assert_eq!(scan.len(), 1);
                prop_assert_eq!(c.owner(&key).map(|r| r.route_id), scan.first().copied());
            }
        }
    }
}
