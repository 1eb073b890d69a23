//! `metactl user`, `metactl role`, `metactl auth`: users, roles and their permissions
//! on key ranges, and turning auth on and off (etcd's Auth API, which every member
//! serves).

use clap::{Subcommand, ValueEnum};
use meta_client::MetaClient;
use meta_proto::etcd::{authpb, etcdserverpb as epb};
use serde_json::json;

use super::{Failure, Output, print};

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user: NAME:PASSWORD, or NAME with --new-password or --no-password.
    Add {
        #[arg(value_name = "NAME[:PASSWORD]")]
        name: String,
        /// Its password (or METACTL_NEW_PASSWORD).
        #[arg(long, env = "METACTL_NEW_PASSWORD", hide_env_values = true)]
        new_password: Option<String>,
        /// A user without a password (it cannot authenticate).
        #[arg(long, conflicts_with = "new_password")]
        no_password: bool,
    },
    /// Delete a user.
    Delete { name: String },
    /// List the users.
    List,
    /// Show a user's roles.
    Get { name: String },
    /// Change a user's password (its tokens stop verifying).
    Passwd {
        name: String,
        /// The new password (or METACTL_NEW_PASSWORD).
        #[arg(long, env = "METACTL_NEW_PASSWORD", hide_env_values = true)]
        new_password: String,
    },
    /// Grant a user a role.
    GrantRole { name: String, role: String },
    /// Take a role from a user.
    RevokeRole { name: String, role: String },
}

#[derive(Subcommand)]
pub enum RoleCommand {
    /// Add a role (`root` may do everything).
    Add { name: String },
    /// Delete a role (and take it from every user).
    Delete { name: String },
    /// List the roles.
    List,
    /// Show a role's permissions.
    Get { name: String },
    /// Let a role read and/or write a key, a range [KEY, RANGE_END) or a prefix.
    GrantPermission {
        name: String,
        access: AccessArg,
        key: String,
        range_end: Option<String>,
        /// Every key starting with KEY.
        #[arg(long, conflicts_with = "range_end")]
        prefix: bool,
    },
    /// Take from a role its permission on exactly this key, range or prefix.
    RevokePermission {
        name: String,
        key: String,
        range_end: Option<String>,
        /// Every key starting with KEY.
        #[arg(long, conflicts_with = "range_end")]
        prefix: bool,
    },
}

#[derive(Subcommand)]
pub enum AuthCommand {
    /// Turn auth on: needs user root holding role root. Requests then need a user
    /// (--user).
    Enable,
    /// Turn auth off (as root).
    Disable,
    /// Whether auth is on, and the auth revision.
    Status,
}

/// What a permission allows.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessArg {
    Read,
    Write,
    Readwrite,
}

fn range_of(key: &str, range_end: Option<String>, prefix: bool) -> (Vec<u8>, Vec<u8>) {
    let key = key.as_bytes().to_vec();
    let end = if prefix {
        common_meta::kv::prefix_end(&key)
    } else {
        range_end.map(String::into_bytes).unwrap_or_default()
    };
    (key, end)
}

fn done(output: Output, text: String) {
    print(output, text.clone(), json!({ "ok": true, "message": text }));
}

pub async fn user(
    client: &MetaClient,
    command: UserCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        UserCommand::Add {
            name,
            new_password,
            no_password,
        } => {
            let (name, password) = match (name.split_once(':'), new_password) {
                (Some((name, inline)), None) => (name.to_string(), Some(inline.to_string())),
                (Some(_), Some(_)) => {
                    return Err(Failure(
                        "error: give the password once: NAME:PASSWORD or --new-password".into(),
                    ));
                }
                (None, password) => (name, password),
            };
            if password.is_none() && !no_password {
                return Err(Failure(format!(
                    "error: user {name} needs a password: {name}:PASSWORD, --new-password, METACTL_NEW_PASSWORD, or --no-password"
                )));
            }
            let request = epb::AuthUserAddRequest {
                name: name.clone(),
                password: password.unwrap_or_default(),
                options: Some(authpb::UserAddOptions { no_password }),
                hashed_password: String::new(),
            };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.user_add(request).await }
                })
                .await?;
            done(output, format!("user {name} added"));
        }
        UserCommand::Delete { name } => {
            let request = epb::AuthUserDeleteRequest { name: name.clone() };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.user_delete(request).await }
                })
                .await?;
            done(output, format!("user {name} deleted"));
        }
        UserCommand::List => {
            let users = client
                .with_auth(|mut c| async move { c.user_list(epb::AuthUserListRequest {}).await })
                .await?
                .users;
            print(output, users.join("\n"), json!({ "users": users }));
        }
        UserCommand::Get { name } => {
            let request = epb::AuthUserGetRequest { name: name.clone() };
            let roles = client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.user_get(request).await }
                })
                .await?
                .roles;
            print(
                output,
                format!("user {name}: roles {}", roles.join(", ")),
                json!({ "user": name, "roles": roles }),
            );
        }
        UserCommand::Passwd { name, new_password } => {
            let request = epb::AuthUserChangePasswordRequest {
                name: name.clone(),
                password: new_password,
                hashed_password: String::new(),
            };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.user_change_password(request).await }
                })
                .await?;
            done(output, format!("password of user {name} changed"));
        }
        UserCommand::GrantRole { name, role } => {
            let request = epb::AuthUserGrantRoleRequest {
                user: name.clone(),
                role: role.clone(),
            };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.user_grant_role(request).await }
                })
                .await?;
            done(output, format!("role {role} granted to user {name}"));
        }
        UserCommand::RevokeRole { name, role } => {
            let request = epb::AuthUserRevokeRoleRequest {
                name: name.clone(),
                role: role.clone(),
            };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.user_revoke_role(request).await }
                })
                .await?;
            done(output, format!("role {role} revoked from user {name}"));
        }
    }
    Ok(())
}

fn show_permission(p: &authpb::Permission) -> (String, serde_json::Value) {
    let access = match authpb::permission::Type::try_from(p.perm_type) {
        Ok(authpb::permission::Type::Read) => "read",
        Ok(authpb::permission::Type::Write) => "write",
        _ => "readwrite",
    };
    let key = String::from_utf8_lossy(&p.key).into_owned();
    let end = match p.range_end.as_slice() {
        [] => None,
        [0] => Some("<every key after>".to_string()),
        end => Some(String::from_utf8_lossy(end).into_owned()),
    };
    let text = match &end {
        None => format!("{access} {key}"),
        Some(end) => format!("{access} [{key}, {end})"),
    };
    (
        text,
        json!({ "access": access, "key": key, "range_end": String::from_utf8_lossy(&p.range_end) }),
    )
}

pub async fn role(
    client: &MetaClient,
    command: RoleCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        RoleCommand::Add { name } => {
            let request = epb::AuthRoleAddRequest { name: name.clone() };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.role_add(request).await }
                })
                .await?;
            done(output, format!("role {name} added"));
        }
        RoleCommand::Delete { name } => {
            let request = epb::AuthRoleDeleteRequest { role: name.clone() };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.role_delete(request).await }
                })
                .await?;
            done(output, format!("role {name} deleted"));
        }
        RoleCommand::List => {
            let roles = client
                .with_auth(|mut c| async move { c.role_list(epb::AuthRoleListRequest {}).await })
                .await?
                .roles;
            print(output, roles.join("\n"), json!({ "roles": roles }));
        }
        RoleCommand::Get { name } => {
            let request = epb::AuthRoleGetRequest { role: name.clone() };
            let perms = client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.role_get(request).await }
                })
                .await?
                .perm;
            let (lines, json): (Vec<_>, Vec<_>) = perms.iter().map(show_permission).unzip();
            let text = if lines.is_empty() {
                format!("role {name}: no permissions")
            } else {
                format!("role {name}:\n{}", lines.join("\n"))
            };
            print(output, text, json!({ "role": name, "permissions": json }));
        }
        RoleCommand::GrantPermission {
            name,
            access,
            key,
            range_end,
            prefix,
        } => {
            let (key, range_end) = range_of(&key, range_end, prefix);
            let perm_type = match access {
                AccessArg::Read => authpb::permission::Type::Read,
                AccessArg::Write => authpb::permission::Type::Write,
                AccessArg::Readwrite => authpb::permission::Type::Readwrite,
            };
            let request = epb::AuthRoleGrantPermissionRequest {
                name: name.clone(),
                perm: Some(authpb::Permission {
                    perm_type: perm_type as i32,
                    key,
                    range_end,
                }),
            };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.role_grant_permission(request).await }
                })
                .await?;
            done(output, format!("permission granted to role {name}"));
        }
        RoleCommand::RevokePermission {
            name,
            key,
            range_end,
            prefix,
        } => {
            let (key, range_end) = range_of(&key, range_end, prefix);
            let request = epb::AuthRoleRevokePermissionRequest {
                role: name.clone(),
                key,
                range_end,
            };
            client
                .with_auth(|mut c| {
                    let request = request.clone();
                    async move { c.role_revoke_permission(request).await }
                })
                .await?;
            done(output, format!("permission revoked from role {name}"));
        }
    }
    Ok(())
}

pub async fn auth(
    client: &MetaClient,
    command: AuthCommand,
    output: Output,
) -> Result<(), Failure> {
    match command {
        AuthCommand::Enable => {
            client
                .with_auth(|mut c| async move { c.auth_enable(epb::AuthEnableRequest {}).await })
                .await?;
            done(output, "auth enabled".to_string());
        }
        AuthCommand::Disable => {
            client
                .with_auth(|mut c| async move { c.auth_disable(epb::AuthDisableRequest {}).await })
                .await?;
            done(output, "auth disabled".to_string());
        }
        AuthCommand::Status => {
            let answer = client
                .with_auth(|mut c| async move { c.auth_status(epb::AuthStatusRequest {}).await })
                .await?;
            print(
                output,
                format!(
                    "auth {} (auth revision {})",
                    if answer.enabled {
                        "enabled"
                    } else {
                        "disabled"
                    },
                    answer.auth_revision
                ),
                json!({ "enabled": answer.enabled, "auth_revision": answer.auth_revision }),
            );
        }
    }
    Ok(())
}
