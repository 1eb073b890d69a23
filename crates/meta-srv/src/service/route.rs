//! gRPC `meta.v1.RouteCatalog`: the range route catalog. Any member reads it
//! (linearizable); splits, merges and moves are checked here, then run as procedures
//! on the leader, and answered when done (or with the procedure id once the wait is
//! over).

use std::sync::Arc;
use std::time::Duration;

use common_meta::model::route::RouteCatalog;
use meta_proto::v1 as pb;
use procedure::{BoxedProcedure, ProcedureManager};
use tonic::{Request, Response, Status};

use crate::error::{refusal, to_status};
use crate::procedure_host::ProcedureHost;
use crate::procedures::route::{
    Outcome, RouteContext, merge, move_route, procedure_id, split, submit,
};
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;

/// How long a change is waited for when the request does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// Longest wait a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Serves `meta.v1.RouteCatalog`.
pub struct RouteService {
    /// This member.
    pub member_id: u64,
    /// The leader's procedure manager.
    pub host: Arc<ProcedureHost>,
    /// For the not-leader hint.
    pub driver: DriverHandle,
    /// For the not-leader hint.
    pub members: Arc<Members>,
    /// The catalog, group leaders and the mailbox.
    pub ctx: Arc<RouteContext>,
}

fn header(member_id: u64) -> Option<pb::ResponseHeader> {
    common_meta::rpc::header(member_id, 0)
}

impl RouteService {
    async fn refuse(&self, err: common_meta::Error) -> Status {
        refusal(err, &self.driver, &self.members, self.member_id).await
    }

    async fn manager(&self) -> Result<ProcedureManager, Status> {
        match self.host.manager() {
            Some(manager) => Ok(manager),
            None => {
                Err(crate::error::not_leader(&self.driver, &self.members, self.member_id).await)
            }
        }
    }

    async fn catalog(&self) -> Result<RouteCatalog, Status> {
        match self.ctx.routes.load().await {
            Ok((catalog, _)) => Ok(catalog),
            Err(e) => Err(self.refuse(e).await),
        }
    }

    /// Submits a change and waits for it up to `wait_ms` (0: the default).
    async fn run(
        &self,
        manager: &ProcedureManager,
        id: String,
        procedure: BoxedProcedure,
        wait_ms: u64,
    ) -> Result<Response<pb::RouteChangeResponse>, Status> {
        let (id, watcher) = submit(manager, id, procedure).await.map_err(to_status)?;
        let wait = match wait_ms {
            0 => DEFAULT_WAIT,
            ms => Duration::from_millis(ms).min(MAX_WAIT),
        };
        let mut answer = pb::RouteChangeResponse {
            header: header(self.member_id),
            procedure_id: id.clone(),
            ..Default::default()
        };
        let Some(watcher) = watcher else {
            return Ok(Response::new(answer));
        };
        match tokio::time::timeout(wait, watcher.wait()).await {
            // Still running, or this member stopped leading: the next leader finishes
            // it, and the client asks after it by id.
            Err(_) | Ok(Err(procedure::Error::Stopped)) => {}
            Ok(Ok(output)) => {
                let outcome: Outcome = output
                    .as_deref()
                    .and_then(|o| serde_json::from_str(o).ok())
                    .ok_or_else(|| Status::internal(format!("procedure {id} left no outcome")))?;
                answer.done = true;
                answer.version = outcome.version;
                answer.routes = outcome.routes.iter().map(pb::Route::from).collect();
            }
            Ok(Err(e)) => {
                let err = common_meta::Error::from_procedure_error(&e.to_string());
                let status = to_status(err);
                let mut named = Status::new(status.code(), format!("{id}: {}", status.message()));
                *named.metadata_mut() = status.metadata().clone();
                return Err(named);
            }
        }
        Ok(Response::new(answer))
    }
}

#[tonic::async_trait]
impl pb::route_catalog_server::RouteCatalog for RouteService {
    async fn list_routes(
        &self,
        _request: Request<pb::ListRoutesRequest>,
    ) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let catalog = self.catalog().await?;
        Ok(Response::new(pb::ListRoutesResponse {
            header: header(self.member_id),
            version: catalog.version,
            routes: catalog.routes.iter().map(pb::Route::from).collect(),
        }))
    }

    async fn get_route(
        &self,
        request: Request<pb::GetRouteRequest>,
    ) -> Result<Response<pb::GetRouteResponse>, Status> {
        let key = request.into_inner().key;
        let catalog = self.catalog().await?;
        let route = catalog
            .owner(&key)
            .ok_or_else(|| Status::not_found(format!("no route owns key {key:?}")))?;
        Ok(Response::new(pb::GetRouteResponse {
            header: header(self.member_id),
            version: catalog.version,
            route: Some(pb::Route::from(route)),
        }))
    }

    async fn split_route(
        &self,
        request: Request<pb::SplitRouteRequest>,
    ) -> Result<Response<pb::RouteChangeResponse>, Status> {
        let request = request.into_inner();
        let manager = self.manager().await?;
        let catalog = self.catalog().await?;
        let (parent, _) = split::plan(&catalog, &request.key).map_err(to_status)?;
        let procedure = split::SplitRoute::new(self.ctx.clone(), request.key, parent, "manual");
        let id = procedure_id(&format!("split-{parent}"));
        self.run(&manager, id, Box::new(procedure), request.wait_ms)
            .await
    }

    async fn merge_route(
        &self,
        request: Request<pb::MergeRouteRequest>,
    ) -> Result<Response<pb::RouteChangeResponse>, Status> {
        let request = request.into_inner();
        let manager = self.manager().await?;
        let catalog = self.catalog().await?;
        let left = request.route_id;
        let (right, _) = merge::plan(&catalog, left).map_err(to_status)?;
        let start = catalog
            .route(left)
            .map(|r| r.start.clone())
            .unwrap_or_default();
        let procedure = merge::MergeRoutes::new(self.ctx.clone(), left, right, start);
        let id = procedure_id(&format!("merge-{left}-{right}"));
        self.run(&manager, id, Box::new(procedure), request.wait_ms)
            .await
    }

    async fn move_route(
        &self,
        request: Request<pb::MoveRouteRequest>,
    ) -> Result<Response<pb::RouteChangeResponse>, Status> {
        let request = request.into_inner();
        let manager = self.manager().await?;
        let catalog = self.catalog().await?;
        let (route, to) = (request.route_id, request.to_group);
        let from = move_route::plan(&catalog, route, to).map_err(to_status)?;
        if !self.ctx.plane.live.groups().contains(&to) {
            return Err(Status::invalid_argument(format!(
                "unknown group {to}: no node reports hosting it"
            )));
        }
        let procedure =
            move_route::MoveRoute::new(self.ctx.clone(), route, from, to, self.ctx.move_timeout);
        let id = procedure_id(&format!("move-{route}-to-{to}"));
        self.run(&manager, id, Box::new(procedure), request.wait_ms)
            .await
    }
}
