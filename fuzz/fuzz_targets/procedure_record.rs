//! A stored procedure record (JSON) from arbitrary bytes: never panics, and a record
//! that loads saves and loads back the same.
#![no_main]

use procedure::ProcedureRecord;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(record) = serde_json::from_slice::<ProcedureRecord>(data) {
        let saved = serde_json::to_vec(&record).expect("a loaded record saves");
        let loaded: ProcedureRecord = serde_json::from_slice(&saved).expect("and loads again");
        assert_eq!(loaded, record);
    }
});
