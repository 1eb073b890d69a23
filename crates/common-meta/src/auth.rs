//! Authentication and authorisation: users with passwords, roles with read and write
//! permissions on key ranges, and a `root` role that may do everything (etcd's model).
//!
//! The whole of it is one [`AuthState`], kept by the replicated state machine beside
//! the data (not in the keyspace, so an auth change moves no revision) and changed only
//! by [`AuthChange`]s that every member applies alike:
//!
//! - [`state`]: the state, its changes and their rules (what etcd refuses, refused the
//!   same way);
//! - [`check`]: what a user may read or write ([`Access`]); while auth is on, the
//!   internal keyspace (keys starting with `__`) is written by Metasrv's own APIs
//!   and by root only;
//! - [`token`]: the tokens `Authenticate` hands out, signed with the state's secret so
//!   that every member verifies them without a write, and expiring;
//! - [`password`]: argon2 hashes, made by the member that proposes the change (applying
//!   stays deterministic: the hash is in the entry).
//!
//! Nothing here reads a clock or draws randomness while applying; token checks take the
//! time from their caller.

pub mod check;
pub mod password;
pub mod state;
pub mod token;

pub use check::{Access, INTERNAL_PREFIX};
pub use password::{hash_password, verify_password};
pub use state::{AuthChange, AuthError, AuthState, Permission, ROOT, Role, User};
