//! Backup files: a consistent copy of a member's store at one revision, as
//! `Maintenance.Snapshot` streams it (and `etcdctl snapshot save` keeps it), and as
//! `meta-srv restore` starts a new cluster from it.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! 0   8  magic "MSRVBKUP"
//! 8   4  file format version (1)
//! 12  4  reserved, zero
//! 16  8  store revision of the copy
//! 24  8  id of the cluster it was taken from
//! 32  8  when it was taken, unix milliseconds
//! 40  8  body length
//! 48  .. body: the store's portable copy (`StoreCopy::portable`, its stream format):
//!        data, history, leases, revision, compaction; no raft state, members or
//!        client sessions
//! ..     zeros up to a multiple of 512 bytes
//! end-32 SHA-256 of everything before it
//! ```
//!
//! The padding and trailing digest are what etcd's clients check on a snapshot they
//! save (its size modulo 512 is 32); the body is ours, not a bbolt database, so etcd's
//! own tools cannot read it and `meta-srv restore` cannot read theirs.
//!
//! **Restore** checks the whole file before writing anything, then fills a new data
//! directory: the store from the body, and an identity whose cluster id is derived from
//! the cluster token, the member ids *and the file's digest*, so the new cluster never
//! takes the old one's id (members of the old cluster are refused by the new one), while
//! every member restored from the same file with the same `--initial-cluster` agrees.
//! The raft log starts empty: the first start bootstraps the configuration as for any
//! new cluster, above the restored revision.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common_meta::kv::{
    KvLimits, RangeRequest, SledKvStore, StoreCopy, TxnOp, TxnOpResponse, TxnRequest,
};
use sha2::{Digest, Sha256};

use crate::data_dir::DataDir;
use crate::error::{Error, Result};
use crate::identity::{InitialCluster, check_identity, write_seed};

/// The first bytes of every backup file.
const MAGIC: &[u8; 8] = b"MSRVBKUP";

/// The file format this binary writes and reads.
const FILE_VERSION: u32 = 1;

/// Bytes before the body.
pub const HEADER_LEN: u64 = 48;

/// The unit a file is padded to, before the digest.
const PAD_TO: u64 = 512;

/// Bytes of the trailing SHA-256.
pub const DIGEST_LEN: u64 = 32;

/// What a backup file's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// The store revision of the copy.
    pub revision: i64,
    /// The cluster it was taken from.
    pub source_cluster: u64,
    /// When it was taken, unix milliseconds.
    pub taken_ms: u64,
    /// Length of the body (the store copy).
    pub body_len: u64,
    /// The file's SHA-256 (its last 32 bytes).
    pub digest: [u8; 32],
}

/// The length of a backup file whose body is `body_len` bytes.
pub fn file_len(body_len: u64) -> u64 {
    (HEADER_LEN + body_len).div_ceil(PAD_TO) * PAD_TO + DIGEST_LEN
}

/// Writes `copy` (already [`StoreCopy::portable`]) as a backup file taken from
/// `source_cluster`; returns what its header says. The caller flushes and syncs.
pub fn write(copy: &StoreCopy, source_cluster: u64, out: &mut impl Write) -> Result<Backup> {
    let body_len = copy.encoded_len();
    let taken_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut out = Hashing {
        out,
        hasher: Sha256::new(),
        written: 0,
    };
    let io = |source| Error::Io {
        context: "writing a backup".to_string(),
        source,
    };
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&FILE_VERSION.to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes());
    header.extend_from_slice(&copy.revision().to_be_bytes());
    header.extend_from_slice(&source_cluster.to_be_bytes());
    header.extend_from_slice(&taken_ms.to_be_bytes());
    header.extend_from_slice(&body_len.to_be_bytes());
    out.write_all(&header).map_err(io)?;
    copy.write_to(&mut out)?;
    let padded = file_len(body_len) - DIGEST_LEN;
    let zeros = vec![0u8; (padded - out.written) as usize];
    out.write_all(&zeros).map_err(io)?;
    let digest: [u8; 32] = out.hasher.finalize().into();
    out.out.write_all(&digest).map_err(io)?;
    Ok(Backup {
        revision: copy.revision(),
        source_cluster,
        taken_ms,
        body_len,
        digest,
    })
}

/// A writer that hashes and counts what passes through it.
struct Hashing<'a, W: Write> {
    out: &'a mut W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for Hashing<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Checks the backup file at `path` whole (digest, header, lengths) and returns its
/// header; nothing is written.
pub fn verify(path: &Path) -> Result<Backup> {
    let bad = |reason: String| Error::Backup {
        path: path.to_path_buf(),
        reason,
    };
    let io = |context: &str| {
        let context = format!("{context} {}", path.display());
        move |source| Error::Io { context, source }
    };
    let mut file = File::open(path).map_err(io("opening"))?;
    let size = file.metadata().map_err(io("reading the size of"))?.len();
    let mut header = [0u8; HEADER_LEN as usize];
    if size < HEADER_LEN + DIGEST_LEN {
        return Err(bad(format!("{size} bytes is too short for a backup")));
    }
    file.read_exact(&mut header).map_err(io("reading"))?;
    if &header[..8] != MAGIC {
        return Err(bad(
            "not a Metasrv backup (a snapshot saved from etcd itself is a bbolt database, \
             which Metasrv cannot restore)"
                .to_string(),
        ));
    }
    let word = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    let version = u32::from_be_bytes(header[8..12].try_into().unwrap_or([0; 4]));
    if version != FILE_VERSION {
        return Err(bad(format!(
            "backup file format {version}; this binary reads format {FILE_VERSION}"
        )));
    }
    let body_len = word(40);
    if file_len(body_len) != size {
        return Err(bad(format!(
            "{size} bytes where its header says {} (truncated or padded)",
            file_len(body_len)
        )));
    }
    file.rewind().map_err(io("reading"))?;
    let mut hasher = Sha256::new();
    let copied = io::copy(
        &mut (&mut file).take(size - DIGEST_LEN),
        &mut HashSink(&mut hasher),
    )
    .map_err(io("reading"))?;
    let mut stored = [0u8; DIGEST_LEN as usize];
    file.read_exact(&mut stored).map_err(io("reading"))?;
    let digest: [u8; 32] = hasher.finalize().into();
    if copied != size - DIGEST_LEN || digest != stored {
        return Err(bad(
            "SHA-256 mismatch: the file is damaged; nothing was restored".to_string(),
        ));
    }
    Ok(Backup {
        revision: word(16) as i64,
        source_cluster: word(24),
        taken_ms: word(32),
        body_len,
        digest,
    })
}

/// Feeds written bytes to a hasher.
struct HashSink<'a>(&'a mut Sha256);

impl Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The member and cluster a restore makes.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// The new data directory (absent or empty).
    pub data_dir: PathBuf,
    /// This member's id.
    pub node_id: u64,
    /// The new cluster's members; empty: this member alone.
    pub cluster: InitialCluster,
    /// The cluster token the new cluster starts with.
    pub cluster_token: String,
}

/// What a restore made.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The backup's header.
    pub backup: Backup,
    /// The new cluster's id.
    pub cluster_id: u64,
    /// Keys in the restored store.
    pub keys: u64,
}

/// Fills a new data directory from the backup at `from` (see the module doc). A bad
/// file, a member id outside `--initial-cluster` or a data directory that is not empty
/// is refused before anything is written; a failure part way removes what was written.
pub fn restore(from: &Path, target: &RestoreTarget) -> Result<Restored> {
    let backup = verify(from)?;
    let refuse = |reason: String| Error::Backup {
        path: from.to_path_buf(),
        reason,
    };
    if !target.cluster.is_empty() && !target.cluster.members().contains_key(&target.node_id) {
        return Err(refuse(format!(
            "member {} is not in --initial-cluster",
            target.node_id
        )));
    }
    let dir = &target.data_dir;
    let existed = dir.exists();
    if existed
        && std::fs::read_dir(dir)
            .map_err(|source| Error::Io {
                context: format!("listing {}", dir.display()),
                source,
            })?
            .next()
            .is_some()
    {
        return Err(refuse(format!(
            "data directory {} is not empty; restore makes a new one",
            dir.display()
        )));
    }
    let restored = fill(from, &backup, target);
    if restored.is_err() {
        // Best effort: the directory was empty, so nothing of value is removed.
        if existed {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    restored
}

/// How many keys the store holds now.
fn count_keys(store: &SledKvStore) -> Result<u64> {
    let all = RangeRequest {
        count_only: true,
        ..RangeRequest::prefix(Vec::new())
    };
    let answer = store.read(TxnRequest {
        success: vec![TxnOp::Range(all)],
        ..Default::default()
    })?;
    Ok(match answer.responses.first() {
        Some(TxnOpResponse::Range(range)) => range.count.max(0) as u64,
        _ => 0,
    })
}

fn fill(from: &Path, backup: &Backup, target: &RestoreTarget) -> Result<Restored> {
    let data_dir = DataDir::open(&target.data_dir)?;
    let db = DataDir::open_database(&data_dir.db_path())?;
    let store = SledKvStore::open_in(db.clone(), KvLimits::default())?;
    let mut file = File::open(from).map_err(|source| Error::Io {
        context: format!("opening {}", from.display()),
        source,
    })?;
    file.seek(SeekFrom::Start(HEADER_LEN))
        .map_err(|source| Error::Io {
            context: format!("reading {}", from.display()),
            source,
        })?;
    store.restore_from(&mut BufReader::new(file).take(backup.body_len))?;
    let cluster = if target.cluster.is_empty() {
        InitialCluster::single(target.node_id, String::new())
    } else {
        target.cluster.clone()
    };
    let cluster_id = cluster.cluster_id_seeded(&target.cluster_token, &backup.digest);
    write_seed(&db, &backup.digest)?;
    check_identity(&db, &target.data_dir, cluster_id, target.node_id)?;
    store.flush()?;
    store.sync_filesystem_of(&data_dir.db_path())?;
    data_dir.record_format()?;
    let keys = count_keys(&store)?;
    Ok(Restored {
        backup: backup.clone(),
        cluster_id,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use common_meta::kv::{Command, PutRequest};

    fn store_with(keys: usize) -> (tempfile::TempDir, SledKvStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledKvStore::open(dir.path(), KvLimits::default()).unwrap();
        let writes = (0..keys)
            .map(|i| {
                let txn = TxnRequest {
                    success: vec![TxnOp::Put(PutRequest::new(format!("k{i}"), "v"))],
                    ..Default::default()
                };
                (i as u64 + 1, Command::Txn { txn, session: None })
            })
            .collect();
        store.apply(writes).unwrap();
        (dir, store)
    }

    #[test]
    fn files_are_padded_to_512_then_carry_their_digest() {
        for body in [0, 1, 463, 464, 465, 10_000] {
            let len = file_len(body);
            assert_eq!(len % PAD_TO, DIGEST_LEN, "{body}");
            assert!(len >= HEADER_LEN + body + DIGEST_LEN);
            assert!(len < HEADER_LEN + body + DIGEST_LEN + PAD_TO);
        }
    }

    #[test]
    fn a_written_file_verifies_and_says_what_it_holds() {
        let (dir, store) = store_with(5);
        let copy = store.copy().unwrap().portable();
        let mut bytes = Vec::new();
        let written = write(&copy, 42, &mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, file_len(copy.encoded_len()));
        let path = dir.path().join("b");
        std::fs::write(&path, &bytes).unwrap();
        let read = verify(&path).unwrap();
        assert_eq!(read, written);
        assert_eq!((read.revision, read.source_cluster), (5, 42));
    }

    #[test]
    fn restore_refuses_a_member_outside_the_initial_cluster() {
        let (dir, store) = store_with(1);
        let mut bytes = Vec::new();
        write(&store.copy().unwrap().portable(), 1, &mut bytes).unwrap();
        let path = dir.path().join("b");
        std::fs::write(&path, &bytes).unwrap();
        let target = RestoreTarget {
            data_dir: dir.path().join("new"),
            node_id: 4,
            cluster: InitialCluster::parse("1=a:1,2=b:2").unwrap(),
            cluster_token: "t".to_string(),
        };
        let err = restore(&path, &target).unwrap_err().to_string();
        assert!(
            err.contains("member 4 is not in --initial-cluster"),
            "{err}"
        );
        assert!(!target.data_dir.exists());
    }
}
