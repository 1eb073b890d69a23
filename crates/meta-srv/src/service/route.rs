//! gRPC `meta.v1.RouteCatalog`: the range route catalog. Any member reads it
//! (linearizable); splits, merges and moves are checked here, then run as procedures
//! on the leader (`route-{request_id}`), and answered when done (or with the procedure
//! id once the wait is over).

use std::sync::Arc;
use std::time::Duration;

use common_meta::model::route::RouteCatalog;
use common_meta::route_table::RouteTable;
use meta_proto::v1 as pb;
use procedure::{BoxedProcedure, ProcedureManager, ProcedureState};
use tonic::{Request, Response, Status};

use crate::error::{refusal, to_status};
use crate::procedure_host::ProcedureHost;
use crate::procedures::route::{Outcome, RouteContext, merge, move_route, split, submit};
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
    /// The catalog (and its in-memory table), group leaders and the mailbox.
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
        match self.ctx.catalog().await {
            Ok(catalog) => Ok(catalog),
            Err(e) => Err(self.refuse(e).await),
        }
    }

    async fn table(&self) -> Result<Option<&RouteTable>, Status> {
        match self.ctx.table().await {
            Ok(table) => Ok(table),
            Err(e) => Err(self.refuse(e).await),
        }
    }

    /// Plans a change on the newest catalog and submits it as `route-{request_id}`,
    /// then waits for it up to `wait_ms` (0: the default). A retry of a request that
    /// was submitted already waits for that one (its plan would now be refused: its
    /// own change is made).
    async fn change(
        &self,
        request_id: &str,
        plan: impl FnOnce(&RouteCatalog) -> common_meta::Result<BoxedProcedure>,
        wait_ms: u64,
    ) -> Result<Response<pb::RouteChangeResponse>, Status> {
        let manager = self.manager().await?;
        let id = crate::service::procedure_id("route", request_id)?;
        if manager.watch(&id).is_none() {
            let catalog = self.catalog().await?;
            match plan(&catalog) {
                Ok(procedure) => {
                    submit(&manager, id.clone(), procedure)
                        .await
                        .map_err(to_status)?;
                }
                Err(e) => {
                    let known = manager.state(&id).await.ok().flatten().is_some();
                    if !known {
                        return Err(to_status(e));
                    }
                }
            }
        }
        let wait = match wait_ms {
            0 => DEFAULT_WAIT,
            ms => Duration::from_millis(ms).min(MAX_WAIT),
        };
        let mut answer = pb::RouteChangeResponse {
            header: header(self.member_id),
            procedure_id: id.clone(),
            ..Default::default()
        };
        let ended = match manager.watch(&id) {
            Some(watcher) => match tokio::time::timeout(wait, watcher.wait()).await {
                // Still running, or this member stopped leading: the next leader
                // finishes it, and the client asks after it by id.
                Err(_) | Ok(Err(procedure::Error::Stopped)) => return Ok(Response::new(answer)),
                Ok(Ok(output)) => Ok(output),
                Ok(Err(e)) => Err(e.to_string()),
            },
            None => {
                let record = manager
                    .state(&id)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?
                    .ok_or_else(|| Status::not_found(format!("procedure {id} not found")))?;
                match record.state {
                    ProcedureState::Done => Ok(record.output),
                    ProcedureState::Failed => Err(record.error.unwrap_or_default()),
                    _ => return Ok(Response::new(answer)),
                }
            }
        };
        let output = match ended {
            Ok(output) => output,
            Err(error) => {
                let status = to_status(common_meta::Error::from_procedure_error(&error));
                let mut named = Status::new(status.code(), format!("{id}: {}", status.message()));
                *named.metadata_mut() = status.metadata().clone();
                return Err(named);
            }
        };
        let outcome: Outcome = output
            .as_deref()
            .and_then(|o| serde_json::from_str(o).ok())
            .ok_or_else(|| Status::internal(format!("procedure {id} left no outcome")))?;
        answer.done = true;
        answer.version = outcome.version;
        answer.routes = outcome.routes.iter().map(pb::Route::from).collect();
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
        let (route, version) = match self.table().await? {
            // The owner and the version from one kept version.
            Some(table) => {
                let newest = table.version();
                match table.owner_at(&key, newest) {
                    common_meta::route_table::OwnerAt::Owner(route) => (route, newest),
                    _ => (table.owner_of(&key), table.version()),
                }
            }
            None => {
                let catalog = self.ctx.routes.load().await.map_err(to_status)?.0;
                (catalog.owner(&key).cloned(), catalog.version)
            }
        };
        let route = route.ok_or_else(|| Status::not_found(format!("no route owns key {key:?}")))?;
        Ok(Response::new(pb::GetRouteResponse {
            header: header(self.member_id),
            version,
            route: Some(pb::Route::from(&route)),
        }))
    }

    async fn split_route(
        &self,
        request: Request<pb::SplitRouteRequest>,
    ) -> Result<Response<pb::RouteChangeResponse>, Status> {
        let request = request.into_inner();
        let key = request.key;
        self.change(
            &request.request_id,
            |catalog| {
                let (parent, _) = split::plan(catalog, &key)?;
                let split = split::SplitRoute::new(self.ctx.clone(), key, parent, "manual");
                Ok(Box::new(split) as BoxedProcedure)
            },
            request.wait_ms,
        )
        .await
    }

    async fn merge_route(
        &self,
        request: Request<pb::MergeRouteRequest>,
    ) -> Result<Response<pb::RouteChangeResponse>, Status> {
        let request = request.into_inner();
        let left = request.route_id;
        self.change(
            &request.request_id,
            |catalog| {
                let (right, _) = merge::plan(catalog, left)?;
                let start = catalog
                    .route(left)
                    .map(|r| r.start.clone())
                    .unwrap_or_default();
                let merge = merge::MergeRoutes::new(self.ctx.clone(), left, right, start);
                Ok(Box::new(merge) as BoxedProcedure)
            },
            request.wait_ms,
        )
        .await
    }

    async fn move_route(
        &self,
        request: Request<pb::MoveRouteRequest>,
    ) -> Result<Response<pb::RouteChangeResponse>, Status> {
        let request = request.into_inner();
        let (route, to) = (request.route_id, request.to_group);
        self.change(
            &request.request_id,
            |catalog| {
                let from = move_route::plan(catalog, route, to)?;
                if !self.ctx.plane.live.groups().contains(&to) {
                    return Err(common_meta::Error::invalid_argument(format!(
                        "unknown group {to}: no node reports hosting it"
                    )));
                }
                let timeout = self.ctx.move_timeout;
                let moving = move_route::MoveRoute::new(self.ctx.clone(), route, from, to, timeout);
                Ok(Box::new(moving) as BoxedProcedure)
            },
            request.wait_ms,
        )
        .await
    }
}
