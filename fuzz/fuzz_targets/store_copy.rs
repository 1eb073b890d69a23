//! A snapshot's store copy as a member receives it (`SledKvStore::restore_from`): never
//! panics; bytes that restore are exactly what a copy of the restored store writes (or,
//! for a copy without a history, which gets one started, a copy that restores to
//! itself), and bytes that do not change nothing.
#![no_main]

use std::sync::OnceLock;

use common_meta::kv::{KvLimits, SledKvStore};

fn store() -> &'static SledKvStore {
    static STORE: OnceLock<(tempfile::TempDir, SledKvStore)> = OnceLock::new();
    let (_, store) = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = SledKvStore::open(dir.path(), KvLimits::default()).expect("a store");
        (dir, store)
    });
    store
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let store = store();
    let mut before = Vec::new();
    store
        .copy()
        .and_then(|c| c.write_to(&mut before))
        .expect("a copy");
    let mut after = Vec::new();
    let restored = store.restore_from(&mut &data[..]);
    store
        .copy()
        .and_then(|c| c.write_to(&mut after))
        .expect("a copy");
    match restored {
        Ok(()) if after.len() == data.len() => {
            assert_eq!(after, data, "a restored copy writes back the same bytes");
        }
        Ok(()) => {
            // A history was started: the result is a fixpoint of restoring.
            store
                .restore_from(&mut &after[..])
                .expect("a copy written by the store restores");
            let mut again = Vec::new();
            store
                .copy()
                .and_then(|c| c.write_to(&mut again))
                .expect("a copy");
            assert_eq!(again, after, "a store's own copy restores to itself");
        }
        Err(_) => assert_eq!(after, before, "a bad copy changes nothing"),
    }
});
