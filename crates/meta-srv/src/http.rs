//! The HTTP admin API (axum): `GET /` (the dashboard, `http/dashboard.html`, embedded),
//! `GET /health`, `GET /status`, `GET /metrics`
//! (Prometheus text, see `metrics.rs`), `GET /leader`, `GET /members`,
//! `GET /procedures[/{id}]`, `GET /config` (`http/admin.rs`), `GET /nodes`,
//! `GET /tables` (`?catalog=&schema=`), `GET /tables/{id}/route`,
//! `GET|POST /maintenance` (leader only; POST `{"enabled": true|false}`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use common_meta::kv::SledKvStore;
use serde::Serialize;

use common_meta::model::node::NodeInfo;

mod admin;

use crate::cluster_plane::heartbeat_chain::ClusterPlane;
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;

/// What the handlers read.
pub struct HttpState {
    /// The raft driver's failure, once it has failed.
    pub failure: tokio::sync::watch::Receiver<Option<String>>,
    /// This member's id.
    pub member_id: u64,
    /// The cluster's id.
    pub cluster_id: u64,
    /// The local state machine, for its revision.
    pub store: Arc<SledKvStore>,
    /// The raft driver, for status.
    pub driver: DriverHandle,
    /// Member ids to addresses.
    pub members: Arc<Members>,
    /// Node registrations and the leader's liveness view.
    pub plane: Arc<ClusterPlane>,
    /// The term this member leads in, if it leads.
    pub leadership: tokio::sync::watch::Receiver<Option<u64>>,
    /// Tables' keys (read on any member, linearizably).
    pub tables: common_meta::manager::TableMetadataManager,
    /// Maintenance mode and the supervisor's work.
    pub supervisor: Arc<crate::cluster_plane::supervisor::Supervisor>,
    /// The range route catalog (and its in-memory table, once made).
    pub routes: Arc<crate::procedures::route::RouteContext>,
    /// This member's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The leader's procedures (their counts and views).
    pub procedures: Arc<crate::procedure_host::ProcedureHost>,
    /// The configuration this member runs with (`GET /config`, secrets redacted).
    pub config: Arc<crate::Config>,
}

/// The query of `GET /tables`.
#[derive(Debug, serde::Deserialize)]
pub struct TablesQuery {
    /// The catalog (default `greptime`).
    #[serde(default)]
    pub catalog: Option<String>,
    /// One schema of it (default: every schema).
    #[serde(default)]
    pub schema: Option<String>,
}

/// One node in `GET /nodes`.
#[derive(Debug, Serialize)]
pub struct NodeEntry {
    /// Its registration (id, role, addr, labels, state, version, start time).
    #[serde(flatten)]
    pub info: NodeInfo,
    /// `alive`, `suspect`, `failed` or `unknown`.
    pub liveness: &'static str,
    /// The detector's phi.
    pub phi: f64,
    /// ms since its last heartbeat, if heard.
    pub last_heartbeat_age_ms: Option<u64>,
    /// Regions in its latest stats.
    pub region_count: usize,
}

/// The body of `GET /health`.
#[derive(Debug, Serialize)]
pub struct Health {
    /// `"ok"`, or `"failed"` once the member cannot go on.
    pub status: &'static str,
    /// This member's id.
    pub member_id: u64,
    /// The local store revision.
    pub revision: i64,
    /// Why the member failed, when it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One member in `GET /status`.
#[derive(Debug, Serialize)]
pub struct MemberView {
    /// Member id.
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    /// `voter` or `learner`.
    pub role: &'static str,
}

/// The body of `GET /status`: this member's raft view.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// Cluster id in hex.
    pub cluster_id: String,
    /// This member.
    pub member_id: u64,
    /// Raft role.
    pub role: &'static str,
    /// Known leader (0 for none).
    pub leader_id: u64,
    /// Current term.
    pub term: u64,
    /// Highest committed index.
    pub commit_index: u64,
    /// Highest applied index.
    pub applied_index: u64,
    /// Local store revision.
    pub revision: i64,
    /// The configuration.
    pub members: Vec<MemberView>,
}

/// The admin router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/status", get(status))
        .route("/nodes", get(nodes))
        .route("/tables", get(tables))
        .route("/routes", get(routes))
        .route("/tables/{id}/route", get(table_route))
        .route("/maintenance", get(maintenance).post(set_maintenance))
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/leader", get(admin::leader))
        .route("/members", get(admin::members))
        .route("/procedures", get(admin::procedures))
        .route("/procedures/{id}", get(admin::procedure))
        .route("/procedures/{id}/pause", post(admin::pause))
        .route("/procedures/{id}/resume", post(admin::resume))
        .route("/config", get(admin::config))
        .with_state(state)
}

/// The dashboard: one page, embedded in the binary, that reads this API every 2 s.
const DASHBOARD: &str = include_str!("http/dashboard.html");

async fn dashboard() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DASHBOARD,
    )
}

/// Prometheus text: the counters as they are, the gauges read now (raft and store
/// always; nodes and procedures on the leader, where they are known).
async fn metrics(
    State(state): State<Arc<HttpState>>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let mut now = crate::metrics::Snapshot::default();
    if let Ok(status) = state.driver.status().await {
        now.term = status.term;
        now.is_leader = status.role == "leader";
        now.indexes = (
            status.commit_index,
            status.applied_index,
            status.first_index,
        );
        now.members = (status.voters.len(), status.learners.len());
    }
    let store = state.store.clone();
    let counted = tokio::task::spawn_blocking(move || {
        let size = store.db().size_on_disk().unwrap_or(0);
        let leases = store.leases().map_or(0, |leases| leases.len());
        ((store.revision(), store.key_count(), size), leases)
    })
    .await;
    if let Ok((counted, leases)) = counted {
        now.store = counted;
        now.leases = leases;
    }
    now.watchers = state.store.hub().watchers();
    let auth = state.store.auth();
    now.auth = (auth.enabled, auth.users.len(), auth.revision);
    if let Some(table) = state.routes.table.get() {
        now.routes = (table.len(), table.version());
    }
    if state.leadership.borrow().is_some() {
        now.nodes = node_counts(&state).await;
        if let Some(manager) = state.procedures.manager()
            && let Ok(records) = manager.list().await
        {
            let mut counts = std::collections::BTreeMap::new();
            for record in records {
                let state = format!("{:?}", record.state).to_lowercase();
                *counts.entry((record.type_name, state)).or_insert(0) += 1;
            }
            now.procedures = counts.into_iter().collect();
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&now),
    )
}

/// Registered nodes counted by (role, state, liveness), as this leader sees them.
async fn node_counts(state: &HttpState) -> Vec<((String, String, String), i64)> {
    let Ok(nodes) = state.plane.nodes.list_local().await else {
        return Vec::new();
    };
    let now = common_meta::time::unix_ms();
    let mut counts = std::collections::BTreeMap::new();
    for node in nodes {
        let view = state.plane.view(node.id, now);
        let key = (
            format!("{:?}", node.role).to_lowercase(),
            format!("{:?}", node.state).to_lowercase(),
            crate::cluster_plane::live_nodes::liveness_name(view.liveness).to_string(),
        );
        *counts.entry(key).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

/// 200 while the member works; 503 with the reason once it has failed (it is then
/// about to exit: a load balancer or supervisor must not keep sending it work).
async fn health(State(state): State<Arc<HttpState>>) -> (StatusCode, Json<Health>) {
    let failure = state.failure.borrow().clone();
    let code = if failure.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(Health {
            status: if failure.is_some() { "failed" } else { "ok" },
            member_id: state.member_id,
            revision: state.store.revision(),
            reason: failure,
        }),
    )
}

async fn status(
    State(state): State<Arc<HttpState>>,
) -> Result<Json<StatusView>, (StatusCode, String)> {
    let status = state
        .driver
        .status()
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let view = |id: &u64, role| MemberView {
        id: *id,
        addr: state.members.addr(*id).unwrap_or_default(),
        role,
    };
    let members = status
        .voters
        .iter()
        .map(|id| view(id, "voter"))
        .chain(status.learners.iter().map(|id| view(id, "learner")))
        .collect();
    Ok(Json(StatusView {
        cluster_id: format!("{:016x}", state.cluster_id),
        member_id: status.id,
        role: status.role,
        leader_id: status.leader_id,
        term: status.term,
        commit_index: status.commit_index,
        applied_index: status.applied_index,
        revision: state.store.revision(),
        members,
    }))
}

/// Registered nodes with their liveness (leader only: 503 naming the leader elsewhere).
async fn nodes(
    State(state): State<Arc<HttpState>>,
) -> Result<Json<Vec<NodeEntry>>, (StatusCode, String)> {
    let leading = state.leadership.borrow().is_some();
    if !leading {
        let leader = state
            .driver
            .status()
            .await
            .map(|s| s.leader_id)
            .unwrap_or(0);
        let addr = state.members.addr(leader).unwrap_or_default();
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not leader; ask member {leader} at {addr}"),
        ));
    }
    let now = common_meta::time::unix_ms();
    let nodes = state
        .plane
        .nodes
        .list()
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(
        nodes
            .into_iter()
            .map(|info| {
                let view = state.plane.view(info.id, now);
                NodeEntry {
                    info,
                    liveness: crate::cluster_plane::live_nodes::liveness_name(view.liveness),
                    phi: view.phi,
                    last_heartbeat_age_ms: view.last_heartbeat_age_ms,
                    region_count: view.regions,
                }
            })
            .collect(),
    ))
}

/// The tables of a catalog (or of one schema), by schema and name.
async fn tables(
    State(state): State<Arc<HttpState>>,
    Query(query): Query<TablesQuery>,
) -> Result<Json<Vec<common_meta::model::table::TableInfo>>, (StatusCode, String)> {
    let catalog = query.catalog.as_deref().unwrap_or("greptime");
    state
        .tables
        .tables(catalog, query.schema.as_deref())
        .await
        .map(Json)
        .map_err(http_error)
}

/// The range route catalog (read linearizably on any member).
async fn routes(
    State(state): State<Arc<HttpState>>,
) -> Result<Json<crate::routes::CatalogView>, (StatusCode, String)> {
    let (catalog, _) = state.routes.routes.load().await.map_err(http_error)?;
    Ok(Json(crate::routes::CatalogView::from(&catalog)))
}

/// Table `id`'s route (404 when there is no such table).
async fn table_route(
    State(state): State<Arc<HttpState>>,
    Path(id): Path<u32>,
) -> Result<Json<common_meta::model::table::TableRoute>, (StatusCode, String)> {
    match state.tables.table_route(id).await.map_err(http_error)? {
        Some(route) => Ok(Json(route.value)),
        None => Err((StatusCode::NOT_FOUND, format!("table {id} not found"))),
    }
}

fn http_error(e: common_meta::Error) -> (StatusCode, String) {
    let code = match &e {
        common_meta::Error::InvalidArgument { .. } | common_meta::Error::InvalidName { .. } => {
            StatusCode::BAD_REQUEST
        }
        common_meta::Error::NotFound { .. } => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, e.to_string())
}

/// The body of `GET|POST /maintenance`.
#[derive(Debug, Serialize)]
pub struct MaintenanceView {
    /// Automatic moves (failover, balancer) are paused.
    pub maintenance: bool,
    /// The balancer switch.
    pub balancer: bool,
    /// Failover is configured on.
    pub failover: bool,
    /// Migrations in flight.
    pub running_migrations: usize,
    /// Regions waiting to be moved off failed nodes.
    pub pending_failovers: usize,
}

/// The body of `POST /maintenance`.
#[derive(Debug, serde::Deserialize)]
pub struct SetMaintenance {
    /// On or off.
    pub enabled: bool,
}

type JsonError = (StatusCode, Json<serde_json::Value>);

fn json_error(code: StatusCode, message: String) -> JsonError {
    (code, Json(serde_json::json!({ "error": message })))
}

async fn maintenance_view(state: &HttpState) -> Result<Json<MaintenanceView>, JsonError> {
    if state.leadership.borrow().is_none() {
        return Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not the leader: ask the leader (GET /status names it)".to_string(),
        ));
    }
    let switches = state
        .supervisor
        .switches()
        .await
        .map_err(|e| json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let (running_migrations, pending_failovers) = state.supervisor.load();
    Ok(Json(MaintenanceView {
        maintenance: switches.maintenance,
        balancer: switches.balancer,
        failover: state.supervisor.failover_enabled(),
        running_migrations,
        pending_failovers,
    }))
}

async fn maintenance(
    State(state): State<Arc<HttpState>>,
) -> Result<Json<MaintenanceView>, JsonError> {
    maintenance_view(&state).await
}

async fn set_maintenance(
    State(state): State<Arc<HttpState>>,
    headers: axum::http::HeaderMap,
    body: Result<Json<SetMaintenance>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<MaintenanceView>, JsonError> {
    admin::require_root(&state, &headers).await?;
    let Json(body) = body.map_err(|e| {
        json_error(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"enabled\": true|false}}: {e}"),
        )
    })?;
    if state.leadership.borrow().is_none() {
        return Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not the leader: ask the leader (GET /status names it)".to_string(),
        ));
    }
    state
        .supervisor
        .set_switch(crate::cluster_plane::supervisor::MAINTENANCE, body.enabled)
        .await
        .map_err(|e| json_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    maintenance_view(&state).await
}
