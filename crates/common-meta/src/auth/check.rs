//! What a user may read and write.
//!
//! A request on `[key, range_end)` is permitted when the union of the ranges the
//! user's roles grant with that access covers the whole of it (a grant on `a..c` and one
//! on `c..e` together permit `b..d`). The `root` role permits everything. While auth is
//! on, writes that touch the internal keyspace ([`INTERNAL_PREFIX`]) are root's only,
//! whatever a role grants: Metasrv's own APIs write those keys, and a stray put there
//! could register a node or forge a procedure.

use serde::{Deserialize, Serialize};

use super::state::{AuthState, ROOT};
use crate::kv::{TxnOp, TxnRequest};

/// What a permission allows, or a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Access {
    /// Range, watch, compare.
    Read,
    /// Put, delete.
    Write,
    /// Both.
    ReadWrite,
}

impl Access {
    /// Whether a permission of this access allows a request needing `wanted`.
    pub fn allows(self, wanted: Access) -> bool {
        self == Access::ReadWrite || self == wanted
    }
}

/// The first bytes of every key Metasrv keeps for itself (`__node/`, `__join_token/`,
/// `__procedure/`, `__table_info/`, `__route/`, ...).
pub const INTERNAL_PREFIX: &[u8] = b"__";

/// A half-open interval of keys; `end: None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    /// etcd's range conventions: an empty `range_end` is the single key, `[0]` every key
    /// from `key` on.
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        let end = match range_end {
            [] => {
                let mut next = key.to_vec();
                next.push(0);
                Some(next)
            }
            [0] => None,
            end => Some(end.to_vec()),
        };
        Interval {
            start: key.to_vec(),
            end,
        }
    }

    fn is_empty(&self) -> bool {
        self.end.as_ref().is_some_and(|end| *end <= self.start)
    }

    fn intersects(&self, other: &Interval) -> bool {
        let starts_before_other_ends = other.end.as_ref().is_none_or(|end| self.start < *end);
        let ends_after_other_starts = self.end.as_ref().is_none_or(|end| *end > other.start);
        starts_before_other_ends && ends_after_other_starts
    }
}

/// Whether the union of `grants` covers `wanted`.
fn covers(mut grants: Vec<Interval>, wanted: &Interval) -> bool {
    if wanted.is_empty() {
        return true;
    }
    grants.sort_by(|a, b| a.start.cmp(&b.start));
    // How far from `wanted.start` the grants seen so far reach without a gap.
    let mut reached = wanted.start.clone();
    for grant in grants {
        if grant.start > reached {
            break;
        }
        match grant.end {
            None => return true,
            Some(end) if end > reached => reached = end,
            Some(_) => {}
        }
    }
    wanted.end.as_ref().is_some_and(|end| reached >= *end)
}

impl AuthState {
    /// Whether `user` holds the `root` role.
    pub fn is_root(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.contains(ROOT))
    }

    /// Whether `user` may do `access` on every key of `[key, range_end)` (etcd's range
    /// conventions). An unknown user may do nothing.
    pub fn permits(&self, user: &str, key: &[u8], range_end: &[u8], access: Access) -> bool {
        let Some(holder) = self.users.get(user) else {
            return false;
        };
        if holder.roles.contains(ROOT) {
            return true;
        }
        let wanted = Interval::of(key, range_end);
        if access != Access::Read && wanted.intersects(&internal()) {
            return false;
        }
        let grants = holder
            .roles
            .iter()
            .filter_map(|name| self.roles.get(name))
            .flat_map(|role| &role.permissions)
            .filter(|p| p.access.allows(access))
            .map(|p| Interval::of(&p.key, &p.range_end))
            .collect();
        covers(grants, &wanted)
    }

    /// Whether `user` may run `txn`: read what its compares and ranges read (and the
    /// previous values its writes return), write what it writes, nested transactions
    /// included, whichever branch runs.
    pub fn permits_txn(&self, user: &str, txn: &TxnRequest) -> bool {
        txn.compare
            .iter()
            .all(|c| self.permits(user, &c.key, &c.range_end, Access::Read))
            && txn
                .success
                .iter()
                .chain(&txn.failure)
                .all(|op| self.permits_op(user, op))
    }

    fn permits_op(&self, user: &str, op: &TxnOp) -> bool {
        match op {
            TxnOp::Range(r) => self.permits(user, &r.key, &r.range_end, Access::Read),
            TxnOp::Put(p) => {
                self.permits(user, &p.key, &[], Access::Write)
                    && (!p.prev_kv || self.permits(user, &p.key, &[], Access::Read))
            }
            TxnOp::DeleteRange(d) => {
                self.permits(user, &d.key, &d.range_end, Access::Write)
                    && (!d.prev_kv || self.permits(user, &d.key, &d.range_end, Access::Read))
            }
            TxnOp::Txn(nested) => self.permits_txn(user, nested),
        }
    }
}

/// The internal keyspace as an interval: every key starting with `__`.
fn internal() -> Interval {
    let mut end = INTERNAL_PREFIX.to_vec();
    // "__" + 1 on its last byte: "_`".
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    Interval {
        start: INTERNAL_PREFIX.to_vec(),
        end: Some(end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthChange, Permission};

    fn state_with(grants: &[(&[u8], &[u8], Access)]) -> AuthState {
        let mut state = AuthState::default();
        for name in ["alice", ROOT] {
            state
                .apply(AuthChange::UserAdd {
                    name: name.into(),
                    password: None,
                })
                .unwrap();
        }
        state
            .apply(AuthChange::RoleAdd { name: "app".into() })
            .unwrap();
        for (key, range_end, access) in grants {
            state
                .apply(AuthChange::RoleGrant {
                    name: "app".into(),
                    permission: Permission {
                        key: key.to_vec(),
                        range_end: range_end.to_vec(),
                        access: *access,
                    },
                })
                .unwrap();
        }
        for (user, role) in [("alice", "app"), (ROOT, ROOT)] {
            state
                .apply(AuthChange::UserGrant {
                    name: user.into(),
                    role: role.into(),
                })
                .unwrap();
        }
        state
    }

    #[test]
    fn a_range_is_permitted_only_when_its_grants_cover_all_of_it() {
        let state = state_with(&[
            (b"a", b"c", Access::Read),
            (b"c", b"e", Access::ReadWrite),
            (b"k", b"", Access::Write),
        ]);
        let read = |key: &[u8], end: &[u8]| state.permits("alice", key, end, Access::Read);
        assert!(read(b"b", b""));
        assert!(read(b"b", b"d"), "two adjacent grants cover b..d");
        assert!(read(b"a", b"e"));
        assert!(!read(b"a", b"f"), "e..f is not granted");
        assert!(!read(b"0", b"b"), "0..a is not granted");
        assert!(!read(b"k", b""), "k is write-only");
        assert!(!read(b"a", b"\0"), "everything from a on is not granted");
        let write = |key: &[u8], end: &[u8]| state.permits("alice", key, end, Access::Write);
        assert!(write(b"k", b""));
        assert!(write(b"c", b"e"));
        assert!(!write(b"b", b""), "a..c is read-only");
        assert!(!write(b"k", b"l"), "only the single key k is granted");
        assert!(!state.permits("nobody", b"b", b"", Access::Read));
    }

    #[test]
    fn an_unbounded_grant_covers_everything_after_it() {
        let state = state_with(&[(b"", b"\0", Access::ReadWrite)]);
        assert!(state.permits("alice", b"", b"\0", Access::Read));
        assert!(state.permits("alice", b"zzz", b"", Access::Write));
    }

    #[test]
    fn the_internal_keyspace_is_written_by_root_only() {
        let state = state_with(&[(b"", b"\0", Access::ReadWrite)]);
        assert!(state.permits("alice", b"__node/", b"__node0", Access::Read));
        for (key, end) in [
            (&b"__node/1"[..], &b""[..]),
            (b"__", b"__\xff"),
            (b"", b"\0"),
            (b"_", b"_a"),
        ] {
            assert!(
                !state.permits("alice", key, end, Access::Write),
                "{key:?}..{end:?}"
            );
            assert!(state.permits(ROOT, key, end, Access::Write));
        }
        assert!(state.permits("alice", b"_a", b"", Access::Write));
        assert!(state.permits("alice", b"_`", b"", Access::Write));
    }

    #[test]
    fn a_txn_needs_every_access_of_both_branches() {
        use crate::kv::{Compare, CompareOp, CompareTarget, PutRequest, RangeRequest};
        let state = state_with(&[(b"r", b"", Access::Read), (b"w", b"", Access::Write)]);
        let txn = |compare: &[u8], success: TxnOp, failure: TxnOp| TxnRequest {
            compare: vec![Compare::new(
                compare.to_vec(),
                CompareOp::Equal,
                CompareTarget::Version(0),
            )],
            success: vec![success],
            failure: vec![failure],
        };
        let put = |key: &[u8]| TxnOp::Put(PutRequest::new(key.to_vec(), b"v".to_vec()));
        let get = |key: &[u8]| TxnOp::Range(RangeRequest::key(key.to_vec()));
        assert!(state.permits_txn("alice", &txn(b"r", put(b"w"), get(b"r"))));
        assert!(
            !state.permits_txn("alice", &txn(b"w", put(b"w"), get(b"r"))),
            "compare on w"
        );
        assert!(
            !state.permits_txn("alice", &txn(b"r", put(b"w"), put(b"r"))),
            "failure writes r"
        );
        let nested = TxnOp::Txn(txn(b"r", get(b"w"), get(b"r")));
        assert!(
            !state.permits_txn("alice", &txn(b"r", nested, get(b"r"))),
            "nested reads w"
        );
        let mut with_prev = PutRequest::new(b"w".to_vec(), b"v".to_vec());
        with_prev.prev_kv = true;
        assert!(!state.permits_txn("alice", &txn(b"r", TxnOp::Put(with_prev), get(b"r"))));
    }
}
