//! The `meta.v1.Region` service (leader only): region migration, a region's view,
//! maintenance mode, the balancer switch, and draining a datanode.

use std::sync::Arc;
use std::time::Duration;

use common_meta::model::node::{NodeRole, NodeState};
use common_meta::model::table::{LeaderState, RegionId};
use meta_proto::v1 as pb;
use procedure::ProcedureManager;
use tonic::{Request, Response, Status};

use crate::cluster_plane::supervisor::{BALANCER, MAINTENANCE, Supervisor};
use crate::error::to_status;
use crate::procedure_host::ProcedureHost;
use crate::procedures::ddl::context::DdlContext;
use crate::procedures::region;
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;

/// Longest wait a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Serves `meta.v1.Region`.
pub struct RegionService {
    /// This member.
    pub member_id: u64,
    /// The leader's procedure manager.
    pub host: Arc<ProcedureHost>,
    /// For the not-leader hint.
    pub driver: DriverHandle,
    /// For the not-leader hint.
    pub members: Arc<Members>,
    /// Managers and the cluster plane.
    pub ctx: Arc<DdlContext>,
    /// Switches and work in progress.
    pub supervisor: Arc<Supervisor>,
    /// A migration's timeout when the request gives none.
    pub migration_timeout: Duration,
}

fn header(member_id: u64) -> Option<pb::ResponseHeader> {
    common_meta::rpc::header(member_id, 0)
}

/// How people read a region role.
fn role_name(role: i32) -> &'static str {
    match pb::RegionRole::try_from(role) {
        Ok(pb::RegionRole::Leader) => "leader",
        Ok(pb::RegionRole::Follower) => "follower",
        Ok(pb::RegionRole::DowngradingLeader) => "downgrading",
        _ => "unknown",
    }
}

impl RegionService {
    async fn manager(&self) -> Result<ProcedureManager, Status> {
        if let Some(manager) = self.host.manager() {
            return Ok(manager);
        }
        Err(crate::error::not_leader(&self.driver, &self.members, self.member_id).await)
    }

    async fn status(&self) -> Result<pb::MaintenanceResponse, Status> {
        let switches = self.supervisor.switches().await.map_err(to_status)?;
        let (running, pending) = self.supervisor.load();
        Ok(pb::MaintenanceResponse {
            header: header(self.member_id),
            status: Some(pb::MaintenanceStatus {
                maintenance: switches.maintenance,
                balancer: switches.balancer,
                failover: self.supervisor.failover_enabled(),
                running_migrations: running as u64,
                pending_failovers: pending as u64,
            }),
        })
    }
}

#[tonic::async_trait]
impl pb::region_server::Region for RegionService {
    async fn migrate(
        &self,
        request: Request<pb::MigrateRegionRequest>,
    ) -> Result<Response<pb::MigrateRegionResponse>, Status> {
        let manager = self.manager().await?;
        let request = request.into_inner();
        // Unfinished migrations of an earlier term own their regions first.
        let term = (*self.ctx.plane.leadership.borrow()).unwrap_or(0);
        self.supervisor
            .seed(term, &manager)
            .await
            .map_err(to_status)?;
        let from = region::leader_of(&self.ctx, &request.region_ids)
            .await
            .map_err(to_status)?;
        region::check_target(&self.ctx, from, request.to_node)
            .await
            .map_err(to_status)?;
        let timeout = match request.timeout_ms {
            0 => self.migration_timeout,
            ms => Duration::from_millis(ms),
        };
        let (id, watcher) = region::submit(
            &manager,
            &self.ctx,
            request.region_ids,
            (from, request.to_node),
            timeout,
            "manual",
        )
        .await
        .map_err(to_status)?;
        let wait = Duration::from_millis(request.wait_ms).min(MAX_WAIT);
        let (done, output) = match watcher {
            Some(watcher) if !wait.is_zero() => {
                match tokio::time::timeout(wait, watcher.wait()).await {
                    Err(_) => (false, String::new()),
                    Ok(Ok(output)) => (true, output.unwrap_or_default()),
                    Ok(Err(e)) => {
                        return Err(Status::failed_precondition(format!(
                            "migration {id} failed: {e}"
                        )));
                    }
                }
            }
            _ => (false, String::new()),
        };
        Ok(Response::new(pb::MigrateRegionResponse {
            header: header(self.member_id),
            procedure_id: id,
            done,
            output,
        }))
    }

    async fn get_region(
        &self,
        request: Request<pb::GetRegionRequest>,
    ) -> Result<Response<pb::GetRegionResponse>, Status> {
        self.manager().await?;
        let id = RegionId::from(request.into_inner().region_id);
        let route = self
            .ctx
            .tables
            .table_route(id.table_id())
            .await
            .map_err(to_status)?;
        let entry = route
            .as_ref()
            .and_then(|r| r.value.regions.iter().find(|e| e.region == id))
            .ok_or_else(|| Status::not_found(format!("region {id} not found")))?;
        let op = self.ctx.plane.leases.operation(id.as_u64());
        let mut reported = std::collections::HashMap::new();
        for node in self.ctx.nodes.list_local().await.map_err(to_status)? {
            if let Some(load) = self.ctx.plane.live.region(node.id, id.as_u64()) {
                reported.insert(node.id, role_name(load.role).to_string());
            }
        }
        Ok(Response::new(pb::GetRegionResponse {
            header: header(self.member_id),
            region: Some(pb::RegionView {
                region_id: id.as_u64(),
                leader: entry.leader.as_ref().map_or(0, |p| p.id),
                followers: entry.followers.iter().map(|p| p.id).collect(),
                leader_state: match entry.leader_state {
                    LeaderState::Serving => "serving",
                    LeaderState::Downgrading => "downgrading",
                }
                .to_string(),
                route_version: route.as_ref().map_or(0, |r| r.value.version),
                moving_procedure: op.as_ref().map(|o| o.procedure.clone()).unwrap_or_default(),
                moving_to: op.map_or(0, |o| o.to),
                reported,
            }),
        }))
    }

    async fn set_maintenance(
        &self,
        request: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::MaintenanceResponse>, Status> {
        self.manager().await?;
        self.supervisor
            .set_switch(MAINTENANCE, request.into_inner().enabled)
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.status().await?))
    }

    async fn get_maintenance(
        &self,
        _request: Request<pb::GetMaintenanceRequest>,
    ) -> Result<Response<pb::MaintenanceResponse>, Status> {
        self.manager().await?;
        Ok(Response::new(self.status().await?))
    }

    async fn set_balancer(
        &self,
        request: Request<pb::SetBalancerRequest>,
    ) -> Result<Response<pb::MaintenanceResponse>, Status> {
        self.manager().await?;
        self.supervisor
            .set_switch(BALANCER, request.into_inner().enabled)
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.status().await?))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        self.manager().await?;
        let id = request.into_inner().node_id;
        let node = self
            .ctx
            .nodes
            .get(id)
            .await
            .map_err(to_status)?
            .ok_or_else(|| Status::not_found(format!("datanode {id} not found")))?;
        if node.role != NodeRole::Datanode {
            return Err(Status::invalid_argument(format!(
                "node {id} is a {:?}, not a datanode",
                node.role
            )));
        }
        if node.state != NodeState::Draining {
            self.ctx
                .nodes
                .set_state(id, NodeState::Draining)
                .await
                .map_err(to_status)?;
        }
        let leader_regions = self
            .ctx
            .tables
            .datanode_tables(id)
            .await
            .map_err(to_status)?;
        let mut count = 0u64;
        for table in leader_regions.keys() {
            if let Some(route) = self
                .ctx
                .tables
                .table_route(*table)
                .await
                .map_err(to_status)?
            {
                count += route.value.led_by(id).count() as u64;
            }
        }
        Ok(Response::new(pb::DrainNodeResponse {
            header: header(self.member_id),
            leader_regions: count,
        }))
    }
}
