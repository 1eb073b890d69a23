//! `cargo xtask bench lease`: what keeping many leases alive costs the leader.
//!
//! A three-member release cluster; `--leases` leases of `--ttl` seconds are granted,
//! then each is renewed every third of its TTL over `--streams` keep-alive streams to
//! the leader (the way `LeaseKeeper` renews, without one stream per lease) for
//! `--seconds`. Printed: keep-alives answered per second and the leader's CPU and
//! memory over that window, and that no lease expired.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common_meta::kv::KvBackend;
use meta_client::{MetaClient, MetaClientOptions};
use meta_proto::v1 as pb;
use meta_proto::v1::lease_client::LeaseClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::bench::start_meta_with;
use crate::bench_heartbeat::{ticks_per_sec, usage};

/// Settings of `bench lease`.
#[derive(clap::Args, Clone, Debug)]
pub struct LeaseArgs {
    /// Leases kept alive.
    #[arg(long, default_value_t = 100_000)]
    pub leases: usize,
    /// Their TTL in seconds (each is renewed every third of it).
    #[arg(long, default_value_t = 30)]
    pub ttl: i64,
    /// Keep-alive streams the renewals share.
    #[arg(long, default_value_t = 16)]
    pub streams: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
}

impl LeaseArgs {
    /// The same settings as command-line arguments.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "lease".into(),
            format!("--leases={}", self.leases),
            format!("--ttl={}", self.ttl),
            format!("--streams={}", self.streams),
            format!("--seconds={}", self.seconds),
        ]
    }
}

/// Runs the benchmark (release build).
pub async fn run(args: LeaseArgs) -> anyhow::Result<()> {
    println!(
        "bench lease: {} leases of {} s over {} keep-alive streams, 3 members, {} s",
        args.leases, args.ttl, args.streams, args.seconds
    );
    let (procs, endpoints) = start_meta_with(3, None).await?;
    let client = MetaClient::new(&endpoints, MetaClientOptions::default())?;
    // Grant, 64 at a time.
    let granting = Instant::now();
    let mut ids = Vec::with_capacity(args.leases);
    let mut pending = Vec::new();
    for _ in 0..args.leases {
        let client = client.clone();
        let ttl = args.ttl;
        pending.push(tokio::spawn(
            async move { client.lease_grant(ttl, 0).await },
        ));
        if pending.len() == 64 {
            for task in pending.drain(..) {
                ids.push(task.await??.id);
            }
        }
    }
    for task in pending {
        ids.push(task.await??.id);
    }
    println!(
        "granted {} leases in {:.1} s",
        ids.len(),
        granting.elapsed().as_secs_f64()
    );

    // The leader now (granting may have moved it).
    let status = client.status().await?;
    let leader = status.leader_id as usize;
    if leader == 0 {
        bail!("no leader");
    }
    let leader_addr = endpoints[leader - 1].clone();
    let pid = procs.pid(leader - 1);

    // Renew each every ttl/3, spread evenly, over the streams.
    let answered = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let period = Duration::from_secs(args.ttl.unsigned_abs()) / 3;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{leader_addr}"))?
        .connect()
        .await
        .context("connecting to the leader")?;
    let mut tasks = Vec::new();
    let per_stream = ids.len().div_ceil(args.streams.max(1));
    for chunk in ids.chunks(per_stream.max(1)) {
        let chunk = chunk.to_vec();
        let (requests, outbound) = mpsc::channel(1024);
        let mut responses = LeaseClient::new(channel.clone())
            .lease_keep_alive(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        let (answered, lost) = (answered.clone(), lost.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(response)) = responses.message().await {
                if response.ttl > 0 {
                    answered.fetch_add(1, Ordering::Relaxed);
                } else {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        tasks.push(tokio::spawn(async move {
            let gap = period / chunk.len().max(1) as u32;
            let mut tick = tokio::time::interval(gap.max(Duration::from_micros(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            loop {
                for id in &chunk {
                    tick.tick().await;
                    if requests
                        .send(pb::LeaseKeepAliveRequest { id: *id })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }));
    }
    // One full renewal round before measuring, so every lease is being renewed.
    tokio::time::sleep(period).await;
    let ticks = ticks_per_sec();
    let (cpu_before, _) = usage(pid, ticks)?;
    let answered_before = answered.load(Ordering::Relaxed);
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let wall = began.elapsed().as_secs_f64();
    let (cpu_after, rss) = usage(pid, ticks)?;
    let rate = (answered.load(Ordering::Relaxed) - answered_before) as f64 / wall;
    for task in tasks {
        task.abort();
    }
    let alive = client.leases().await?.len();
    println!(
        "keep-alives {rate:.0}/s; leader CPU {:.0}% of one core; leader RSS {:.0} MiB; leases alive at the end {alive} of {}; keep-alives answered 'gone' {}",
        (cpu_after - cpu_before) / wall * 100.0,
        rss as f64 / (1024.0 * 1024.0),
        ids.len(),
        lost.load(Ordering::Relaxed)
    );
    Ok(())
}
