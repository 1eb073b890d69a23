//! DDL, table look-ups and id sequences (`meta.v1.Ddl`): the RPC side of the metadata
//! plane. The cache that invalidations keep current is in `table_cache.rs`.
//!
//! A DDL call carries a request id made here, so sending it again (after a lost
//! answer, a leader change, a timeout) waits for the first submission instead of
//! running it twice. The server waits for the procedure for a while; if it is not done
//! by then, the call polls it until it is, or until `MetaClientOptions::ddl_timeout`.

use std::ops::Range;
use std::time::{Duration, Instant};

use common_meta::model::table::{TableInfo, TableRoute};
use common_meta::{Error, Result};
use meta_proto::v1 as pb;
use meta_proto::v1::ddl_client::DdlClient;

use crate::client::{MetaClient, jittered};

/// What a submitted DDL came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdlAnswer {
    /// The procedure that carried it out.
    pub procedure_id: String,
    /// The table it was about (0 for database DDL).
    pub table_id: u32,
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|e| Error::Remote {
        code: "Internal".to_string(),
        message: format!("the server's {what} does not decode: {e}"),
    })
}

pub(crate) fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "c{}-{nanos:x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl MetaClient {
    /// Submits `task` and waits until its procedure is done; its failure is the error
    /// (AlreadyExists, NotFound, InvalidArgument, FailedPrecondition, ...).
    pub async fn submit_ddl(&self, task: pb::DdlTask) -> Result<DdlAnswer> {
        let started = Instant::now();
        let limit = self.options().ddl_timeout;
        // The server's wait ends before one attempt's timeout does.
        let wait = self.options().request_timeout.mul_f64(0.8);
        let request = pb::SubmitDdlRequest {
            task: Some(task),
            request_id: request_id(),
            timeout_ms: wait.as_millis().max(1) as u64,
        };
        let answer = self
            .with_channel(|channel| {
                let request = request.clone();
                async move { DdlClient::new(channel).submit(request).await }
            })
            .await?;
        if answer.done {
            return Ok(DdlAnswer {
                procedure_id: answer.procedure_id,
                table_id: answer.table_id,
            });
        }
        let mut pause = Duration::from_millis(50);
        loop {
            let info = self.procedure(&answer.procedure_id).await?;
            match info.state.as_str() {
                "done" => {
                    return Ok(DdlAnswer {
                        table_id: info.output.parse().unwrap_or(0),
                        procedure_id: info.id,
                    });
                }
                "failed" => return Err(Error::from_procedure_error(&info.error)),
                _ if started.elapsed() >= limit => {
                    return Err(Error::Unavailable {
                        message: format!(
                            "DDL procedure {} is still {} after {limit:?}; it goes on: poll it with `metactl procedure show`",
                            info.id, info.state
                        ),
                    });
                }
                _ => {
                    tokio::time::sleep(jittered(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Creates schema `catalog.schema` (empty catalog: the default).
    pub async fn create_database(
        &self,
        catalog: &str,
        schema: &str,
        options: impl IntoIterator<Item = (String, String)>,
        if_not_exists: bool,
    ) -> Result<()> {
        let task = pb::ddl_task::Kind::CreateDatabase(pb::CreateDatabaseTask {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
            options: options.into_iter().collect(),
            if_not_exists,
        });
        self.submit_ddl(pb::DdlTask { kind: Some(task) })
            .await
            .map(drop)
    }

    /// Drops schema `catalog.schema` and every table in it.
    pub async fn drop_database(&self, catalog: &str, schema: &str, if_exists: bool) -> Result<()> {
        let task = pb::ddl_task::Kind::DropDatabase(pb::DropDatabaseTask {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
            if_exists,
        });
        self.submit_ddl(pb::DdlTask { kind: Some(task) })
            .await
            .map(drop)
    }

    /// Creates table `info` (its id and region places are chosen by meta); its id.
    pub async fn create_table(&self, info: &TableInfo, if_not_exists: bool) -> Result<u32> {
        let table_info_json =
            serde_json::to_string(info).map_err(|e| Error::invalid_argument(e.to_string()))?;
        let task = pb::ddl_task::Kind::CreateTable(pb::CreateTableTask {
            table_info_json,
            if_not_exists,
        });
        Ok(self
            .submit_ddl(pb::DdlTask { kind: Some(task) })
            .await?
            .table_id)
    }

    /// Drops table `catalog.schema.table` and its regions.
    pub async fn drop_table(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
        if_exists: bool,
    ) -> Result<()> {
        let task = pb::ddl_task::Kind::DropTable(pb::DropTableTask {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
            table: table.to_string(),
            if_exists,
        });
        self.submit_ddl(pb::DdlTask { kind: Some(task) })
            .await
            .map(drop)
    }

    /// Alters a table (columns, options) as `task` says.
    pub async fn alter_table(&self, task: pb::AlterTableTask) -> Result<()> {
        let task = pb::ddl_task::Kind::AlterTable(task);
        self.submit_ddl(pb::DdlTask { kind: Some(task) })
            .await
            .map(drop)
    }

    /// Empties table `catalog.schema.table`.
    pub async fn truncate_table(&self, catalog: &str, schema: &str, table: &str) -> Result<()> {
        let task = pb::ddl_task::Kind::TruncateTable(pb::TruncateTableTask {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
            table: table.to_string(),
        });
        self.submit_ddl(pb::DdlTask { kind: Some(task) })
            .await
            .map(drop)
    }

    /// Renames table `catalog.schema.table` to `new_name`.
    pub async fn rename_table(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
        new_name: &str,
    ) -> Result<()> {
        let task = pb::ddl_task::Kind::RenameTable(pb::RenameTableTask {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
            table: table.to_string(),
            new_name: new_name.to_string(),
        });
        self.submit_ddl(pb::DdlTask { kind: Some(task) })
            .await
            .map(drop)
    }

    async fn get_table(&self, request: pb::GetTableRequest) -> Result<(TableInfo, TableRoute)> {
        let answer = self
            .with_channel(|channel| {
                let request = request.clone();
                async move { DdlClient::new(channel).get_table(request).await }
            })
            .await?;
        Ok((
            decode("table info", &answer.table_info_json)?,
            decode("table route", &answer.table_route_json)?,
        ))
    }

    /// Table `catalog.schema.table`'s info and route (NotFound when there is none).
    pub async fn table(
        &self,
        catalog: &str,
        schema: &str,
        table: &str,
    ) -> Result<(TableInfo, TableRoute)> {
        self.get_table(pb::GetTableRequest {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
            table: table.to_string(),
            table_id: 0,
        })
        .await
    }

    /// Table `id`'s info and route.
    pub async fn table_by_id(&self, id: u32) -> Result<(TableInfo, TableRoute)> {
        self.get_table(pb::GetTableRequest {
            table_id: id,
            ..Default::default()
        })
        .await
    }

    /// Table `id`'s info.
    pub async fn table_info(&self, id: u32) -> Result<TableInfo> {
        Ok(self.table_by_id(id).await?.0)
    }

    /// Table `id`'s route.
    pub async fn table_route(&self, id: u32) -> Result<TableRoute> {
        Ok(self.table_by_id(id).await?.1)
    }

    /// Tables of `catalog.schema` (every schema of the catalog when `schema` is empty).
    pub async fn list_tables(&self, catalog: &str, schema: &str) -> Result<Vec<TableInfo>> {
        let request = pb::ListTablesRequest {
            catalog: catalog.to_string(),
            schema: schema.to_string(),
        };
        let answer = self
            .with_channel(|channel| {
                let request = request.clone();
                async move { DdlClient::new(channel).list_tables(request).await }
            })
            .await?;
        answer
            .table_info_json
            .iter()
            .map(|json| decode("table info", json))
            .collect()
    }

    /// Schemas of `catalog` (of every catalog when empty).
    pub async fn list_databases(&self, catalog: &str) -> Result<Vec<pb::DatabaseInfo>> {
        let request = pb::ListDatabasesRequest {
            catalog: catalog.to_string(),
        };
        let answer = self
            .with_channel(|channel| {
                let request = request.clone();
                async move { DdlClient::new(channel).list_databases(request).await }
            })
            .await?;
        Ok(answer.databases)
    }

    /// `count` new ids of sequence `name`: unique forever and increasing (with gaps).
    /// A retried call may skip the range an earlier attempt reserved; never reuses it.
    pub async fn alloc_ids(&self, name: &str, count: u64) -> Result<Range<u64>> {
        let request = pb::AllocIdsRequest {
            name: name.to_string(),
            count,
        };
        let answer = self
            .with_channel(|channel| {
                let request = request.clone();
                async move { DdlClient::new(channel).alloc_ids(request).await }
            })
            .await?;
        Ok(answer.start..answer.end)
    }
}
