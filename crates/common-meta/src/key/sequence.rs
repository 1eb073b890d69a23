//! `__seq/{name}`: the high-water mark of an id sequence.

use super::{MetaKey, check_name, decoded_name, segments};
use crate::error::Result;

/// `__seq/{name}`: a sequence's high-water mark.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SequenceKey {
    name: String,
}

impl SequenceKey {
    /// The key of sequence `name`; refuses names that cannot be a key segment.
    pub fn new(name: &str) -> Result<Self> {
        check_name("sequence", name)?;
        Ok(SequenceKey {
            name: name.to_string(),
        })
    }

    /// The sequence's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl MetaKey for SequenceKey {
    const PREFIX: &'static str = "__seq";

    fn encode(&self) -> Vec<u8> {
        format!("{}/{}", Self::PREFIX, self.name).into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let [name] = segments(bytes, Self::PREFIX)?;
        Ok(SequenceKey {
            name: decoded_name(bytes, "sequence", name)?,
        })
    }
}
