//! The range route catalog (`meta.v1.RouteCatalog`): reading it, splitting, merging and
//! moving routes, and a [`RouteTable`] that follows it by watch.

use std::sync::Arc;
use std::time::Duration;

use common_meta::Result;
use common_meta::model::route::{RouteCatalog, RouteChange, RouteDescriptor};
use common_meta::route_table::RouteTable;
use meta_proto::v1 as pb;
use meta_proto::v1::route_catalog_client::RouteCatalogClient;

use crate::client::MetaClient;

/// What a split, merge or move answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChangeAnswer {
    /// Its procedure (`metactl procedure show ID`).
    pub procedure_id: String,
    /// What it made, once it finished within the wait (None: still running).
    pub change: Option<RouteChange>,
}

fn routes(routes: Vec<pb::Route>) -> Result<Vec<RouteDescriptor>> {
    routes.into_iter().map(RouteDescriptor::try_from).collect()
}

impl MetaClient {
    /// The whole catalog (linearizable).
    pub async fn routes(&self) -> Result<RouteCatalog> {
        let answer = self
            .with_channel(|channel| async move {
                // A catalog of many routes is a large answer.
                RouteCatalogClient::new(channel)
                    .max_decoding_message_size(crate::client::MAX_RESPONSE_BYTES)
                    .list_routes(pb::ListRoutesRequest {})
                    .await
            })
            .await?;
        let routes = routes(answer.routes)?;
        Ok(RouteCatalog {
            version: answer.version,
            next_id: routes.iter().map(|r| r.route_id + 1).max().unwrap_or(1),
            routes,
        })
    }

    /// The route owning `key`, and the catalog version it was read at.
    pub async fn route_of(&self, key: &[u8]) -> Result<(RouteDescriptor, u64)> {
        let key = key.to_vec();
        let answer = self
            .with_channel(|channel| {
                let key = key.clone();
                async move {
                    RouteCatalogClient::new(channel)
                        .get_route(pb::GetRouteRequest { key })
                        .await
                }
            })
            .await?;
        let route = answer.route.ok_or_else(|| common_meta::Error::Remote {
            code: "Internal".to_string(),
            message: "the server answered no route".to_string(),
        })?;
        Ok((route.try_into()?, answer.version))
    }

    /// Splits the route owning `key` at `key`; waits up to `wait` for it.
    pub async fn split_route(&self, key: &[u8], wait: Duration) -> Result<RouteChangeAnswer> {
        let key = key.to_vec();
        self.change_routes(wait, |channel, wait_ms, request_id| {
            let key = key.clone();
            async move {
                RouteCatalogClient::new(channel)
                    .split_route(pb::SplitRouteRequest {
                        key,
                        wait_ms,
                        request_id,
                    })
                    .await
            }
        })
        .await
    }

    /// Merges route `route_id` with its right neighbour; waits up to `wait` for it.
    pub async fn merge_route(&self, route_id: u64, wait: Duration) -> Result<RouteChangeAnswer> {
        self.change_routes(wait, |channel, wait_ms, request_id| async move {
            RouteCatalogClient::new(channel)
                .merge_route(pb::MergeRouteRequest {
                    route_id,
                    wait_ms,
                    request_id,
                })
                .await
        })
        .await
    }

    /// Moves route `route_id` to group `to_group`; waits up to `wait` for it.
    pub async fn move_route(
        &self,
        route_id: u64,
        to_group: u64,
        wait: Duration,
    ) -> Result<RouteChangeAnswer> {
        self.change_routes(wait, |channel, wait_ms, request_id| async move {
            RouteCatalogClient::new(channel)
                .move_route(pb::MoveRouteRequest {
                    route_id,
                    to_group,
                    wait_ms,
                    request_id,
                })
                .await
        })
        .await
    }

    /// A route table kept current by watch on this client's connection (see
    /// [`RouteTable`]); `initial_group` is the server's `[routes] initial_group`, the
    /// group of the built-in first catalog.
    pub async fn route_table(&self, initial_group: u64) -> Result<RouteTable> {
        RouteTable::follow_with(Arc::new(self.clone()), initial_group).await
    }

    /// Sends a change under a request id made here (a retry after a lost answer waits
    /// for the first submission instead of being refused by its own change), the
    /// server waiting a bounded time; then polls its procedure until `wait` is over.
    async fn change_routes<F, Fut>(&self, wait: Duration, call: F) -> Result<RouteChangeAnswer>
    where
        F: Fn(crate::auth::Conn, u64, String) -> Fut,
        Fut: std::future::Future<
                Output = std::result::Result<
                    tonic::Response<pb::RouteChangeResponse>,
                    tonic::Status,
                >,
            >,
    {
        let started = std::time::Instant::now();
        // The server's wait ends before one attempt's timeout does; then this polls. A
        // zero wait still asks the server for a moment (it would wait its default).
        let server_wait = wait
            .min(self.options().request_timeout.mul_f64(0.8))
            .max(Duration::from_millis(1));
        let request_id = crate::ddl::request_id();
        let answer = self
            .with_channel(|channel| {
                call(channel, server_wait.as_millis() as u64, request_id.clone())
            })
            .await?;
        let mut change = answer.done.then(|| -> Result<RouteChange> {
            Ok(RouteChange {
                version: answer.version,
                routes: routes(answer.routes.clone())?,
            })
        });
        let mut pause = Duration::from_millis(50);
        while change.is_none() && started.elapsed() < wait {
            let info = self.procedure(&answer.procedure_id).await?;
            match info.state.as_str() {
                "done" => {
                    change = Some(serde_json::from_str(&info.output).map_err(|e| {
                        common_meta::Error::Remote {
                            code: "Internal".to_string(),
                            message: format!("procedure {} left no route change: {e}", info.id),
                        }
                    }));
                }
                "failed" => return Err(common_meta::Error::from_procedure_error(&info.error)),
                _ => {
                    tokio::time::sleep(crate::client::jittered(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
        Ok(RouteChangeAnswer {
            procedure_id: answer.procedure_id,
            change: change.transpose()?,
        })
    }
}
