//! Snapshots as files: built off the driver thread, streamed in chunks, resumable.
//!
//! An *inline* snapshot carries the whole state machine in the raft message; raft-rs
//! asks for it on the driver thread, and it travels as one message. That is fine for a
//! small store and wrong for a large one. A member with [`SnapshotFiles`] instead:
//!
//! 1. answers raft-rs's request for a snapshot with "temporarily unavailable" and builds
//!    an **export** on a thread of its own: a consistent copy of the store (writers wait
//!    only while its entries are gathered, see `StoreCopy`) written to
//!    `{dir}/export-{index}.snap`; raft-rs asks again on its next probe;
//! 2. once built, answers with a snapshot whose data is a [`FileRef`] (path, size,
//!    CRC-32) instead of the bytes. One export serves every follower that needs one,
//!    until the log is compacted past it (the driver does not compact past a snapshot
//!    being sent, within a bound; see `Driver::maybe_compact`);
//! 3. the transport streams the file in chunks (`Cluster/InstallSnapshot`), first
//!    asking the receiver how much of it it holds (`Cluster/SnapshotOffset`), so a
//!    broken stream resumes where it broke (`grpc_transport.rs`);
//! 4. the receiver writes `{dir}/incoming/{from}-{term}-{index}.part`, checks size and
//!    CRC once it is whole, renames it `.snap` and steps the raft message with a
//!    reference to its own file (`incoming.rs`); the driver installs from the file
//!    (`LogStore::apply_snapshot`), which is then removed.
//!
//! A file reference is never taken from the network: the raft stream drops any
//! snapshot message whose data is one ([`FileRef::decode`]), so a member reads only
//! files it wrote itself.
//!
//! Both kinds hold the same bytes, the **envelope**: `[u32 BE length][members as
//! JSON][store copy]` ([`write_envelope`], [`read_envelope`]). A leader streams files
//! only to a peer that runs format [`STREAMED_SNAPSHOTS`] or later (older ones do not
//! know the RPCs) and sends the others inline snapshots.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common_meta::Error;
use common_meta::kv::{SledKvStore, StoreCopy};
use protobuf::Message as _;
use raft::prelude::{ConfState, Snapshot};
use raft::{Storage, StorageError};

use crate::raft::log_store::LogStore;
use crate::raft::members::Members;

mod incoming;

/// How long after an export was built or last given to raft-rs the log keeps the
/// entries after it (raft-rs asks again; a broken stream resumes with the same export).
const EXPORT_IN_USE: Duration = Duration::from_secs(60);

/// The first data format whose members stream snapshots as files.
pub const STREAMED_SNAPSHOTS: u32 = 3;

/// Longest member map a snapshot may hold, as JSON (checked before allocating).
const MAX_MEMBERS_JSON: usize = 16 * 1024 * 1024;

/// Starts the data of a snapshot message that refers to a file. Four zero bytes can
/// never start an inline snapshot, whose first word is the (non-zero) length of the
/// members' JSON.
const FILE_MAGIC: &[u8; 8] = b"\0\0\0\0SNAP";

/// A snapshot file this member wrote: where it is, its length and CRC-32 (IEEE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// The file.
    pub path: PathBuf,
    /// Its length in bytes.
    pub size: u64,
    /// Its CRC-32.
    pub crc32: u32,
}

impl FileRef {
    /// The snapshot data that refers to this file.
    pub fn encode(&self) -> Vec<u8> {
        let path = self.path.as_os_str().as_bytes();
        let mut out = Vec::with_capacity(FILE_MAGIC.len() + 12 + path.len());
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.crc32.to_be_bytes());
        out.extend_from_slice(path);
        out
    }

    /// The file a snapshot's data refers to; `None` for inline data.
    pub fn decode(data: &[u8]) -> Option<FileRef> {
        let rest = data.strip_prefix(FILE_MAGIC)?;
        let size = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let crc32 = u32::from_be_bytes(rest.get(8..12)?.try_into().ok()?);
        let path = std::ffi::OsStr::from_bytes(rest.get(12..)?);
        Some(FileRef {
            path: PathBuf::from(path),
            size,
            crc32,
        })
    }
}

/// A raft snapshot of the state at `index` (of `term`, under `conf_state`) whose data
/// is `data`: an envelope, or a [`FileRef`] to one.
pub fn snapshot_of(data: Vec<u8>, index: u64, term: u64, conf_state: ConfState) -> Snapshot {
    let mut snapshot = Snapshot {
        data: data.into(),
        ..Default::default()
    };
    let metadata = snapshot.mut_metadata();
    metadata.index = index;
    metadata.term = term;
    metadata.set_conf_state(conf_state);
    snapshot
}

/// Writes a snapshot's envelope: the members, then the store copy.
pub fn write_envelope(
    out: &mut impl Write,
    members: &BTreeMap<u64, String>,
    copy: &StoreCopy,
) -> Result<(), Error> {
    let json = serde_json::to_vec(members).map_err(|e| Error::Corrupted {
        location: "the member map".to_string(),
        reason: e.to_string(),
    })?;
    let io = |source| Error::Io {
        context: "writing a snapshot".to_string(),
        source,
    };
    out.write_all(&(json.len() as u32).to_be_bytes())
        .and_then(|()| out.write_all(&json))
        .map_err(io)?;
    copy.write_to(out)?;
    out.flush().map_err(io)
}

/// Replaces `store` with the copy in a snapshot's envelope; returns the members it
/// holds. A bad envelope changes nothing.
pub fn read_envelope(
    input: &mut impl Read,
    store: &SledKvStore,
) -> Result<BTreeMap<u64, String>, Error> {
    let bad = |reason: String| Error::Corrupted {
        location: "a received snapshot".to_string(),
        reason,
    };
    let mut len = [0u8; 4];
    input
        .read_exact(&mut len)
        .map_err(|e| bad(format!("truncated: {e}")))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MEMBERS_JSON {
        return Err(bad(format!("a member map of {len} bytes")));
    }
    let mut json = vec![0u8; len];
    input
        .read_exact(&mut json)
        .map_err(|e| bad(format!("truncated: {e}")))?;
    let members = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    store.restore_from(input)?;
    Ok(members)
}

/// A member's snapshot files: the exports it sends and the files it receives. See the
/// module doc.
pub struct SnapshotFiles {
    dir: PathBuf,
    store: Arc<SledKvStore>,
    /// Whether member `to` takes snapshots as files.
    streams_to: Box<dyn Fn(u64) -> bool + Send + Sync>,
    exports: Mutex<Exports>,
    /// Snapshot bytes received over every stream (status and tests).
    received: AtomicU64,
    /// Streams that resumed a file received in part before.
    resumed: AtomicU64,
    /// One receiving stream at a time.
    receiving: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for SnapshotFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFiles")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The leader side: the export raft-rs is given, and whether one is being built.
#[derive(Default)]
struct Exports {
    ready: Option<Export>,
    building: bool,
    /// The index of the copy an export being written holds.
    copied: Option<u64>,
    /// When the ready export was built or last given to raft-rs.
    used: Option<Instant>,
}

#[derive(Clone)]
struct Export {
    index: u64,
    term: u64,
    conf_state: ConfState,
    file: FileRef,
}

fn io_error(context: String) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { context, source }
}

impl SnapshotFiles {
    /// Snapshot files in `dir` (created if needed; exports and partial files of an
    /// earlier run are removed), exports copied from `store`, streamed to the members
    /// `streams_to` accepts.
    pub fn open(
        dir: &Path,
        store: Arc<SledKvStore>,
        streams_to: impl Fn(u64) -> bool + Send + Sync + 'static,
    ) -> Result<SnapshotFiles, Error> {
        for stale in [dir.to_path_buf(), dir.join("incoming")] {
            if stale.exists() {
                for entry in std::fs::read_dir(&stale)
                    .map_err(io_error(format!("listing {}", stale.display())))?
                {
                    let path = entry
                        .map_err(io_error(format!("listing {}", stale.display())))?
                        .path();
                    if path.is_file() {
                        std::fs::remove_file(&path)
                            .map_err(io_error(format!("removing {}", path.display())))?;
                    }
                }
            }
        }
        std::fs::create_dir_all(dir.join("incoming"))
            .map_err(io_error(format!("creating {}", dir.display())))?;
        Ok(SnapshotFiles {
            dir: dir.to_path_buf(),
            store,
            streams_to: Box::new(streams_to),
            exports: Mutex::default(),
            received: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            receiving: tokio::sync::Mutex::new(()),
        })
    }

    /// Removes the received snapshot files at or below `index` (one was installed;
    /// raft-rs may have ignored others, which are older).
    pub fn installed(&self, index: u64) {
        let Ok(dir) = std::fs::read_dir(self.dir.join("incoming")) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let at = name
                .strip_suffix(".snap")
                .and_then(|stem| stem.rsplit('-').next())
                .and_then(|i| i.parse::<u64>().ok());
            if at.is_some_and(|at| at <= index) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Whether member `to` takes snapshots as files.
    pub fn streams_to(&self, to: u64) -> bool {
        (self.streams_to)(to)
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, Exports> {
        // Only whole-field updates happen under the lock: never torn.
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index of the export built or given to raft-rs lately: the log should keep the
    /// entries after it, so a follower that installs it (maybe after a resumed stream)
    /// goes on from the log.
    pub fn in_use(&self) -> Option<u64> {
        let exports = self.exports();
        let ready = exports
            .ready
            .as_ref()
            .filter(|_| exports.used.is_some_and(|at| at.elapsed() < EXPORT_IN_USE))
            .map(|export| export.index);
        ready.into_iter().chain(exports.copied).min()
    }

    /// raft-rs's request for a snapshot of at least `request_index`: the export if one
    /// is built and the log still holds what follows it; otherwise starts building one
    /// and answers "temporarily unavailable" (raft-rs asks again on its next probe).
    pub fn snapshot(
        self: &Arc<Self>,
        log: &LogStore,
        request_index: u64,
    ) -> raft::Result<Snapshot> {
        let mut exports = self.exports();
        if let Some(export) = &exports.ready
            && export.index >= request_index
            && export.index + 1 >= log.first_index_now()
        {
            let snapshot = snapshot_of(
                export.file.encode(),
                export.index,
                export.term,
                export.conf_state.clone(),
            );
            exports.used = Some(Instant::now());
            return Ok(snapshot);
        }
        if !exports.building {
            exports.building = true;
            let (files, log) = (self.clone(), log.clone());
            let spawned = std::thread::Builder::new()
                .name("snapshot-export".to_string())
                .spawn(move || files.build(&log));
            if spawned.is_err() {
                exports.building = false;
            }
        }
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }

    /// Builds an export (on its own thread) and makes it the one raft-rs is given.
    pub(crate) fn build(&self, log: &LogStore) {
        let built = self.export(log);
        let mut exports = self.exports();
        exports.building = false;
        exports.copied = None;
        match built {
            Ok(export) => {
                tracing::info!(
                    index = export.index,
                    bytes = export.file.size,
                    "built a snapshot export"
                );
                exports.used = Some(Instant::now());
                if let Some(old) = exports.ready.replace(export) {
                    // A stream still reading the old file keeps it open; a resumed one
                    // fails and the leader sends the new export.
                    let _ = std::fs::remove_file(&old.file.path);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "building a snapshot export failed; raft asks again")
            }
        }
    }

    fn export(&self, log: &LogStore) -> Result<Export, Error> {
        let copy = self.store.copy()?;
        let index = copy.applied();
        // From now on the log keeps what follows the copy (see `in_use`).
        self.exports().copied = Some(index);
        let term = log.term(index).map_err(|e| Error::Unavailable {
            message: format!("the term of entry {index}: {e}"),
        })?;
        let conf_state = copy
            .system(crate::raft::log_store::CONF_STATE)
            .ok_or_else(|| Error::Corrupted {
                location: "the stored configuration".to_string(),
                reason: "the store holds none".to_string(),
            })
            .and_then(|bytes| {
                ConfState::parse_from_bytes(bytes).map_err(|e| Error::Corrupted {
                    location: "the stored configuration".to_string(),
                    reason: e.to_string(),
                })
            })?;
        let members = Members::parse(copy.system_scan(crate::raft::members::MEMBER_PREFIX))?;
        let path = self.dir.join(format!("export-{index}.snap"));
        let partial = self.dir.join(format!("export-{index}.tmp"));
        let file = std::fs::File::create(&partial)
            .map_err(io_error(format!("creating {}", partial.display())))?;
        let mut out = BufWriter::with_capacity(1 << 20, Checksummed::new(file));
        write_envelope(&mut out, &members, &copy)?;
        let checksummed = out
            .into_inner()
            .map_err(|e| io_error(format!("writing {}", partial.display()))(e.into_error()))?;
        let (size, crc32) = (checksummed.len, checksummed.hasher.finalize());
        std::fs::rename(&partial, &path)
            .map_err(io_error(format!("renaming {}", partial.display())))?;
        Ok(Export {
            index,
            term,
            conf_state,
            file: FileRef { path, size, crc32 },
        })
    }
}

/// Bytes of a snapshot file written between two syncs of it: the raft log's flush
/// syncs the whole filesystem (`SledKvStore::flush`), which must not meet hundreds of
/// megabytes of dirty snapshot pages.
pub const SYNC_EVERY: u64 = 8 * 1024 * 1024;

/// A file writer that counts and checksums what passes through it, and syncs the file
/// every [`SYNC_EVERY`] bytes.
struct Checksummed {
    inner: std::fs::File,
    hasher: crc32fast::Hasher,
    len: u64,
    unsynced: u64,
}

impl Checksummed {
    fn new(inner: std::fs::File) -> Self {
        Checksummed {
            inner,
            hasher: crc32fast::Hasher::new(),
            len: 0,
            unsynced: 0,
        }
    }
}

impl Write for Checksummed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.inner.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The CRC-32 of a whole file.
fn file_crc(path: &Path) -> io::Result<u32> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hasher.finalize()),
            n => hasher.update(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reference_is_never_read_as_inline_data_and_round_trips() {
        let file = FileRef {
            path: PathBuf::from("/some/dir/export-7.snap"),
            size: 1234,
            crc32: 0xdead_beef,
        };
        assert_eq!(FileRef::decode(&file.encode()), Some(file));
        // An inline snapshot starts with the members' JSON length, never zero.
        let mut inline = 2u32.to_be_bytes().to_vec();
        inline.extend_from_slice(b"{}");
        assert_eq!(FileRef::decode(&inline), None);
        assert_eq!(FileRef::decode(&FILE_MAGIC[..]), None, "truncated");
    }
}

#[cfg(test)]
mod files_tests {
    use super::*;

    #[test]
    fn an_install_removes_the_received_files_it_makes_obsolete() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let store = Arc::new(SledKvStore::open_in(db, Default::default()).unwrap());
        let files = SnapshotFiles::open(&dir.path().join("snapshots"), store, |_| true).unwrap();
        let incoming = dir.path().join("snapshots/incoming");
        for name in ["1-2-40.snap", "1-2-50.snap", "1-3-60.snap", "1-3-70.part"] {
            std::fs::write(incoming.join(name), b"x").unwrap();
        }
        files.installed(50);
        let mut left: Vec<String> = std::fs::read_dir(&incoming)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["1-3-60.snap", "1-3-70.part"]);
    }
}
