//! Cluster identity: the initial member list, the cluster id derived from it, and the
//! check that a data directory belongs to this cluster and this member.
//!
//! The cluster id is a stable hash (FNV-1a) of the cluster token and the sorted member
//! ids, not of addresses, so a member may move to a new address and keep its data. It
//! is stored in the data directory's database on first start; a later start with a
//! different cluster or member id is refused before anything is served. A directory
//! filled by `meta-srv restore` also holds a *seed* (the backup's digest) that goes into
//! the hash, so a restored cluster never shares its id with the cluster it came from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use meta_client::{MetaClient, MetaClientOptions};

use crate::config::Config;

use crate::error::{Error, Result};

const IDENTITY_TREE: &str = "identity";
const CLUSTER_ID: &[u8] = b"cluster_id";
const MEMBER_ID: &[u8] = b"member_id";
const SEED: &[u8] = b"seed";

/// The members a cluster starts with: id -> gRPC address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InitialCluster {
    members: BTreeMap<u64, String>,
}

impl InitialCluster {
    /// Parses `1=host:port,2=host:port,...`; an empty string is an empty cluster.
    pub fn parse(spec: &str) -> std::result::Result<InitialCluster, String> {
        let mut members = BTreeMap::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, addr) = part
                .split_once('=')
                .ok_or_else(|| format!("member {part:?} is not ID=HOST:PORT"))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| format!("member {part:?}: id {id:?} is not a number"))?;
            if id == 0 {
                return Err(format!("member {part:?}: ids start at 1"));
            }
            let addr = addr.trim();
            if addr.is_empty() || !addr.contains(':') {
                return Err(format!("member {part:?}: address must be HOST:PORT"));
            }
            if members.insert(id, addr.to_string()).is_some() {
                return Err(format!("member id {id} appears twice"));
            }
        }
        Ok(InitialCluster { members })
    }

    /// A one-member cluster.
    pub fn single(id: u64, addr: String) -> InitialCluster {
        InitialCluster {
            members: BTreeMap::from([(id, addr)]),
        }
    }

    /// Member ids and addresses.
    pub fn members(&self) -> &BTreeMap<u64, String> {
        &self.members
    }

    /// True when no member is listed.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The cluster id for `token`: FNV-1a over the token and the sorted member ids.
    pub fn cluster_id(&self, token: &str) -> u64 {
        self.cluster_id_seeded(token, &[])
    }

    /// [`InitialCluster::cluster_id`] with a seed fed last (none when empty, which
    /// keeps the ids of clusters made before seeds existed).
    pub fn cluster_id_seeded(&self, token: &str, seed: &[u8]) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for byte in bytes {
                hash ^= u64::from(*byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        };
        feed(token.as_bytes());
        for id in self.members.keys() {
            feed(b",");
            feed(&id.to_be_bytes());
        }
        if !seed.is_empty() {
            feed(b"/");
            feed(seed);
        }
        hash
    }
}

fn sled_error(context: &str) -> impl FnOnce(sled::Error) -> Error + '_ {
    move |source| {
        Error::Meta(common_meta::Error::Storage {
            context: context.to_string(),
            source,
        })
    }
}

/// The `(cluster id, member id)` stored in a data directory's database, if any.
pub fn read_identity(db: &sled::Db) -> Result<Option<(u64, u64)>> {
    let tree = db
        .open_tree(IDENTITY_TREE)
        .map_err(sled_error("opening the identity tree"))?;
    let read = |key: &[u8]| -> Result<Option<u64>> {
        Ok(tree
            .get(key)
            .map_err(sled_error("reading the identity"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    };
    Ok(read(CLUSTER_ID)?.zip(read(MEMBER_ID)?))
}

/// The seed a restore left in the data directory's database (empty: none).
pub fn read_seed(db: &sled::Db) -> Result<Vec<u8>> {
    let tree = db
        .open_tree(IDENTITY_TREE)
        .map_err(sled_error("opening the identity tree"))?;
    Ok(tree
        .get(SEED)
        .map_err(sled_error("reading the identity"))?
        .map(|v| v.to_vec())
        .unwrap_or_default())
}

/// Records the seed of a restored cluster (before [`check_identity`], which flushes).
pub fn write_seed(db: &sled::Db, seed: &[u8]) -> Result<()> {
    db.open_tree(IDENTITY_TREE)
        .map_err(sled_error("opening the identity tree"))?
        .insert(SEED, seed)
        .map_err(sled_error("writing the identity"))?;
    Ok(())
}

/// Records the identity in a new data directory, or checks it against an existing one.
pub fn check_identity(
    db: &sled::Db,
    data_dir: &Path,
    cluster_id: u64,
    member_id: u64,
) -> Result<()> {
    let tree = db
        .open_tree(IDENTITY_TREE)
        .map_err(sled_error("opening the identity tree"))?;
    let stored = read_identity(db)?;
    match (stored.map(|s| s.0), stored.map(|s| s.1)) {
        (None, _) | (_, None) => {
            tree.insert(CLUSTER_ID, &cluster_id.to_be_bytes())
                .and_then(|_| tree.insert(MEMBER_ID, &member_id.to_be_bytes()))
                .map_err(sled_error("writing the identity"))?;
            db.flush().map_err(sled_error("flushing the identity"))?;
            Ok(())
        }
        (Some(stored), _) if stored != cluster_id => Err(Error::WrongCluster {
            data_dir: data_dir.to_path_buf(),
            stored,
            expected: cluster_id,
        }),
        (_, Some(stored)) if stored != member_id => Err(Error::WrongMember {
            data_dir: data_dir.to_path_buf(),
            stored,
            expected: member_id,
        }),
        _ => Ok(()),
    }
}

/// Works out which cluster this member belongs to: `(cluster id, initial members,
/// initial voters)`. A new member given `join` asks the running cluster; one that
/// already has an identity and joined keeps it; otherwise the id comes from the
/// initial cluster (or this member alone) and the token.
pub async fn resolve(
    config: &Config,
    db: &sled::Db,
    grpc_addr: SocketAddr,
) -> Result<(u64, BTreeMap<u64, String>, Vec<u64>)> {
    let join = config.join.trim();
    if !join.is_empty() {
        if let Some((cluster_id, _)) = read_identity(db)? {
            return Ok((cluster_id, BTreeMap::new(), Vec::new()));
        }
        let endpoints: Vec<&str> = join.split(',').map(str::trim).collect();
        let fail = |reason: String| Error::Join {
            endpoints: join.to_string(),
            reason,
        };
        let client = MetaClient::new(&endpoints, MetaClientOptions::default())
            .map_err(|e| fail(e.to_string()))?;
        let status = client.status().await.map_err(|e| fail(e.to_string()))?;
        if !status.members.iter().any(|m| m.id == config.node_id) {
            return Err(fail(format!(
                "member {} is not in the cluster; run `metactl member add {} ADDR` first",
                config.node_id, config.node_id
            )));
        }
        let members = status.members.into_iter().map(|m| (m.id, m.addr)).collect();
        return Ok((status.cluster_id, members, Vec::new()));
    }
    let configured = config
        .cluster()
        .map_err(|e| Error::Meta(common_meta::Error::invalid_argument(e.to_string())))?;
    let cluster = if configured.is_empty() {
        InitialCluster::single(config.node_id, grpc_addr.to_string())
    } else {
        configured
    };
    let voters = cluster.members().keys().copied().collect();
    // A restored directory's seed keeps its cluster apart from the one backed up.
    let seed = read_seed(db)?;
    Ok((
        cluster.cluster_id_seeded(&config.cluster_token, &seed),
        cluster.members().clone(),
        voters,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cases() {
        let ok = InitialCluster::parse("1=a:1, 2=b:2,3=c:3").unwrap();
        assert_eq!(ok.members().len(), 3);
        assert_eq!(ok.members()[&2], "b:2");
        assert!(InitialCluster::parse("").unwrap().is_empty());
        for (spec, want) in [
            ("1", "is not ID=HOST:PORT"),
            ("x=a:1", "is not a number"),
            ("0=a:1", "ids start at 1"),
            ("1=a", "HOST:PORT"),
            ("1=a:1,1=b:2", "appears twice"),
        ] {
            let err = InitialCluster::parse(spec).unwrap_err();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }

    #[test]
    fn cluster_id_depends_on_token_and_ids_not_addresses() {
        let a = InitialCluster::parse("1=a:1,2=b:2").unwrap();
        let moved = InitialCluster::parse("2=z:9,1=y:8").unwrap();
        let other = InitialCluster::parse("1=a:1,3=b:2").unwrap();
        assert_eq!(a.cluster_id("t"), moved.cluster_id("t"));
        assert_ne!(a.cluster_id("t"), other.cluster_id("t"));
        assert_ne!(a.cluster_id("t"), a.cluster_id("u"));
        assert_eq!(a.cluster_id("t"), a.cluster_id_seeded("t", b""));
        assert_ne!(a.cluster_id("t"), a.cluster_id_seeded("t", b"digest"));
        assert_eq!(
            a.cluster_id_seeded("t", b"digest"),
            moved.cluster_id_seeded("t", b"digest")
        );
    }

    #[test]
    fn identity_is_recorded_then_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        check_identity(&db, dir.path(), 7, 1).unwrap();
        check_identity(&db, dir.path(), 7, 1).unwrap();
        let err = check_identity(&db, dir.path(), 8, 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to cluster"), "{err}");
        let err = check_identity(&db, dir.path(), 7, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to member 1"), "{err}");
    }
}
