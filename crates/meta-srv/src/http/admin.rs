//! The admin API's views of the cluster: `GET /leader`, `GET /members`,
//! `GET /procedures`, `GET /procedures/{id}`, `POST /procedures/{id}/pause|resume`
//! (leader only: elsewhere 503 naming the leader), `GET /config` (this member's
//! effective configuration, secrets redacted). Errors are JSON `{"error": ...}` with a
//! status code.
//!
//! While auth is on, the endpoints that change something (`POST`) need a root user:
//! `Authorization: Basic` with its name and password, or `Bearer` with a token from
//! `Authenticate` ([`require_root`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use procedure::ProcedureRecord;
use serde::Serialize;

use super::{HttpState, JsonError, json_error};

/// The body of `GET /leader`.
#[derive(Debug, Serialize)]
pub struct LeaderView {
    /// The leader this member knows (0: none).
    pub leader_id: u64,
    /// Its gRPC address (empty: none known).
    pub leader_addr: String,
    /// The raft term.
    pub term: u64,
    /// The member answering.
    pub member_id: u64,
    /// Whether the member answering leads.
    pub leading: bool,
}

/// One member in `GET /members`.
#[derive(Debug, Serialize)]
pub struct MemberEntry {
    /// Member id.
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    /// `voter` or `learner`.
    pub role: &'static str,
    /// Whether it leads, as the member answering knows.
    pub leader: bool,
}

/// One procedure in `GET /procedures`.
#[derive(Debug, Serialize)]
pub struct ProcedureView {
    /// Its id.
    pub id: String,
    /// Its type (`metasrv.CreateTable`, `metasrv.MoveRoute`, ...).
    pub type_name: String,
    /// `running`, `done`, `failed`, ...
    pub state: String,
    /// Steps persisted.
    pub step: u64,
    /// The parent, for a subprocedure.
    pub parent_id: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Its output, once done.
    pub output: Option<String>,
    /// Paused by hand (`POST /procedures/{id}/pause`).
    pub paused: bool,
}

fn view(manager: &procedure::ProcedureManager, record: ProcedureRecord) -> ProcedureView {
    ProcedureView {
        paused: manager.is_paused(&record.id),
        id: record.id,
        type_name: record.type_name,
        state: format!("{:?}", record.state).to_lowercase(),
        step: record.step,
        parent_id: record.parent_id,
        error: record.error,
        output: record.output,
    }
}

/// Refuses a request without a root user while auth is on: 401 (with a `Basic`
/// challenge) without credentials or with wrong ones, 403 for a user that is not
/// root.
pub async fn require_root(state: &HttpState, headers: &HeaderMap) -> Result<(), JsonError> {
    use base64::Engine as _;
    let auth = state.store.auth();
    if !auth.enabled {
        return Ok(());
    }
    let refused = |why: &str| {
        json_error(
            StatusCode::UNAUTHORIZED,
            format!(
                "auth is enabled: {why} (Authorization: Basic with a root user, or Bearer with a token)"
            ),
        )
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| refused("no credentials"))?;
    let user = if let Some(token) = given.strip_prefix("Bearer ") {
        auth.verify_token(token.trim(), common_meta::time::unix_ms())
            .map_err(|e| refused(&e.to_string()))?
    } else if let Some(basic) = given.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| refused("Basic credentials are not base64 of NAME:PASSWORD"))?;
        let (name, password) = decoded
            .split_once(':')
            .ok_or_else(|| refused("Basic credentials are not NAME:PASSWORD"))?;
        let (name, password) = (name.to_string(), password.to_string());
        let checked = auth.clone();
        tokio::task::spawn_blocking(move || checked.authenticate(&name, &password).map(|()| name))
            .await
            .map_err(|e| json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| refused(&e.to_string()))?
    } else {
        return Err(refused("unknown Authorization scheme"));
    };
    if !auth.is_root(&user) {
        return Err(json_error(
            StatusCode::FORBIDDEN,
            format!("user {user:?} is not root"),
        ));
    }
    Ok(())
}

fn unavailable(e: impl std::fmt::Display) -> JsonError {
    json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// `GET /leader`.
pub async fn leader(State(state): State<Arc<HttpState>>) -> Result<Json<LeaderView>, JsonError> {
    let status = state.driver.status().await.map_err(unavailable)?;
    Ok(Json(LeaderView {
        leader_id: status.leader_id,
        leader_addr: state.members.addr(status.leader_id).unwrap_or_default(),
        term: status.term,
        member_id: status.id,
        leading: status.role == "leader",
    }))
}

/// `GET /members`.
pub async fn members(
    State(state): State<Arc<HttpState>>,
) -> Result<Json<Vec<MemberEntry>>, JsonError> {
    let status = state.driver.status().await.map_err(unavailable)?;
    let entry = |id: &u64, role| MemberEntry {
        id: *id,
        addr: state.members.addr(*id).unwrap_or_default(),
        role,
        leader: *id == status.leader_id,
    };
    Ok(Json(
        status
            .voters
            .iter()
            .map(|id| entry(id, "voter"))
            .chain(status.learners.iter().map(|id| entry(id, "learner")))
            .collect(),
    ))
}

/// The leader's procedure manager, or 503 naming the leader.
async fn manager(state: &HttpState) -> Result<procedure::ProcedureManager, JsonError> {
    if let Some(manager) = state.procedures.manager() {
        return Ok(manager);
    }
    let leader = state.driver.status().await.map_or(0, |s| s.leader_id);
    let addr = state.members.addr(leader).unwrap_or_default();
    Err(json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not the leader: procedures run on member {leader} ({addr})"),
    ))
}

/// `GET /procedures` (leader only).
pub async fn procedures(
    State(state): State<Arc<HttpState>>,
) -> Result<Json<Vec<ProcedureView>>, JsonError> {
    let manager = manager(&state).await?;
    let records = manager.list().await.map_err(unavailable)?;
    Ok(Json(
        records
            .into_iter()
            .map(|record| view(&manager, record))
            .collect(),
    ))
}

/// `GET /procedures/{id}` (leader only; 404 when unknown).
pub async fn procedure(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<String>,
) -> Result<Json<ProcedureView>, JsonError> {
    let manager = manager(&state).await?;
    match manager.state(&id).await.map_err(unavailable)? {
        Some(record) => Ok(Json(view(&manager, record))),
        None => Err(json_error(
            StatusCode::NOT_FOUND,
            format!("procedure {id} not found"),
        )),
    }
}

/// `POST /procedures/{id}/pause`: the procedure stops before its next step, also
/// across a change of leader, until resumed (leader only; root while auth is on; 404
/// unknown, 409 finished).
pub async fn pause(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ProcedureView>, JsonError> {
    require_root(&state, &headers).await?;
    let manager = manager(&state).await?;
    manager.pause_one(&id).await.map_err(procedure_error)?;
    procedure(State(state), Path(id)).await
}

/// `POST /procedures/{id}/resume` (leader only; root while auth is on; 404 unknown).
pub async fn resume(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ProcedureView>, JsonError> {
    require_root(&state, &headers).await?;
    let manager = manager(&state).await?;
    manager.resume_one(&id).await.map_err(procedure_error)?;
    procedure(State(state), Path(id)).await
}

fn procedure_error(e: procedure::Error) -> JsonError {
    let code = match &e {
        procedure::Error::NotFound(_) => StatusCode::NOT_FOUND,
        procedure::Error::External { .. } => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_error(code, e.to_string())
}

/// `GET /config`: the configuration this member runs with; the cluster secret is shown
/// only as whether one is set.
pub async fn config(State(state): State<Arc<HttpState>>) -> Json<serde_json::Value> {
    let mut config = serde_json::to_value(state.config.as_ref()).unwrap_or_default();
    if let Some(secret) = config.get_mut("cluster_secret") {
        let set = secret.as_str().is_some_and(|s| !s.is_empty());
        *secret = serde_json::Value::String(if set { "<redacted>" } else { "" }.to_string());
    }
    Json(config)
}
