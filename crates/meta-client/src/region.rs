//! Regions (`meta.v1.Region`): moving them, looking one up, maintenance mode, the
//! balancer switch and draining a datanode.

use std::time::Duration;

use common_meta::Result;
use meta_proto::v1 as pb;
use meta_proto::v1::region_client::RegionClient;

use crate::client::MetaClient;

impl MetaClient {
    /// Moves `regions` (all led by one datanode) to datanode `to`; waits up to `wait`
    /// for the migration (zero: answers at once with its procedure id). `timeout` is
    /// the migration's own limit (zero: the server's default). A second move of a
    /// region already moving is FailedPrecondition naming the running procedure.
    pub async fn migrate_regions(
        &self,
        regions: &[u64],
        to: u64,
        timeout: Duration,
        wait: Duration,
    ) -> Result<pb::MigrateRegionResponse> {
        let started = std::time::Instant::now();
        // The server's wait ends before one attempt's timeout does; then this polls.
        let server_wait = wait.min(self.options().request_timeout.mul_f64(0.8));
        let request = pb::MigrateRegionRequest {
            region_ids: regions.to_vec(),
            to_node: to,
            timeout_ms: timeout.as_millis() as u64,
            wait_ms: server_wait.as_millis() as u64,
        };
        let mut answer = self
            .with_channel(|channel| {
                let request = request.clone();
                async move { RegionClient::new(channel).migrate(request).await }
            })
            .await?;
        let mut pause = Duration::from_millis(50);
        while !answer.done && started.elapsed() < wait {
            let info = self.procedure(&answer.procedure_id).await?;
            match info.state.as_str() {
                "done" => {
                    answer.done = true;
                    answer.output = info.output;
                }
                "failed" => {
                    return Err(common_meta::Error::FailedPrecondition {
                        message: format!("migration {} failed: {}", info.id, info.error),
                    });
                }
                _ => {
                    tokio::time::sleep(crate::client::jittered(pause)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
        Ok(answer)
    }

    /// Where region `region` is led, whether it is moving, and who reports it.
    pub async fn region(&self, region: u64) -> Result<pb::RegionView> {
        let answer = self
            .with_channel(|channel| async move {
                RegionClient::new(channel)
                    .get_region(pb::GetRegionRequest { region_id: region })
                    .await
            })
            .await?;
        answer.region.ok_or_else(|| common_meta::Error::Remote {
            code: "Internal".to_string(),
            message: "the server answered no region".to_string(),
        })
    }

    /// Turns maintenance mode (paused failover and balancing) on or off.
    pub async fn set_maintenance(&self, enabled: bool) -> Result<pb::MaintenanceStatus> {
        let answer = self
            .with_channel(|channel| async move {
                RegionClient::new(channel)
                    .set_maintenance(pb::SetMaintenanceRequest { enabled })
                    .await
            })
            .await?;
        Ok(answer.status.unwrap_or_default())
    }

    /// Maintenance mode, the balancer switch and the supervisor's work in progress.
    pub async fn maintenance(&self) -> Result<pb::MaintenanceStatus> {
        let answer = self
            .with_channel(|channel| async move {
                RegionClient::new(channel)
                    .get_maintenance(pb::GetMaintenanceRequest {})
                    .await
            })
            .await?;
        Ok(answer.status.unwrap_or_default())
    }

    /// Turns the balancer on or off.
    pub async fn set_balancer(&self, enabled: bool) -> Result<pb::MaintenanceStatus> {
        let answer = self
            .with_channel(|channel| async move {
                RegionClient::new(channel)
                    .set_balancer(pb::SetBalancerRequest { enabled })
                    .await
            })
            .await?;
        Ok(answer.status.unwrap_or_default())
    }

    /// Marks datanode `node` draining (no new regions; its leader regions move off in
    /// the background); the leader regions it still holds.
    pub async fn drain_node(&self, node: u64) -> Result<u64> {
        let answer = self
            .with_channel(|channel| async move {
                RegionClient::new(channel)
                    .drain_node(pb::DrainNodeRequest { node_id: node })
                    .await
            })
            .await?;
        Ok(answer.leader_regions)
    }
}
