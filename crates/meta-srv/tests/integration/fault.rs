//! Randomized fault runs: a seeded nemesis kills, restarts, isolates, cuts and delays
//! members of an in-process 3-member cluster while clients put, get and compare-and-put;
//! the recorded history must be linearizable, and a final read of every key (after
//! healing) joins it, so an acknowledged write that was lost fails the check.
//!
//! Two kinds of run: clients on the members' `RaftKvBackend`s (they follow the leader
//! themselves), and clients through `MetaClient` over gRPC to every member's Store
//! service (sessions on, CAS-heavy), where a write is retried across lost replies and
//! leader changes: any retry that applied twice or answered wrongly breaks the history.
//!
//! Through the client, a watcher records every change from revision 1 while the faults
//! happen (its stream moves between members as they fail); after healing, a fresh
//! watch from revision 1 replays the history, and the two must agree event for event:
//! ordered, none missing, none twice, prev_kv alike.
//!
//! `METASRV_FAULT_SEEDS` sets how many seeds each kind runs (default 24 and 12);
//! `cargo xtask fault --seeds N` runs both in release mode with N seeds. A failure
//! names its seed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common_meta::Error;
use common_meta::kv::{CompareAndPutRequest, KvBackend, PutRequest};
use meta_client::{MetaClient, MetaClientOptions};
use meta_srv::raft::backend::RaftKvBackend;

use crate::linearizability::{Call, Op, Outcome, check};
use crate::raft_cluster::Cluster;
use crate::support::wait_until;

const KEYS: u64 = 4;
const CLIENTS: u64 = 3;
const OPS_PER_CLIENT: u64 = 60;
const RUN: Duration = Duration::from_millis(1500);
const TICK: Duration = Duration::from_millis(10);

/// SplitMix64: small, seedable, good enough to pick faults and operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Shared = Arc<Mutex<Cluster>>;

/// How the clients of a run reach the cluster.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    /// Each member's `RaftKvBackend`, following the leader by hand.
    Backends,
    /// `MetaClient` over gRPC to every member (sessions on).
    MetaClient,
}

fn backend(cluster: &Shared, id: u64) -> Option<RaftKvBackend> {
    cluster
        .lock()
        .unwrap()
        .members
        .get(&id)
        .map(|m| m.backend.clone())
}

fn nanos(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

async fn client(
    cluster: Shared,
    seed: u64,
    id: u64,
    leader: Arc<AtomicU64>,
    origin: Instant,
    via: Via,
) -> Vec<Op> {
    let mut rng = Rng(seed ^ (id << 32));
    let mut history = Vec::new();
    // The value this client last saw per key (`None`: absent).
    let mut seen: std::collections::HashMap<String, Option<String>> = Default::default();
    let remote = (via == Via::MetaClient).then(|| {
        let endpoints = cluster.lock().unwrap().endpoints();
        let options = MetaClientOptions {
            deadline: Duration::from_secs(6),
            // Short, so that a swallowed reply is retried within the run.
            request_timeout: Duration::from_millis(300),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
            ..MetaClientOptions::default()
        };
        MetaClient::new(&endpoints, options).unwrap()
    });
    for n in 0..OPS_PER_CLIENT {
        if origin.elapsed() > RUN {
            break;
        }
        // Pacing (not synchronisation): spread the operations over the whole run so
        // that they overlap the faults.
        tokio::time::sleep(Duration::from_millis(5 + rng.below(30))).await;
        let backend: Arc<dyn KvBackend> = match &remote {
            Some(client) => Arc::new(client.clone()),
            None => {
                let target = leader.load(Ordering::Relaxed);
                let Some(backend) = backend(&cluster, target) else {
                    leader.store(rng.below(3) + 1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                    continue;
                };
                Arc::new(backend)
            }
        };
        let key = format!("k{}", rng.below(KEYS));
        let value = format!("c{id}-{n}");
        // Through the client, three in five calls are compare-and-puts: the writes a
        // double apply or a wrong retried answer shows up in.
        let kinds = if remote.is_some() { 5 } else { 3 };
        let call = match rng.below(kinds) {
            0 => Call::Put(value.clone()),
            1 => Call::Get,
            // Through the client, a read-modify-write: expect what this client last saw
            // (so most succeed, and a retry applied twice would fail its compare).
            _ if remote.is_some() && rng.below(4) > 0 => Call::Cas {
                expect: seen.get(&key).cloned().flatten(),
                new: value.clone(),
            },
            _ => Call::Cas {
                expect: (rng.below(4) > 0)
                    .then(|| format!("c{}-{}", rng.below(CLIENTS), rng.below(n + 1))),
                new: value.clone(),
            },
        };
        let start = nanos(origin);
        let result = match &call {
            Call::Put(v) => backend
                .put(PutRequest::new(key.as_str(), v.as_str()))
                .await
                .map(|_| Outcome::Put),
            Call::Get => backend
                .get(key.as_bytes())
                .await
                .map(|kv| Outcome::Get(kv.map(|kv| String::from_utf8(kv.value).unwrap()))),
            Call::Cas { expect, new } => backend
                .compare_and_put(CompareAndPutRequest {
                    key: key.clone().into_bytes(),
                    expect: expect.clone().map(String::into_bytes),
                    value: new.clone().into_bytes(),
                })
                .await
                .map(|r| Outcome::Cas(r.success)),
        };
        let end = nanos(origin);
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                match e {
                    Error::NotLeader { leader: Some(l) } => leader.store(l, Ordering::Relaxed),
                    _ => leader.store(rng.below(3) + 1, Ordering::Relaxed),
                }
                // A read that failed did nothing; a write that failed may have happened.
                if call == Call::Get {
                    continue;
                }
                Outcome::Unknown
            }
        };
        match (&call, &outcome) {
            (Call::Put(v), Outcome::Put) | (Call::Cas { new: v, .. }, Outcome::Cas(true)) => {
                seen.insert(key.clone(), Some(v.clone()));
            }
            (_, Outcome::Get(v)) => {
                seen.insert(key.clone(), v.clone());
            }
            _ => {}
        }
        history.push(Op {
            key,
            call,
            outcome,
            start,
            end,
        });
    }
    history
}

async fn nemesis(cluster: Shared, seed: u64, origin: Instant, via: Via) {
    let mut rng = Rng(seed);
    let mut killed: Option<u64> = None;
    // Through the client, two more faults: a member's replies are swallowed (its writes
    // commit, their answers are lost), then its connections break and the clients retry.
    let kinds = if via == Via::MetaClient { 9 } else { 6 };
    while origin.elapsed() < RUN {
        let pause = Duration::from_millis(50 + rng.below(100));
        tokio::time::sleep(pause).await;
        let member = rng.below(3) + 1;
        let mut c = cluster.lock().unwrap();
        match rng.below(kinds) {
            6 | 8 => {
                // The leader's, where writes commit: their answers are lost.
                let leading = c
                    .members
                    .iter()
                    .find(|(_, m)| m.node.leadership().borrow().is_some())
                    .map_or(member, |(id, _)| *id);
                c.front(leading).unwrap().swallow_replies();
            }
            7 => {
                for id in 1..=3 {
                    c.front(id).unwrap().cut_and_heal();
                }
            }
            0 => c.router.isolate(member),
            1 => c.router.heal(),
            2 if killed.is_none() => {
                c.kill(member);
                killed = Some(member);
            }
            3 => {
                if let Some(id) = killed.take() {
                    c.start(id);
                }
            }
            4 => c
                .router
                .delay(member, Duration::from_millis(5 + rng.below(30))),
            _ => c.router.cut(member, rng.below(3) + 1),
        }
    }
    let mut c = cluster.lock().unwrap();
    c.router.heal();
    for id in 1..=3 {
        if let Some(front) = c.front(id) {
            front.cut_and_heal();
        }
    }
    if let Some(id) = killed {
        c.start(id);
    }
}

/// Waits until every live member names the same leader (the cluster lock is only held
/// to collect drivers, never across an await).
async fn agreed_leader(cluster: &Shared) -> u64 {
    wait_until(crate::raft_cluster::ELECTION_BOUND, || async {
        let drivers: Vec<_> = {
            let c = cluster.lock().unwrap();
            c.members.values().map(|m| m.node.driver()).collect()
        };
        let mut leaders = Vec::new();
        let mut roles = Vec::new();
        for driver in drivers {
            if let Ok(status) = driver.status().await {
                leaders.push(status.leader_id);
                roles.push((status.id, status.role));
            }
        }
        leaders.dedup();
        match leaders[..] {
            [leader] if roles.contains(&(leader, "leader")) => Ok(leader),
            _ => Err(format!("no agreed leader: {roles:?} {leaders:?}")),
        }
    })
    .await
}

async fn run_seed(seed: u64, via: Via) -> Result<(), String> {
    let cluster = match via {
        Via::Backends => Cluster::with_options(3, (200, 50), TICK),
        Via::MetaClient => Cluster::serving(3, (200, 50), TICK),
    };
    let cluster: Shared = Arc::new(Mutex::new(cluster));
    let first = agreed_leader(&cluster).await;
    let leader = Arc::new(AtomicU64::new(first));
    let origin = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client(
                cluster.clone(),
                seed,
                id,
                leader.clone(),
                origin,
                via,
            ))
        })
        .collect();
    let watcher = match via {
        Via::MetaClient => Some(record_watch(&cluster).await?),
        Via::Backends => None,
    };
    nemesis(cluster.clone(), seed, origin, via).await;
    let mut history = Vec::new();
    for c in clients {
        history.extend(c.await.map_err(|e| e.to_string())?);
    }
    if let Some((live, task)) = watcher {
        check_watch(&cluster, live, task).await?;
    }

    // Healed: read every key through the leader; these reads end the history.
    let final_leader = agreed_leader(&cluster).await;
    let backend = backend(&cluster, final_leader).ok_or("no leader backend")?;
    for k in 0..KEYS {
        let key = format!("k{k}");
        let start = nanos(origin);
        let value = backend
            .get(key.as_bytes())
            .await
            .map_err(|e| format!("final read of {key}: {e}"))?
            .map(|kv| String::from_utf8(kv.value).unwrap());
        history.push(Op {
            key,
            call: Call::Get,
            outcome: Outcome::Get(value),
            start,
            end: nanos(origin),
        });
    }
    let acked = history
        .iter()
        .filter(|op| op.outcome != Outcome::Unknown)
        .count();
    eprintln!(
        "seed {seed} ({via:?}): {} operations, {acked} acknowledged",
        history.len()
    );
    if acked < 10 {
        return Err(format!(
            "only {acked} operations completed: the cluster made no progress"
        ));
    }
    check(&history)
}

/// A watch through `MetaClient` from revision 1 on every key, recording what it gets
/// (as `(revision, key, value or None for a delete, prev value)`) until aborted.
type Seen = Arc<Mutex<Vec<(i64, Vec<u8>, Option<Vec<u8>>, Option<Vec<u8>>)>>>;

fn record(events: Vec<common_meta::kv::Event>, into: &Seen) {
    let mut seen = into.lock().unwrap();
    for e in events {
        let value = (e.kind == common_meta::kv::EventKind::Put).then_some(e.kv.value);
        seen.push((
            e.kv.mod_revision,
            e.kv.key,
            value,
            e.prev_kv.map(|p| p.value),
        ));
    }
}

fn watch_client(cluster: &Shared) -> MetaClient {
    let endpoints = cluster.lock().unwrap().endpoints();
    let options = MetaClientOptions {
        deadline: Duration::from_secs(20),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(200),
        ..MetaClientOptions::default()
    };
    MetaClient::new(&endpoints, options).unwrap()
}

fn watch_from_the_start() -> common_meta::kv::WatchRequest {
    common_meta::kv::WatchRequest {
        prev_kv: true,
        ..common_meta::kv::WatchRequest::prefix("k").from_revision(1)
    }
}

/// Opens the watch and records what it delivers in a task of its own.
async fn record_watch(cluster: &Shared) -> Result<(Seen, tokio::task::JoinHandle<String>), String> {
    let seen: Seen = Arc::default();
    let mut stream = watch_client(cluster)
        .watch(watch_from_the_start())
        .await
        .map_err(|e| format!("opening the watch: {e}"))?;
    let copy = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(response) = stream.next().await {
            match response {
                Ok(common_meta::kv::WatchResponse::Events { events, .. }) => {
                    record(events, &copy);
                }
                Ok(_) => {}
                Err(e) => return format!("the watch failed: {e}"),
            }
        }
        "the watch ended".to_string()
    });
    Ok((seen, task))
}

fn through(seen: &Seen) -> i64 {
    seen.lock().unwrap().last().map_or(0, |e| e.0)
}

/// After healing: the live watch must have delivered exactly what a fresh replay of
/// the history delivers, up to the store's final revision.
async fn check_watch(
    cluster: &Shared,
    live: Seen,
    task: tokio::task::JoinHandle<String>,
) -> Result<(), String> {
    let client = watch_client(cluster);
    let last = client
        .range(common_meta::kv::RangeRequest::prefix("k"))
        .await
        .map_err(|e| format!("reading the final revision: {e}"))?
        .revision;
    let replay: Seen = Arc::default();
    let mut stream = client
        .watch(watch_from_the_start())
        .await
        .map_err(|e| format!("opening the replay: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while through(&replay) < last {
        if Instant::now() > deadline {
            return Err(format!("the replay reached {} of {last}", through(&replay)));
        }
        match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            Ok(Some(Ok(common_meta::kv::WatchResponse::Events { events, .. }))) => {
                record(events, &replay);
            }
            Ok(Some(Err(e))) => return Err(format!("the replay failed: {e}")),
            _ => {}
        }
    }
    // The live watcher reaches it too (it may still be moving between members).
    wait_until(Duration::from_secs(30), || async {
        let reached = through(&live);
        if reached >= last || task.is_finished() {
            Ok(())
        } else {
            Err(format!("the live watch reached {reached} of {last}"))
        }
    })
    .await;
    if through(&live) < last {
        return Err(task.await.unwrap_or_else(|e| e.to_string()));
    }
    task.abort();
    let upto = |seen: &Seen| -> Vec<_> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|e| e.0 <= last)
            .cloned()
            .collect()
    };
    let (live, replay) = (upto(&live), upto(&replay));
    if live != replay {
        let at = live
            .iter()
            .zip(&replay)
            .position(|(a, b)| a != b)
            .unwrap_or(live.len().min(replay.len()));
        return Err(format!(
            "the live watch differs from the history at event {at}: {:?} against {:?} ({} and {} events)",
            live.get(at),
            replay.get(at),
            live.len(),
            replay.len()
        ));
    }
    Ok(())
}

/// Runs `default` seeds (or `METASRV_FAULT_SEEDS`) from `METASRV_FAULT_BASE_SEED`.
async fn run_seeds(via: Via, default: u64) {
    let seeds: u64 = std::env::var("METASRV_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let base: u64 = std::env::var("METASRV_FAULT_BASE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for seed in base..base + seeds {
        if let Err(e) = run_seed(seed, via).await {
            panic!(
                "seed {seed} ({via:?}) failed (rerun with METASRV_FAULT_BASE_SEED={seed} METASRV_FAULT_SEEDS=1): {e}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_keep_histories_linearizable() {
    run_seeds(Via::Backends, 24).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_through_meta_client_keep_histories_linearizable() {
    run_seeds(Via::MetaClient, 12).await;
}
