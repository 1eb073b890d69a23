//! The data directory and its exclusive lock: one meta-srv per directory.
//!
//! Layout:
//!
//! ```text
//! {data_dir}/LOCK    lock file, held with an exclusive OS file lock while running;
//!                    holds the owner's pid for the error message of a second server
//! {data_dir}/FORMAT  the data format version, as decimal text (see below)
//! {data_dir}/db/     the sled database: raft log, KV state machine, cluster identity
//! {data_dir}/snapshots/   snapshot files: exports this member sends, and
//!                    incoming/ the ones it receives (emptied at start; see
//!                    raft/snapshot.rs)
//! ```
//!
//! **Format versions.** [`FORMAT_VERSION`] is the layout this binary writes. A directory
//! without `FORMAT` but with a database is of format 1 (before versions were recorded);
//! an older format is opened and migrated as it is read (each migration is logged, see
//! `LogStore::open` and `Members::open`), and `FORMAT` is rewritten once the migrated
//! database is flushed ([`DataDir::record_format`]). A newer format is refused before
//! the database is opened: an older binary must never write over data it does not know.
//!
//! | format | what changed |
//! | --- | --- |
//! | 1 | first format |
//! | 2 | entries carry `meta.v1.RaftCommand` (client sessions); the configuration and the member map are system values of the state machine, written with each apply; a boot counter in `raft_meta` |
//! | 3 | no change on disk; members stream snapshots as files (`Cluster/InstallSnapshot`), used towards peers of format 3 or later |
//! | 4 | the raft log is kept in runs of entries, one sled key per append (tree `raft_runs`, see `log_store/runs.rs`), not one key per entry (`raft_log`) |
//! | 5 | no change on disk; transactions may use etcd's extensions (a put keeping the value or lease, lease and range compares, nested transactions), proposed only once every member runs format 5 or later (`raft/backend.rs`, `FeatureGate`) |
//! | 6 | auth: users, roles and whether auth is on are kept under the state machine's meta key `auth` (JSON), changed by `RaftCommand.auth` entries, proposed only once every member runs format 6 or later |

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The data format this binary writes (see the module doc).
pub const FORMAT_VERSION: u32 = 6;

/// The oldest data format this binary opens.
pub const OLDEST_FORMAT: u32 = 1;

/// An open, locked data directory. The lock is released when this is dropped (or the
/// process dies, so a kill -9 never leaves a stale lock behind).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// The format found on open (`None`: a new directory).
    format: Option<u32>,
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and takes its lock, failing at once if another
    /// process holds it.
    pub fn open(path: &Path) -> Result<DataDir> {
        let io = |context: String| move |source| Error::Io { context, source };
        std::fs::create_dir_all(path)
            .map_err(io(format!("creating data directory {}", path.display())))?;
        let lock_path = path.join("LOCK");
        let mut lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(io(format!("opening lock file {}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut owner = String::new();
                // Best effort: the pid only improves the message.
                let _ = lock.read_to_string(&mut owner);
                let owner = owner.trim();
                return Err(Error::DataDirLocked {
                    path: path.to_path_buf(),
                    owner: if owner.is_empty() {
                        "another process".to_string()
                    } else {
                        format!("process {owner}")
                    },
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(Error::Io {
                    context: format!("locking {}", lock_path.display()),
                    source,
                });
            }
        }
        lock.set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| write!(lock, "{}", std::process::id()))
            .map_err(io(format!("writing lock file {}", lock_path.display())))?;
        let format = read_format(path)?;
        if let Some(found) = format
            && !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&found)
        {
            return Err(Error::Format {
                path: path.to_path_buf(),
                found,
                reason: if found > FORMAT_VERSION {
                    format!(
                        "newer than this binary writes ({FORMAT_VERSION}); run a newer meta-srv"
                    )
                } else {
                    format!("older than this binary opens ({OLDEST_FORMAT})")
                },
            });
        }
        if let Some(found) = format
            && found < FORMAT_VERSION
        {
            tracing::info!(
                data_dir = %path.display(),
                from = found,
                to = FORMAT_VERSION,
                "data format migration starts: the directory is upgraded as it is opened"
            );
        }
        Ok(DataDir {
            path: path.to_path_buf(),
            format,
            _lock: lock,
        })
    }

    /// The format the directory had when opened (`None`: it was new).
    pub fn format(&self) -> Option<u32> {
        self.format
    }

    /// Records [`FORMAT_VERSION`] (written to a temporary file, fsynced, renamed): call
    /// once the database is open, migrated and flushed.
    pub fn record_format(&self) -> Result<()> {
        if self.format == Some(FORMAT_VERSION) {
            return Ok(());
        }
        let io = |context: &str| {
            let context = format!("{context} {}", self.path.join("FORMAT").display());
            move |source| Error::Io { context, source }
        };
        let temporary = self.path.join("FORMAT.tmp");
        let mut file = File::create(&temporary).map_err(io("writing"))?;
        writeln!(file, "{FORMAT_VERSION}").map_err(io("writing"))?;
        file.sync_all().map_err(io("syncing"))?;
        std::fs::rename(&temporary, self.path.join("FORMAT")).map_err(io("renaming to"))?;
        File::open(&self.path)
            .and_then(|dir| dir.sync_all())
            .map_err(io("syncing the directory of"))?;
        if let Some(from) = self.format {
            tracing::info!(data_dir = %self.path.display(), from, to = FORMAT_VERSION, "data format migration done");
        }
        Ok(())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the sled database (raft log, KV state, identity) lives.
    pub fn db_path(&self) -> PathBuf {
        self.path.join("db")
    }

    /// Opens the sled database at `db_path` ([`DataDir::db_path`]; blocking). No
    /// background flusher: it only logs a failed sync, and a later flush can then
    /// succeed over lost pages. Every sync goes through the raft log writer, which
    /// fails stop.
    pub fn open_database(db_path: &Path) -> Result<sled::Db> {
        sled::Config::new()
            .path(db_path)
            .flush_every_ms(None)
            .open()
            .map_err(|source| {
                Error::Meta(common_meta::Error::Storage {
                    context: "opening the database".to_string(),
                    source,
                })
            })
    }

    /// Where snapshot files are built and received.
    pub fn snapshot_path(&self) -> PathBuf {
        self.path.join("snapshots")
    }
}

/// The format of the directory at `path`: from `FORMAT`, else 1 when a database exists
/// (format 1 recorded none), else `None` (a new directory).
fn read_format(path: &Path) -> Result<Option<u32>> {
    let file = path.join("FORMAT");
    match std::fs::read_to_string(&file) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| Error::Format {
            path: path.to_path_buf(),
            found: 0,
            reason: format!(
                "{} does not hold a version number: {text:?}",
                file.display()
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(path.join("db").exists().then_some(1))
        }
        Err(source) => Err(Error::Io {
            context: format!("reading {}", file.display()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_fails_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let err = DataDir::open(dir.path()).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("already in use"), "{message}");
        assert!(
            message.contains(&format!("process {}", std::process::id())),
            "{message}"
        );
        drop(first);
        DataDir::open(dir.path()).unwrap();
    }

    #[test]
    fn formats_are_recorded_migrated_and_refused_when_too_new() {
        let dir = tempfile::tempdir().unwrap();
        let new = DataDir::open(dir.path()).unwrap();
        assert_eq!(new.format(), None);
        new.record_format().unwrap();
        drop(new);
        assert_eq!(
            DataDir::open(dir.path()).unwrap().format(),
            Some(FORMAT_VERSION)
        );

        // Format 1 recorded nothing: a database without FORMAT.
        let old = tempfile::tempdir().unwrap();
        std::fs::create_dir(old.path().join("db")).unwrap();
        let opened = DataDir::open(old.path()).unwrap();
        assert_eq!(opened.format(), Some(1));
        opened.record_format().unwrap();
        drop(opened);
        assert_eq!(
            std::fs::read_to_string(old.path().join("FORMAT"))
                .unwrap()
                .trim(),
            FORMAT_VERSION.to_string()
        );

        for (text, want) in [
            (
                "99\n",
                "data format 99, which is newer than this binary writes",
            ),
            ("0", "data format 0, which is older than this binary opens"),
            ("two", "does not hold a version number"),
        ] {
            std::fs::write(dir.path().join("FORMAT"), text).unwrap();
            let err = DataDir::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
