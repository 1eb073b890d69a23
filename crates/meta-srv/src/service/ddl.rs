//! The `meta.v1.Ddl` service: DDL submitted as procedures on the leader (wait with a
//! timeout, else answer the procedure id), table and database look-ups, id sequences.

use std::sync::Arc;
use std::time::Duration;

use common_meta::kv::KvLimits;
use common_meta::manager::catalog::{DEFAULT_CATALOG, unknown_catalog};
use meta_proto::v1 as pb;
use procedure::{ProcedureManager, ProcedureState, ProcedureWithId};
use tonic::{Request, Response, Status};

use crate::error::to_status;
use crate::procedure_host::ProcedureHost;
use crate::procedures::ddl::context::DdlContext;
use crate::procedures::ddl::{Planned, procedure_for, unknown_schema, unknown_table};
use crate::raft::driver::DriverHandle;
use crate::raft::members::Members;

/// Serves `meta.v1.Ddl`.
pub struct DdlService {
    /// This member.
    pub member_id: u64,
    /// The leader's procedure manager.
    pub host: Arc<ProcedureHost>,
    /// For the not-leader hint.
    pub driver: DriverHandle,
    /// For the not-leader hint.
    pub members: Arc<Members>,
    /// Managers, ids and the mailbox.
    pub ctx: Arc<DdlContext>,
    /// The store's limits (a table's info must fit in one value).
    pub limits: KvLimits,
}

fn header(member_id: u64) -> Option<pb::ResponseHeader> {
    common_meta::rpc::header(member_id, 0)
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, Status> {
    serde_json::to_string(value).map_err(|e| Status::internal(e.to_string()))
}

/// The procedure id of a submission: `ddl-{request_id}`, or a fresh one.
fn procedure_id(request_id: &str) -> Result<String, Status> {
    super::procedure_id("ddl", request_id)
}

/// How a submission ended, as far as the caller waited.
enum Ended {
    Done(Option<String>),
    Failed(String),
    Waiting,
}

impl DdlService {
    async fn manager(&self) -> Result<ProcedureManager, Status> {
        if let Some(manager) = self.host.manager() {
            return Ok(manager);
        }
        Err(crate::error::not_leader(&self.driver, &self.members, self.member_id).await)
    }

    /// Submits `procedure` as `id`; a concurrent submission of the same id is fine (the
    /// caller waits for whichever went first).
    async fn start(
        &self,
        manager: &ProcedureManager,
        id: &str,
        procedure: procedure::BoxedProcedure,
    ) -> Result<(), Status> {
        match manager
            .submit(ProcedureWithId {
                id: id.to_string(),
                procedure,
            })
            .await
        {
            Ok(_) | Err(procedure::Error::Duplicate(_)) => Ok(()),
            // Leadership ended under the submission: nothing was saved here, or the
            // next leader runs it (a retry with the same request id finds it).
            Err(e @ procedure::Error::Stopped) => {
                Err(to_status(common_meta::Error::outcome_unknown(format!(
                    "{e}; submit again with the same request_id"
                ))))
            }
            Err(e) if e.is_retryable() => Err(to_status(common_meta::Error::Unavailable {
                message: e.to_string(),
            })),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    /// Waits up to `timeout` for procedure `id` (running here, or finished).
    async fn wait(
        &self,
        manager: &ProcedureManager,
        id: &str,
        timeout: Duration,
    ) -> Result<Ended, Status> {
        if let Some(watcher) = manager.watch(id) {
            return match tokio::time::timeout(timeout, watcher.wait()).await {
                Err(_) => Ok(Ended::Waiting),
                Ok(Ok(output)) => Ok(Ended::Done(output)),
                Ok(Err(procedure::Error::Stopped)) => {
                    Err(to_status(common_meta::Error::outcome_unknown(format!(
                        "leadership changed while DDL procedure {id} ran; the next leader finishes it: submit again with the same request_id, or poll the procedure"
                    ))))
                }
                Ok(Err(e)) => Ok(Ended::Failed(e.to_string())),
            };
        }
        let record = manager
            .state(id)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("procedure {id} not found")))?;
        Ok(match record.state {
            ProcedureState::Done => Ended::Done(record.output),
            ProcedureState::Failed => Ended::Failed(record.error.unwrap_or_default()),
            _ => Ended::Waiting,
        })
    }
}

#[tonic::async_trait]
impl pb::ddl_server::Ddl for DdlService {
    async fn submit(
        &self,
        request: Request<pb::SubmitDdlRequest>,
    ) -> Result<Response<pb::SubmitDdlResponse>, Status> {
        let request = request.into_inner();
        let manager = self.manager().await?;
        let task = request.task.unwrap_or_default();
        let id = procedure_id(&request.request_id)?;
        // A retry of a submission that already ran must wait for it, not plan again
        // (its own table would be "already exists"): known in memory, or else (only
        // when planning fails, so a first submission pays no read for it) on record.
        if manager.watch(&id).is_none() {
            match procedure_for(&self.ctx, task, &self.limits).await {
                Ok(Planned::Run(procedure)) => self.start(&manager, &id, procedure).await?,
                Ok(Planned::Exists(table_id)) => {
                    return Ok(Response::new(pb::SubmitDdlResponse {
                        header: header(self.member_id),
                        procedure_id: String::new(),
                        done: true,
                        table_id,
                    }));
                }
                Err(e) => {
                    let known = manager.state(&id).await.ok().flatten().is_some();
                    if !known {
                        return Err(to_status(e));
                    }
                }
            }
        }
        let timeout = Duration::from_millis(match request.timeout_ms {
            0 => self.ctx.config.ddl_timeout_ms,
            ms => ms,
        });
        let (done, output) = match self.wait(&manager, &id, timeout).await? {
            Ended::Done(output) => (true, output),
            Ended::Failed(error) => {
                return Err(to_status(common_meta::Error::from_procedure_error(&error)));
            }
            Ended::Waiting => (false, None),
        };
        Ok(Response::new(pb::SubmitDdlResponse {
            header: header(self.member_id),
            procedure_id: id,
            done,
            table_id: output.and_then(|o| o.parse().ok()).unwrap_or(0),
        }))
    }

    async fn get_table(
        &self,
        request: Request<pb::GetTableRequest>,
    ) -> Result<Response<pb::GetTableResponse>, Status> {
        let r = request.into_inner();
        let tables = &self.ctx.tables;
        let id = if r.table_id != 0 {
            r.table_id
        } else {
            let catalog = if r.catalog.is_empty() {
                DEFAULT_CATALOG
            } else {
                &r.catalog
            };
            let schema = if r.schema.is_empty() {
                "public"
            } else {
                &r.schema
            };
            tables
                .table_id(catalog, schema, &r.table)
                .await
                .map_err(to_status)?
                .ok_or_else(|| to_status(unknown_table(catalog, schema, &r.table)))?
        };
        let missing = || {
            to_status(common_meta::Error::NotFound {
                what: format!("table {id}"),
            })
        };
        let info = tables
            .table_info(id)
            .await
            .map_err(to_status)?
            .ok_or_else(missing)?;
        let route = tables
            .table_route(id)
            .await
            .map_err(to_status)?
            .ok_or_else(missing)?;
        Ok(Response::new(pb::GetTableResponse {
            header: header(self.member_id),
            table_info_json: json(&info.value)?,
            table_route_json: json(&route.value)?,
        }))
    }

    async fn list_tables(
        &self,
        request: Request<pb::ListTablesRequest>,
    ) -> Result<Response<pb::ListTablesResponse>, Status> {
        let r = request.into_inner();
        let catalog = if r.catalog.is_empty() {
            DEFAULT_CATALOG
        } else {
            &r.catalog
        };
        let schema = (!r.schema.is_empty()).then_some(r.schema.as_str());
        match schema {
            Some(schema) => {
                if self
                    .ctx
                    .catalogs
                    .schema(catalog, schema)
                    .await
                    .map_err(to_status)?
                    .is_none()
                {
                    return Err(to_status(unknown_schema(catalog, schema)));
                }
            }
            None => {
                if self
                    .ctx
                    .catalogs
                    .catalog(catalog)
                    .await
                    .map_err(to_status)?
                    .is_none()
                {
                    return Err(to_status(unknown_catalog(catalog)));
                }
            }
        }
        let infos = self
            .ctx
            .tables
            .tables(catalog, schema)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListTablesResponse {
            header: header(self.member_id),
            table_info_json: infos.iter().map(json).collect::<Result<_, _>>()?,
        }))
    }

    async fn list_databases(
        &self,
        request: Request<pb::ListDatabasesRequest>,
    ) -> Result<Response<pb::ListDatabasesResponse>, Status> {
        let r = request.into_inner();
        let catalog = (!r.catalog.is_empty()).then_some(r.catalog.as_str());
        let schemas = self
            .ctx
            .catalogs
            .schemas(catalog)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListDatabasesResponse {
            header: header(self.member_id),
            databases: schemas
                .into_iter()
                .map(|s| pb::DatabaseInfo {
                    catalog: s.catalog,
                    schema: s.schema,
                    options: s.value.options.into_iter().collect(),
                    created_ms: s.value.created_ms,
                })
                .collect(),
        }))
    }

    async fn alloc_ids(
        &self,
        request: Request<pb::AllocIdsRequest>,
    ) -> Result<Response<pb::AllocIdsResponse>, Status> {
        let r = request.into_inner();
        // Only the leader's sequences start above every earlier reservation.
        self.manager().await?;
        let ids = self
            .ctx
            .next_ids(&r.name, r.count)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::AllocIdsResponse {
            header: header(self.member_id),
            start: ids.start,
            end: ids.end,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_become_procedure_ids_and_bad_ones_are_refused() {
        assert_eq!(procedure_id("abc-1.2:3_4").unwrap(), "ddl-abc-1.2:3_4");
        assert!(procedure_id("").unwrap().starts_with("ddl-"));
        assert_ne!(procedure_id("").unwrap(), procedure_id("").unwrap());
        for bad in ["a/b", "a b", &"x".repeat(129)] {
            let status = procedure_id(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
