//! The data directory and its exclusive lock: one meta-srv per directory.
//!
//! Layout:
//!
//! ```text
//! {data_dir}/LOCK   lock file, held with an exclusive OS file lock while running;
//!                   holds the owner's pid for the error message of a second server
//! {data_dir}/db/    the sled database: raft log, KV state machine, cluster identity
//! ```

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An open, locked data directory. The lock is released when this is dropped (or the
/// process dies, so a kill -9 never leaves a stale lock behind).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
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
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the sled database (raft log, KV state, identity) lives.
    pub fn db_path(&self) -> PathBuf {
        self.path.join("db")
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
}
