//! The HTTP admin API (axum). So far: `GET /health`.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use common_meta::kv::SledKvBackend;
use serde::Serialize;

/// What the handlers read.
pub struct HttpState {
    /// This member's id.
    pub member_id: u64,
    /// The local store, for its revision.
    pub backend: Arc<SledKvBackend>,
}

/// The body of `GET /health`.
#[derive(Debug, Serialize)]
pub struct Health {
    /// Always `"ok"` when the server answers.
    pub status: &'static str,
    /// This member's id.
    pub member_id: u64,
    /// The store revision.
    pub revision: i64,
}

/// The admin router.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .with_state(state)
}

async fn health(State(state): State<Arc<HttpState>>) -> Json<Health> {
    Json(Health {
        status: "ok",
        member_id: state.member_id,
        revision: state.backend.revision(),
    })
}
