//! The `meta.v1.Procedure` service: inspect the leader's procedures.

use std::sync::Arc;

use meta_proto::v1 as pb;
use procedure::{ProcedureRecord, ProcedureState};
use tonic::{Request, Response, Status};

use crate::procedure_host::ProcedureHost;
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;

/// Serves procedure queries from the leader's manager.
pub struct ProcedureService {
    member_id: u64,
    host: Arc<ProcedureHost>,
    driver: DriverHandle,
    members: Arc<Members>,
}

impl ProcedureService {
    /// A service of member `member_id` over its procedure host.
    pub fn new(
        member_id: u64,
        host: Arc<ProcedureHost>,
        driver: DriverHandle,
        members: Arc<Members>,
    ) -> Self {
        ProcedureService {
            member_id,
            host,
            driver,
            members,
        }
    }

    async fn manager(&self) -> Result<procedure::ProcedureManager, Status> {
        if let Some(manager) = self.host.manager() {
            return Ok(manager);
        }
        Err(crate::error::not_leader(&self.driver, &self.members, self.member_id).await)
    }
}

fn state_name(state: ProcedureState) -> &'static str {
    match state {
        ProcedureState::Running => "running",
        ProcedureState::Retrying => "retrying",
        ProcedureState::RollingBack => "rolling_back",
        ProcedureState::Done => "done",
        ProcedureState::Failed => "failed",
    }
}

fn info(record: ProcedureRecord) -> pb::ProcedureInfo {
    pb::ProcedureInfo {
        id: record.id,
        type_name: record.type_name,
        state: state_name(record.state).to_string(),
        step: record.step,
        error: record.error.unwrap_or_default(),
        created_ms: record.created_ms,
        updated_ms: record.updated_ms,
        parent_id: record.parent_id.unwrap_or_default(),
        output: record.output.unwrap_or_default(),
    }
}

fn internal(e: procedure::Error) -> Status {
    if e.is_retryable() {
        Status::unavailable(e.to_string())
    } else {
        Status::internal(e.to_string())
    }
}

#[tonic::async_trait]
impl pb::procedure_server::Procedure for ProcedureService {
    async fn query(
        &self,
        request: Request<pb::QueryProcedureRequest>,
    ) -> Result<Response<pb::QueryProcedureResponse>, Status> {
        let id = request.into_inner().id;
        let manager = self.manager().await?;
        let record = manager
            .state(&id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("procedure {id} not found")))?;
        Ok(Response::new(pb::QueryProcedureResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            procedure: Some(info(record)),
        }))
    }

    async fn list(
        &self,
        _request: Request<pb::ListProceduresRequest>,
    ) -> Result<Response<pb::ListProceduresResponse>, Status> {
        let manager = self.manager().await?;
        let records = manager.list().await.map_err(internal)?;
        Ok(Response::new(pb::ListProceduresResponse {
            header: common_meta::rpc::header(self.member_id, 0),
            procedures: records.into_iter().map(info).collect(),
        }))
    }
}
