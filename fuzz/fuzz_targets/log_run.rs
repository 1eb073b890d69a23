//! What a member reads back from its own disk and from the network about snapshots:
//! a run of log entries (`log_store::runs`) and a snapshot's file reference. Never
//! panics; what decodes round-trips.
#![no_main]

use meta_srv::raft::log_store::{decode_run, encode_run};
use meta_srv::raft::snapshot::FileRef;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = decode_run(data) {
        let again = encode_run(&entries).map(|bytes| decode_run(&bytes));
        assert!(matches!(again, Ok(Ok(ref e)) if *e == entries));
    }
    if let Some(file) = FileRef::decode(data) {
        assert_eq!(FileRef::decode(&file.encode()), Some(file));
    }
});
