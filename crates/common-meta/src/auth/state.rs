//! The auth state and the changes applied to it.
//!
//! The rules are etcd's, so that its clients and operators meet what they know:
//! - auth can be enabled only when the `root` user exists and holds the `root` role;
//! - while it is on, `root` cannot be deleted nor lose the `root` role, and the `root`
//!   role cannot be deleted (each an [`AuthError::InvalidManagement`]);
//! - the `root` role may be granted without having been added; it grants everything;
//! - deleting a role takes it from every user that held it;
//! - granting a role a user already holds changes nothing.
//!
//! Every change that changes something moves [`AuthState::revision`] by one.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::check::Access;

/// The name of the all-powerful role, and of the user that must hold it before auth
/// can be enabled.
pub const ROOT: &str = "root";

/// What a role may do on a key range.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Permission {
    /// The first key.
    pub key: Vec<u8>,
    /// The end of the range, exclusive; empty for the single key `key`, `[0]` for every
    /// key from `key` on (etcd's conventions).
    pub range_end: Vec<u8>,
    /// Read, write, or both.
    pub access: Access,
}

/// A role: a set of permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// Its permissions, sorted by range.
    pub permissions: Vec<Permission>,
}

/// A user.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The argon2 hash of its password (PHC string); `None`: it cannot authenticate
    /// with a password.
    pub password: Option<String>,
    /// The roles it holds.
    pub roles: BTreeSet<String>,
    /// Moved by every password change: tokens made before it no longer verify.
    pub generation: u64,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the hash.
        f.debug_struct("User")
            .field("roles", &self.roles)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Users, roles, whether auth is on, and the secret tokens are signed with.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthState {
    /// Whether requests must name a user.
    pub enabled: bool,
    /// Moved by one by every change (etcd's auth revision).
    pub revision: u64,
    /// The key of token signatures, drawn when auth is enabled.
    pub secret: Vec<u8>,
    /// Users by name.
    pub users: BTreeMap<String, User>,
    /// Roles by name.
    pub roles: BTreeMap<String, Role>,
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("AuthState")
            .field("enabled", &self.enabled)
            .field("revision", &self.revision)
            .field("users", &self.users)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// One change of the auth state, as replicated (JSON in the raft entry).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthChange {
    /// Turns auth on with a new token secret (drawn by the proposer).
    Enable {
        /// The secret, at least 32 bytes.
        secret: Vec<u8>,
    },
    /// Turns auth off (users and roles stay).
    Disable,
    /// Adds a user.
    UserAdd {
        /// Its name.
        name: String,
        /// The argon2 hash of its password; `None`: no password.
        password: Option<String>,
    },
    /// Deletes a user.
    UserDelete {
        /// Its name.
        name: String,
    },
    /// Replaces a user's password hash.
    UserPassword {
        /// Its name.
        name: String,
        /// The new argon2 hash.
        password: String,
    },
    /// Grants a user a role.
    UserGrant {
        /// The user.
        name: String,
        /// The role.
        role: String,
    },
    /// Takes a role from a user.
    UserRevoke {
        /// The user.
        name: String,
        /// The role.
        role: String,
    },
    /// Adds a role without permissions.
    RoleAdd {
        /// Its name.
        name: String,
    },
    /// Deletes a role (and takes it from every user).
    RoleDelete {
        /// Its name.
        name: String,
    },
    /// Grants a role a permission (replacing the access of one on the same range).
    RoleGrant {
        /// The role.
        name: String,
        /// The permission.
        permission: Permission,
    },
    /// Takes from a role its permission on exactly this range.
    RoleRevoke {
        /// The role.
        name: String,
        /// The range's first key.
        key: Vec<u8>,
        /// The range's end (see [`Permission::range_end`]).
        range_end: Vec<u8>,
    },
}

impl std::fmt::Debug for AuthChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets and hashes stay out of logs.
        match self {
            AuthChange::Enable { .. } => f.write_str("Enable"),
            AuthChange::Disable => f.write_str("Disable"),
            AuthChange::UserAdd { name, password } => f
                .debug_struct("UserAdd")
                .field("name", name)
                .field("password", &password.is_some())
                .finish(),
            AuthChange::UserDelete { name } => write!(f, "UserDelete({name:?})"),
            AuthChange::UserPassword { name, .. } => write!(f, "UserPassword({name:?})"),
            AuthChange::UserGrant { name, role } => write!(f, "UserGrant({name:?}, {role:?})"),
            AuthChange::UserRevoke { name, role } => write!(f, "UserRevoke({name:?}, {role:?})"),
            AuthChange::RoleAdd { name } => write!(f, "RoleAdd({name:?})"),
            AuthChange::RoleDelete { name } => write!(f, "RoleDelete({name:?})"),
            AuthChange::RoleGrant { name, permission } => {
                write!(f, "RoleGrant({name:?}, {permission:?})")
            }
            AuthChange::RoleRevoke {
                name,
                key,
                range_end,
            } => write!(f, "RoleRevoke({name:?}, {key:?}, {range_end:?})"),
        }
    }
}

/// Fewest bytes of a token secret.
pub const MIN_SECRET_BYTES: usize = 32;

/// Why an auth change or check was refused. Each has an etcd error the etcd API
/// answers with; the texts here say the same with the names involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Enabling auth without a `root` user.
    #[error("root user does not exist: add user root before enabling auth")]
    RootUserMissing,
    /// Enabling auth while `root` lacks the `root` role.
    #[error("root user does not have root role: grant it before enabling auth")]
    RootRoleMissing,
    /// A user name taken.
    #[error("user name {0:?} already exists")]
    UserExists(String),
    /// A user name that is empty (or a request that names no user while auth is on).
    #[error("user name is empty")]
    UserEmpty,
    /// No such user.
    #[error("user name {0:?} not found")]
    UserNotFound(String),
    /// A role name taken.
    #[error("role name {0:?} already exists")]
    RoleExists(String),
    /// No such role.
    #[error("role name {0:?} not found")]
    RoleNotFound(String),
    /// A role name that is empty.
    #[error("role name is empty")]
    RoleEmpty,
    /// A wrong user or password.
    #[error("authentication failed, invalid user ID or password")]
    Failed,
    /// The user may not do this.
    #[error("permission denied")]
    PermissionDenied,
    /// Revoking a role the user does not hold.
    #[error("role {role:?} is not granted to user {user:?}")]
    RoleNotGranted {
        /// The user.
        user: String,
        /// The role.
        role: String,
    },
    /// Revoking a permission the role does not hold.
    #[error("permission is not granted to role {0:?}")]
    PermissionNotGranted(String),
    /// An auth call that needs auth on.
    #[error("authentication is not enabled")]
    NotEnabled,
    /// A token that is malformed, not signed by this cluster, expired, or of a user
    /// deleted or with a changed password since.
    #[error("invalid auth token{0}")]
    InvalidToken(&'static str),
    /// A change that would lock root out while auth is on.
    #[error("invalid auth management: {0}")]
    InvalidManagement(&'static str),
    /// Anything else wrong with a request (an empty password, a bad range).
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, AuthError>;

impl AuthState {
    /// Applies `change`; on a refusal nothing changes. Answers whether anything changed
    /// (a change that changes nothing does not move the revision).
    pub fn apply(&mut self, change: AuthChange) -> Result<bool> {
        let changed = self.apply_inner(change)?;
        if changed {
            self.revision += 1;
        }
        Ok(changed)
    }

    fn apply_inner(&mut self, change: AuthChange) -> Result<bool> {
        match change {
            AuthChange::Enable { secret } => {
                if self.enabled {
                    return Ok(false);
                }
                let root = self.users.get(ROOT).ok_or(AuthError::RootUserMissing)?;
                if !root.roles.contains(ROOT) {
                    return Err(AuthError::RootRoleMissing);
                }
                if secret.len() < MIN_SECRET_BYTES {
                    return Err(AuthError::Invalid(format!(
                        "a token secret of {} bytes is too short",
                        secret.len()
                    )));
                }
                self.enabled = true;
                self.secret = secret;
                Ok(true)
            }
            AuthChange::Disable => {
                let was = self.enabled;
                self.enabled = false;
                Ok(was)
            }
            AuthChange::UserAdd { name, password } => {
                if name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if self.users.contains_key(&name) {
                    return Err(AuthError::UserExists(name));
                }
                // The generation starts at the auth revision, never reused: tokens of an
                // earlier user of the same name do not verify for this one.
                self.users.insert(
                    name,
                    User {
                        password,
                        roles: BTreeSet::new(),
                        generation: self.revision + 1,
                    },
                );
                Ok(true)
            }
            AuthChange::UserDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(AuthError::InvalidManagement(
                        "the root user cannot be deleted while auth is enabled",
                    ));
                }
                self.users
                    .remove(&name)
                    .map(|_| true)
                    .ok_or(AuthError::UserNotFound(name))
            }
            AuthChange::UserPassword { name, password } => {
                let next = self.revision + 1;
                let user = self.user_mut(&name)?;
                user.password = Some(password);
                user.generation = next;
                Ok(true)
            }
            AuthChange::UserGrant { name, role } => {
                self.user(&name)?;
                if role != ROOT && !self.roles.contains_key(&role) {
                    return Err(AuthError::RoleNotFound(role));
                }
                Ok(self.user_mut(&name)?.roles.insert(role))
            }
            AuthChange::UserRevoke { name, role } => {
                if self.enabled && name == ROOT && role == ROOT {
                    return Err(AuthError::InvalidManagement(
                        "the root role cannot be taken from the root user while auth is enabled",
                    ));
                }
                if self.user_mut(&name)?.roles.remove(&role) {
                    Ok(true)
                } else {
                    Err(AuthError::RoleNotGranted { user: name, role })
                }
            }
            AuthChange::RoleAdd { name } => {
                if name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if self.roles.contains_key(&name) {
                    return Err(AuthError::RoleExists(name));
                }
                self.roles.insert(name, Role::default());
                Ok(true)
            }
            AuthChange::RoleDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(AuthError::InvalidManagement(
                        "the root role cannot be deleted while auth is enabled",
                    ));
                }
                if self.roles.remove(&name).is_none() {
                    return Err(AuthError::RoleNotFound(name));
                }
                for user in self.users.values_mut() {
                    user.roles.remove(&name);
                }
                Ok(true)
            }
            AuthChange::RoleGrant { name, permission } => {
                check_range(&permission.key, &permission.range_end)?;
                let role = self
                    .roles
                    .get_mut(&name)
                    .ok_or(AuthError::RoleNotFound(name))?;
                match role
                    .permissions
                    .iter_mut()
                    .find(|p| p.key == permission.key && p.range_end == permission.range_end)
                {
                    Some(held) if held.access == permission.access => return Ok(false),
                    Some(held) => held.access = permission.access,
                    None => {
                        role.permissions.push(permission);
                        role.permissions.sort();
                    }
                }
                Ok(true)
            }
            AuthChange::RoleRevoke {
                name,
                key,
                range_end,
            } => {
                let role = self
                    .roles
                    .get_mut(&name)
                    .ok_or_else(|| AuthError::RoleNotFound(name.clone()))?;
                let before = role.permissions.len();
                role.permissions
                    .retain(|p| !(p.key == key && p.range_end == range_end));
                if role.permissions.len() == before {
                    return Err(AuthError::PermissionNotGranted(name));
                }
                Ok(true)
            }
        }
    }

    /// User `name`.
    pub fn user(&self, name: &str) -> Result<&User> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        self.users
            .get(name)
            .ok_or_else(|| AuthError::UserNotFound(name.to_string()))
    }

    fn user_mut(&mut self, name: &str) -> Result<&mut User> {
        if name.is_empty() {
            return Err(AuthError::UserEmpty);
        }
        self.users
            .get_mut(name)
            .ok_or_else(|| AuthError::UserNotFound(name.to_string()))
    }

    /// Role `name` (the `root` role exists once granted, without permissions listed).
    pub fn role(&self, name: &str) -> Result<Role> {
        if name.is_empty() {
            return Err(AuthError::RoleEmpty);
        }
        match self.roles.get(name) {
            Some(role) => Ok(role.clone()),
            None if name == ROOT && self.users.values().any(|u| u.roles.contains(ROOT)) => {
                Ok(Role::default())
            }
            None => Err(AuthError::RoleNotFound(name.to_string())),
        }
    }

    /// Checks `name`'s password (the caller runs this off the async threads: argon2 is
    /// meant to be slow).
    pub fn authenticate(&self, name: &str, password: &str) -> Result<()> {
        if !self.enabled {
            return Err(AuthError::NotEnabled);
        }
        match self.users.get(name).and_then(|u| u.password.as_deref()) {
            Some(hash) if super::password::verify_password(hash, password) => Ok(()),
            Some(_) => Err(AuthError::Failed),
            None => {
                // As slow as a wrong password, so the time taken does not tell which
                // users exist.
                super::password::verify_password(super::password::decoy(), password);
                Err(AuthError::Failed)
            }
        }
    }
}

/// A permission's range must not end before it starts.
fn check_range(key: &[u8], range_end: &[u8]) -> Result<()> {
    if !range_end.is_empty() && range_end != [0] && range_end <= key {
        return Err(AuthError::Invalid(format!(
            "the range end {range_end:?} is not after its key {key:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_user(state: &mut AuthState, name: &str) {
        state
            .apply(AuthChange::UserAdd {
                name: name.to_string(),
                password: Some("hash".to_string()),
            })
            .unwrap();
    }

    fn enable(state: &mut AuthState) -> Result<bool> {
        state.apply(AuthChange::Enable {
            secret: vec![7; MIN_SECRET_BYTES],
        })
    }

    #[test]
    fn enabling_needs_root_with_the_root_role() {
        let mut state = AuthState::default();
        assert_eq!(enable(&mut state), Err(AuthError::RootUserMissing));
        add_user(&mut state, ROOT);
        assert_eq!(enable(&mut state), Err(AuthError::RootRoleMissing));
        state
            .apply(AuthChange::UserGrant {
                name: ROOT.into(),
                role: ROOT.into(),
            })
            .unwrap();
        assert_eq!(enable(&mut state), Ok(true));
        assert!(state.enabled);
        // Enabled again: nothing changes, the revision stays.
        let revision = state.revision;
        assert_eq!(enable(&mut state), Ok(false));
        assert_eq!(state.revision, revision);
    }

    #[test]
    fn root_cannot_be_locked_out_while_enabled() {
        let mut state = AuthState::default();
        add_user(&mut state, ROOT);
        state
            .apply(AuthChange::UserGrant {
                name: ROOT.into(),
                role: ROOT.into(),
            })
            .unwrap();
        enable(&mut state).unwrap();
        let before = state.clone();
        for change in [
            AuthChange::UserDelete { name: ROOT.into() },
            AuthChange::UserRevoke {
                name: ROOT.into(),
                role: ROOT.into(),
            },
            AuthChange::RoleDelete { name: ROOT.into() },
        ] {
            assert!(matches!(
                state.apply(change),
                Err(AuthError::InvalidManagement(_))
            ));
        }
        assert_eq!(state, before);
    }

    #[test]
    fn refusals_change_nothing_and_name_what_is_wrong() {
        let mut state = AuthState::default();
        add_user(&mut state, "alice");
        let before = state.clone();
        let cases = [
            (
                AuthChange::UserAdd {
                    name: "alice".into(),
                    password: None,
                },
                AuthError::UserExists("alice".into()),
            ),
            (
                AuthChange::UserAdd {
                    name: String::new(),
                    password: None,
                },
                AuthError::UserEmpty,
            ),
            (
                AuthChange::UserDelete { name: "bob".into() },
                AuthError::UserNotFound("bob".into()),
            ),
            (
                AuthChange::UserGrant {
                    name: "alice".into(),
                    role: "nope".into(),
                },
                AuthError::RoleNotFound("nope".into()),
            ),
            (
                AuthChange::UserRevoke {
                    name: "alice".into(),
                    role: "reader".into(),
                },
                AuthError::RoleNotGranted {
                    user: "alice".into(),
                    role: "reader".into(),
                },
            ),
            (
                AuthChange::RoleAdd {
                    name: String::new(),
                },
                AuthError::RoleEmpty,
            ),
            (
                AuthChange::RoleRevoke {
                    name: "nope".into(),
                    key: b"a".to_vec(),
                    range_end: vec![],
                },
                AuthError::RoleNotFound("nope".into()),
            ),
        ];
        for (change, expected) in cases {
            assert_eq!(state.apply(change), Err(expected));
        }
        assert_eq!(state, before);
    }

    #[test]
    fn deleting_a_role_takes_it_from_its_users_and_grants_merge() {
        let mut state = AuthState::default();
        add_user(&mut state, "alice");
        state
            .apply(AuthChange::RoleAdd { name: "app".into() })
            .unwrap();
        let grant = |access| AuthChange::RoleGrant {
            name: "app".into(),
            permission: Permission {
                key: b"app/".to_vec(),
                range_end: b"app0".to_vec(),
                access,
            },
        };
        assert_eq!(state.apply(grant(Access::Read)), Ok(true));
        assert_eq!(state.apply(grant(Access::Read)), Ok(false));
        assert_eq!(state.apply(grant(Access::ReadWrite)), Ok(true));
        assert_eq!(state.roles["app"].permissions.len(), 1);
        assert_eq!(state.roles["app"].permissions[0].access, Access::ReadWrite);
        state
            .apply(AuthChange::UserGrant {
                name: "alice".into(),
                role: "app".into(),
            })
            .unwrap();
        state
            .apply(AuthChange::RoleDelete { name: "app".into() })
            .unwrap();
        assert!(state.users["alice"].roles.is_empty());
        let grant_on = |key: &[u8], range_end: &[u8]| AuthChange::RoleGrant {
            name: "app".into(),
            permission: Permission {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
                access: Access::Read,
            },
        };
        assert_eq!(
            state.apply(grant_on(b"a", b"b")),
            Err(AuthError::RoleNotFound("app".into()))
        );
        state
            .apply(AuthChange::RoleAdd { name: "app".into() })
            .unwrap();
        assert!(matches!(
            state.apply(grant_on(b"b", b"a")),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn debug_output_hides_secrets_and_hashes() {
        let mut state = AuthState::default();
        add_user(&mut state, "alice");
        enable(&mut state).ok();
        state.secret = b"very-secret-bytes".to_vec();
        let shown = format!("{state:?}");
        assert!(
            !shown.contains("hash") && !shown.contains("very-secret"),
            "{shown}"
        );
        let change = AuthChange::UserPassword {
            name: "alice".into(),
            password: "hash".into(),
        };
        assert!(!format!("{change:?}").contains("hash"));
    }
}
