//! Typed metadata keys over the flat KV space: one encode and one decode per key type.
//!
//! Every key layout, in one place (numbers are zero-padded decimal of fixed width, so
//! keys sort numerically and scans by prefix return them in id order):
//!
//! ```text
//! __node/{node_id:020}                            NodeKey
//! __datanode_table/{node_id:020}/{table_id:010}   DatanodeTableKey
//! __seq/{name}                                    SequenceKey
//! __catalog/{catalog}                             CatalogKey
//! __schema/{catalog}/{schema}                     SchemaKey
//! __table_name/{catalog}/{schema}/{table}         TableNameKey
//! __table_info/{table_id:010}                     TableInfoKey
//! __table_route/{table_id:010}                    TableRouteKey
//! __procedure/procedure/{id}                       procedure records (state_store.rs)
//! __procedure_seg/{key}/{gen:016x}/{i:08}          segments of large procedure states
//! __join_token/{sha256 of the token, hex}          join token records (model/join_token.rs)
//! __tombstone/{any key above}                      a dropped table's keys, kept until
//!                                                  its drop is done (manager/table.rs)
//! __switch/{name}                                 a cluster-wide switch, `true` or
//!                                                  `false` (`maintenance`, `balancer`)
//! __route/version                                  the range route catalog's version
//!                                                  (decimal text; manager/route.rs)
//! __route/next_id                                  the next route id (decimal text)
//! __route/r/{route_id:020}                         a RouteDescriptor (JSON)
//! __tso/bound                                      the timestamp oracle's persisted
//!                                                  window end, physical ms as
//!                                                  decimal text (meta-srv tso.rs)
//! __fence                                          never written: deleted by a
//!                                                  transaction only to order it
//!                                                  through the log (fence_absent)
//! ```
//!
//! Values are JSON of the `model` types: `__table_name` holds `TableNameValue`
//! (`{"table_id":N}`), `__table_info` `TableInfo`, `__table_route` `TableRoute`,
//! `__datanode_table` `DatanodeTable`, `__catalog` `CatalogValue`, `__schema`
//! `SchemaValue`; `__seq` holds decimal text.
//!
//! Names (catalog, schema, table, sequence) are 1 to 255 bytes of UTF-8 with no `/` and
//! no control characters; constructors refuse anything else, so every key that encodes
//! also decodes to itself. Decoding arbitrary bytes returns an error, never panics.
//!
//! ```
//! use common_meta::key::{MetaKey, TableNameKey};
//! let key = TableNameKey::new("greptime", "public", "metrics")?;
//! assert_eq!(key.encode(), b"__table_name/greptime/public/metrics");
//! assert_eq!(TableNameKey::decode(&key.encode())?, key);
//! # Ok::<(), common_meta::Error>(())
//! ```

mod catalog;
mod node;
mod sequence;
mod table;

pub use catalog::{CatalogKey, SchemaKey};
pub use node::{DatanodeTableKey, NodeKey};
pub use sequence::SequenceKey;
pub use table::{TableInfoKey, TableNameKey, TableRouteKey};

use crate::error::{Error, Result};
use crate::kv::RangeRequest;

/// Everything of the range route catalog.
pub const ROUTE_PREFIX: &[u8] = b"__route/";
/// The route catalog's version: moves by exactly one per save.
pub const ROUTE_VERSION_KEY: &[u8] = b"__route/version";
/// The next route id to hand out.
pub const ROUTE_NEXT_ID_KEY: &[u8] = b"__route/next_id";
/// The prefix of the routes themselves.
pub const ROUTE_ITEM_PREFIX: &[u8] = b"__route/r/";

/// The key of route `id`.
pub fn route_key(id: u64) -> Vec<u8> {
    format!("__route/r/{id:020}").into_bytes()
}

/// The key holding the timestamp oracle's persisted window end: no timestamp at or
/// above it (physical milliseconds, decimal text) was handed out.
pub const TSO_BOUND_KEY: &[u8] = b"__tso/bound";

/// The prefix under which a dropped table's keys wait until the drop is finished (so a
/// failed drop can put them back).
pub const TOMBSTONE_PREFIX: &str = "__tombstone/";

/// A key that is never written: deleting it makes a transaction a write (ordered
/// through the log after every earlier write) without changing anything.
pub const FENCE_KEY: &str = "__fence";

/// The key of cluster-wide switch `name` (maintenance mode, the balancer).
pub fn switch_key(name: &str) -> Vec<u8> {
    format!("__switch/{name}").into_bytes()
}

/// Where `key` is kept while its table is being dropped.
pub fn tombstone(key: &[u8]) -> Vec<u8> {
    let mut out = TOMBSTONE_PREFIX.as_bytes().to_vec();
    out.extend_from_slice(key);
    out
}

/// Longest name allowed in a key segment, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// Width of a zero-padded `u64` segment (`u64::MAX` has 20 digits).
const U64_WIDTH: usize = 20;
/// Width of a zero-padded `u32` segment (`u32::MAX` has 10 digits).
const U32_WIDTH: usize = 10;

/// A typed key with exactly one byte encoding.
pub trait MetaKey: Sized {
    /// The first segment of every key of this type, for example `__node`.
    const PREFIX: &'static str;

    /// The key's bytes.
    fn encode(&self) -> Vec<u8>;

    /// Parses bytes produced by [`MetaKey::encode`]; anything else is an error.
    fn decode(bytes: &[u8]) -> Result<Self>;

    /// A range over every key of this type.
    fn scan_all() -> RangeRequest {
        RangeRequest::prefix(format!("{}/", Self::PREFIX).into_bytes())
    }
}

fn decode_error(bytes: &[u8], reason: impl Into<String>) -> Error {
    Error::KeyDecode {
        key: String::from_utf8_lossy(bytes).into_owned(),
        reason: reason.into(),
    }
}

/// Splits `bytes` into the `N` segments after `prefix/`.
fn segments<'a, const N: usize>(bytes: &'a [u8], prefix: &str) -> Result<[&'a str; N]> {
    let text = std::str::from_utf8(bytes).map_err(|_| decode_error(bytes, "not UTF-8"))?;
    let rest = text
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| decode_error(bytes, format!("does not start with {prefix}/")))?;
    let parts: Vec<&str> = rest.split('/').collect();
    parts.try_into().map_err(|parts: Vec<&str>| {
        decode_error(
            bytes,
            format!(
                "expected {N} segments after {prefix}/, found {}",
                parts.len()
            ),
        )
    })
}

fn parse_u64(bytes: &[u8], segment: &str, what: &str) -> Result<u64> {
    parse_fixed(bytes, segment, what, U64_WIDTH)
}

fn parse_u32(bytes: &[u8], segment: &str, what: &str) -> Result<u32> {
    let value = parse_fixed(bytes, segment, what, U32_WIDTH)?;
    u32::try_from(value).map_err(|_| decode_error(bytes, format!("{what} {value} exceeds u32")))
}

fn parse_fixed(bytes: &[u8], segment: &str, what: &str, width: usize) -> Result<u64> {
    if segment.len() != width || !segment.bytes().all(|b| b.is_ascii_digit()) {
        return Err(decode_error(
            bytes,
            format!("{what} must be {width} decimal digits, found {segment:?}"),
        ));
    }
    segment
        .parse()
        .map_err(|_| decode_error(bytes, format!("{what} {segment} exceeds u64")))
}

/// Checks that `name` can be a key segment.
fn check_name(what: &'static str, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_NAME_BYTES {
        "must be at most 255 bytes"
    } else if name.contains('/') {
        "must not contain '/'"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        what,
        name: name.to_string(),
        reason,
    })
}

/// Checks a decoded name segment, reporting a decode error on the whole key.
fn decoded_name(bytes: &[u8], what: &'static str, name: &str) -> Result<String> {
    check_name(what, name).map_err(|e| decode_error(bytes, e.to_string()))?;
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_.\\-]{1,40}|[^/\\p{Cc}]{1,20}"
            .prop_filter("fits a segment", |s| check_name("test", s).is_ok())
    }

    fn round_trip<K: MetaKey + PartialEq + std::fmt::Debug>(key: K) {
        let bytes = key.encode();
        assert!(bytes.starts_with(K::PREFIX.as_bytes()));
        let scan = K::scan_all();
        assert!(
            bytes >= scan.key && bytes < scan.range_end,
            "inside its prefix scan"
        );
        assert_eq!(K::decode(&bytes).unwrap(), key);
    }

    proptest! {
        #[test]
        fn node_keys_round_trip(id: u64) { round_trip(NodeKey::new(id)); }

        #[test]
        fn datanode_table_keys_round_trip(node: u64, table: u32) {
            round_trip(DatanodeTableKey::new(node, table));
        }

        #[test]
        fn table_id_keys_round_trip(id: u32) {
            round_trip(TableInfoKey::new(id));
            round_trip(TableRouteKey::new(id));
        }

        #[test]
        fn name_keys_round_trip(c in name(), s in name(), t in name()) {
            round_trip(SequenceKey::new(&t).unwrap());
            round_trip(CatalogKey::new(&c).unwrap());
            round_trip(SchemaKey::new(&c, &s).unwrap());
            round_trip(TableNameKey::new(&c, &s, &t).unwrap());
        }

        #[test]
        fn numeric_keys_sort_by_id(a: u64, b: u64) {
            prop_assert_eq!(a.cmp(&b), NodeKey::new(a).encode().cmp(&NodeKey::new(b).encode()));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Any outcome but a panic is fine; whatever decodes must re-encode to itself.
            if let Ok(k) = NodeKey::decode(&bytes) { prop_assert_eq!(k.encode(), bytes.clone()); }
            if let Ok(k) = DatanodeTableKey::decode(&bytes) { prop_assert_eq!(k.encode(), bytes.clone()); }
            if let Ok(k) = TableNameKey::decode(&bytes) { prop_assert_eq!(k.encode(), bytes.clone()); }
            if let Ok(k) = SchemaKey::decode(&bytes) { prop_assert_eq!(k.encode(), bytes.clone()); }
            if let Ok(k) = SequenceKey::decode(&bytes) { prop_assert_eq!(k.encode(), bytes.clone()); }
            if let Ok(k) = TableInfoKey::decode(&bytes) { prop_assert_eq!(k.encode(), bytes.clone()); }
        }
    }

    /// One row per malformed key: the decoder and a fragment of the reason it must give.
    #[test]
    fn malformed_keys_are_rejected_with_reasons() {
        type Decoder = fn(&[u8]) -> Result<()>;
        fn node(b: &[u8]) -> Result<()> {
            NodeKey::decode(b).map(drop)
        }
        fn table_name(b: &[u8]) -> Result<()> {
            TableNameKey::decode(b).map(drop)
        }
        fn table_info(b: &[u8]) -> Result<()> {
            TableInfoKey::decode(b).map(drop)
        }
        fn dn_table(b: &[u8]) -> Result<()> {
            DatanodeTableKey::decode(b).map(drop)
        }
        let cases: &[(&[u8], Decoder, &str)] = &[
            (b"__node/1", node, "20 decimal digits"),
            (b"__node/0000000000000000000x", node, "20 decimal digits"),
            (b"__node/99999999999999999999", node, "exceeds u64"),
            (
                b"__nodes/00000000000000000001",
                node,
                "does not start with __node/",
            ),
            (b"\xff\xfe", node, "not UTF-8"),
            (b"", node, "does not start with"),
            (
                b"__node/00000000000000000001/2",
                node,
                "expected 1 segments",
            ),
            (b"__table_name/a/b", table_name, "expected 3 segments"),
            (b"__table_name/a//c", table_name, "must not be empty"),
            (b"__table_name/a/b/c\n", table_name, "control characters"),
            (b"__table_info/4294967296", table_info, "exceeds u32"),
            (b"__table_info/+000000001", table_info, "10 decimal digits"),
            (
                b"__datanode_table/00000000000000000001",
                dn_table,
                "expected 2 segments",
            ),
        ];
        for (bytes, decode, want) in cases {
            match decode(bytes) {
                Err(Error::KeyDecode { reason, .. }) => {
                    assert!(
                        reason.contains(want),
                        "{bytes:?}: {reason:?} lacks {want:?}"
                    )
                }
                other => panic!("{bytes:?}: expected a KeyDecode error, got {other:?}"),
            }
        }
    }

    #[test]
    fn bad_names_are_refused_at_construction() {
        for (name, want) in [
            ("", "must not be empty"),
            ("a/b", "must not contain '/'"),
            ("tab\tle", "control characters"),
        ] {
            let err = TableNameKey::new("c", "s", name).unwrap_err();
            assert!(err.to_string().contains(want), "{name:?}: {err}");
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(CatalogKey::new(&long).is_err());
        assert!(CatalogKey::new(&long[..MAX_NAME_BYTES]).is_ok());
    }

    #[test]
    fn layouts_are_as_documented() {
        assert_eq!(NodeKey::new(7).encode(), b"__node/00000000000000000007");
        assert_eq!(
            DatanodeTableKey::new(2, 1024).encode(),
            b"__datanode_table/00000000000000000002/0000001024"
        );
        assert_eq!(
            SequenceKey::new("table_id").unwrap().encode(),
            b"__seq/table_id"
        );
        assert_eq!(CatalogKey::new("c").unwrap().encode(), b"__catalog/c");
        assert_eq!(SchemaKey::new("c", "s").unwrap().encode(), b"__schema/c/s");
        assert_eq!(TableInfoKey::new(42).encode(), b"__table_info/0000000042");
        assert_eq!(TableRouteKey::new(42).encode(), b"__table_route/0000000042");
    }
}
