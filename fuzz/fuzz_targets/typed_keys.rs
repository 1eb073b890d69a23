//! Every typed key decoder on arbitrary bytes: never panics, and a key that decodes is
//! canonical (it encodes back to exactly the bytes it came from, so one key has one
//! encoding and prefix scans never meet a twin).
#![no_main]

use common_meta::key::{
    CatalogKey, DatanodeTableKey, MetaKey, NodeKey, SchemaKey, SequenceKey, TableInfoKey,
    TableNameKey, TableRouteKey,
};

fn check<K: MetaKey + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(key) = K::decode(data) {
        let bytes = key.encode();
        assert_eq!(
            bytes, data,
            "{key:?} decoded from other bytes than its encoding"
        );
        assert_eq!(K::decode(&bytes).ok().as_ref(), Some(&key));
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    check::<NodeKey>(data);
    check::<DatanodeTableKey>(data);
    check::<SequenceKey>(data);
    check::<CatalogKey>(data);
    check::<SchemaKey>(data);
    check::<TableNameKey>(data);
    check::<TableInfoKey>(data);
    check::<TableRouteKey>(data);
});
