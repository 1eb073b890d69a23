//! What the raft driver decodes from the log: an entry's payload (`kv::Command`, both
//! formats) and its proposal context. Never panics; a payload that decodes round-trips
//! through the current format.
#![no_main]

use common_meta::kv::{Command, parse_context, proposal_context};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(command) = Command::decode(data) {
        let again = Command::decode(&command.clone().encode());
        assert_eq!(again.ok().as_ref(), Some(&command));
    }
    if let Some((member, proposal)) = parse_context(data) {
        assert_eq!(proposal_context(member, proposal), data[..16]);
    }
});
