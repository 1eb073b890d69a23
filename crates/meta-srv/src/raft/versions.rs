//! `PeerVersions`: the data format version each peer runs, as its raft batches say, and
//! the cluster version: the lowest among the voters (etcd's cluster version). A change
//! to replicated data may be turned on only once the cluster version allows it, so an
//! upgrade one member at a time never sends a member an entry it cannot read.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use crate::data_dir::{FORMAT_VERSION, OLDEST_FORMAT};

/// Peers' versions; see the module doc.
#[derive(Debug, Default)]
pub struct PeerVersions {
    by_member: RwLock<BTreeMap<u64, u32>>,
}

impl PeerVersions {
    /// Records what member `from` said in a batch (0: it said nothing, format 1).
    pub fn record(&self, from: u64, version: u32) {
        let version = version.max(OLDEST_FORMAT);
        let mut map = self
            .by_member
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if map.get(&from) != Some(&version) {
            tracing::info!(member = from, version, "peer data format version");
            map.insert(from, version);
        }
    }

    /// The version member `id` runs, as its batches said ([`OLDEST_FORMAT`] when it has
    /// said nothing yet).
    pub fn of(&self, id: u64) -> u32 {
        self.by_member
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .copied()
            .unwrap_or(OLDEST_FORMAT)
    }

    /// The cluster version for `voters` as member `me` (which runs [`FORMAT_VERSION`])
    /// knows them: a voter not heard from counts as [`OLDEST_FORMAT`].
    pub fn cluster_version(&self, me: u64, voters: &[u64]) -> u32 {
        let map = self
            .by_member
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        voters
            .iter()
            .map(|id| {
                if *id == me {
                    FORMAT_VERSION
                } else {
                    map.get(id).copied().unwrap_or(OLDEST_FORMAT)
                }
            })
            .min()
            .unwrap_or(FORMAT_VERSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_runs_at_its_lowest_voter() {
        let versions = PeerVersions::default();
        assert_eq!(versions.cluster_version(1, &[1]), FORMAT_VERSION);
        assert_eq!(
            versions.cluster_version(1, &[1, 2, 3]),
            OLDEST_FORMAT,
            "unheard"
        );
        versions.record(2, FORMAT_VERSION);
        versions.record(3, FORMAT_VERSION);
        assert_eq!(versions.cluster_version(1, &[1, 2, 3]), FORMAT_VERSION);
        versions.record(3, 0);
        assert_eq!(
            versions.cluster_version(1, &[1, 2, 3]),
            OLDEST_FORMAT,
            "a format-1 peer says nothing"
        );
    }
}
