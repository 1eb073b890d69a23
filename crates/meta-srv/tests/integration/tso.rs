//! The timestamp oracle: strictly increasing timestamps for many concurrent callers
//! across leadership transfers and a stopped leader, a clock stepped back, the logical
//! part running out within one millisecond, and bad counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common_meta::kv::KvBackend;
use meta_client::{MetaClient, MetaClientOptions, TsoClient};
use meta_proto::v1 as pb;
use meta_srv::tso::{Clock, physical_of};
use tokio_stream::wrappers::ReceiverStream;

use crate::in_process::{leader_of, start, start_three, start_with};
use crate::support::{check, wait_until};

/// A clock the test sets.
#[derive(Default)]
struct Manual(AtomicU64);

impl Clock for Manual {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// One answered call: when it started and ended, and the timestamp.
type Call = (Instant, Instant, u64);

/// Fails when a call that started after another ended got a timestamp not above it
/// (or two calls got the same one).
fn check_real_time_order(mut calls: Vec<Call>) -> Result<(), String> {
    let mut seen: Vec<u64> = calls.iter().map(|c| c.2).collect();
    seen.sort_unstable();
    if let Some(pair) = seen.windows(2).find(|p| p[0] == p[1]) {
        return Err(format!("timestamp {} handed out twice", pair[0]));
    }
    let mut by_end = calls.clone();
    by_end.sort_by_key(|c| c.1);
    calls.sort_by_key(|c| c.0);
    let (mut ended, mut highest) = (0, 0u64);
    for call in &calls {
        while ended < by_end.len() && by_end[ended].1 < call.0 {
            highest = highest.max(by_end[ended].2);
            ended += 1;
        }
        if call.2 <= highest {
            return Err(format!(
                "{} was handed out after {highest} had been answered",
                call.2
            ));
        }
    }
    Ok(())
}

#[test]
fn the_order_checker_catches_a_fallback_and_a_duplicate() {
    let t0 = Instant::now();
    let t = |ms: u64| t0 + Duration::from_millis(ms);
    let good = vec![(t(0), t(1), 10), (t(2), t(3), 11), (t(2), t(5), 12)];
    assert!(check_real_time_order(good).is_ok());
    let fallback = vec![(t(0), t(1), 10), (t(2), t(3), 9)];
    assert!(
        check_real_time_order(fallback)
            .unwrap_err()
            .contains("after 10")
    );
    let twice = vec![(t(0), t(1), 10), (t(0), t(1), 10)];
    assert!(check_real_time_order(twice).unwrap_err().contains("twice"));
    // Overlapping calls may answer in either order.
    let overlapping = vec![(t(0), t(4), 12), (t(1), t(3), 11)];
    assert!(check_real_time_order(overlapping).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_increase_for_concurrent_callers_across_transfers_to_late_clocks_and_a_stopped_leader()
 {
    let mut members = start_three(|_| {}).await;
    let addrs: Vec<String> = members.iter().map(|m| m.grpc.clone()).collect();
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answered = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let client = MetaClient::new(&addrs, MetaClientOptions::default()).unwrap();
        let tso = Arc::new(TsoClient::new(&client));
        for _ in 0..8 {
            let (tso, running, answered) = (tso.clone(), running.clone(), answered.clone());
            callers.push(tokio::spawn(async move {
                let mut calls: Vec<Call> = Vec::new();
                let mut failures = 0;
                while running.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    match tso.timestamps(3).await {
                        Ok(ts) => {
                            calls.push((started, Instant::now(), ts));
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => failures += 1,
                    }
                }
                (calls, failures)
            }));
        }
    }
    // Each phase goes on until the callers got 200 more answers.
    let more_answers = || {
        let answered = answered.clone();
        let from = answered.load(Ordering::SeqCst);
        async move {
            wait_until(Duration::from_secs(30), || async {
                let now = answered.load(Ordering::SeqCst);
                check(now >= from + 200, || {
                    format!("{} answers so far", now - from)
                })
            })
            .await
        }
    };
    more_answers().await;
    for _ in 0..2 {
        // start_three numbers members 1, 2, 3 in order.
        let leader = leader_of(&members).await;
        let to = ((leader + 1) % members.len()) as u64 + 1;
        // The next leader's clock is an hour behind: time still goes forward.
        let behind = Arc::new(Manual::default());
        behind.0.store(
            meta_srv::tso::SystemClock.now_ms() - 3_600_000,
            Ordering::SeqCst,
        );
        members[to as usize - 1].tso.set_clock(behind);
        members[leader]
            .driver
            .transfer_leader(to, Duration::from_secs(10))
            .await
            .unwrap();
        more_answers().await;
    }
    let leader = leader_of(&members).await;
    members.remove(leader).shutdown().await;
    more_answers().await;
    running.store(false, Ordering::SeqCst);
    let mut all = Vec::new();
    let mut failures = 0;
    for caller in callers {
        let (calls, failed) = caller.await.unwrap();
        // Each caller's own timestamps strictly increase.
        assert!(calls.windows(2).all(|w| w[0].2 < w[1].2));
        all.extend(calls);
        failures += failed;
    }
    assert!(all.len() > 100, "only {} calls answered", all.len());
    check_real_time_order(all).unwrap();
    assert_eq!(failures, 0, "the client rides over leader changes");
    for m in members {
        m.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_back_never_takes_timestamps_back() {
    let server = start().await;
    let clock = Arc::new(Manual::default());
    clock
        .0
        .store(meta_srv::tso::SystemClock.now_ms(), Ordering::SeqCst);
    server.tso.set_clock(clock.clone());
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let tso = TsoClient::new(&client);
    let before = tso.timestamp().await.unwrap();
    clock.0.fetch_sub(3_600_000, Ordering::SeqCst);
    let after = tso.timestamp().await.unwrap();
    assert!(after > before);
    assert_eq!(
        physical_of(after),
        physical_of(before),
        "time stands until the clock catches up"
    );
    clock.0.fetch_add(3_600_000 + 5, Ordering::SeqCst);
    let later = tso.timestamp().await.unwrap();
    assert!(physical_of(later) > physical_of(before));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logical_part_running_out_moves_on_within_the_persisted_window() {
    let server = start_with(|c| c.tso.save_interval_ms = 100).await;
    let clock = Arc::new(Manual::default());
    let frozen = meta_srv::tso::SystemClock.now_ms();
    clock.0.store(frozen, Ordering::SeqCst);
    server.tso.set_clock(clock);
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    // The first window is persisted once the member leads.
    TsoClient::new(&client).timestamp().await.unwrap();
    // 600 ms of logical parts with the clock frozen: six windows of 100 ms.
    let mut last = 0;
    for _ in 0..(600 * (1 << 18) / 10_000) {
        let ts = server.tso.get(10_000).await.unwrap();
        assert!(ts > last);
        last = ts;
    }
    assert!(
        physical_of(last) >= frozen + 590,
        "physical moved on past six windows"
    );
    let bound: u64 = String::from_utf8(
        client
            .get(common_meta::key::TSO_BOUND_KEY)
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap()
    .parse()
    .unwrap();
    assert!(
        bound > physical_of(last),
        "never at or above the persisted bound"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_counts_are_refused() {
    let server = start().await;
    let client = MetaClient::new(&[&server.grpc], MetaClientOptions::default()).unwrap();
    let tso = TsoClient::new(&client);
    // Once one timestamp came back, the member leads and serves.
    tso.timestamp().await.unwrap();
    let mut stub = pb::tso_client::TsoClient::connect(format!("http://{}", server.grpc))
        .await
        .unwrap();
    for count in [0, 10_001] {
        let (requests, queued) = tokio::sync::mpsc::channel(1);
        let mut answers = stub
            .tso(ReceiverStream::new(queued))
            .await
            .unwrap()
            .into_inner();
        requests.send(pb::TsoRequest { count }).await.unwrap();
        let refused = answers.message().await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{count}");
        assert!(
            refused.message().contains("1 to 10000"),
            "{}",
            refused.message()
        );
    }
    assert!(tso.timestamps(0).await.is_err());
    assert!(tso.timestamps(10_001).await.is_err());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_increase_across_kill_9_of_the_leader_process() {
    let mut cluster = crate::cluster_process::ProcessCluster::start();
    let first = cluster.leader().await;
    let options = MetaClientOptions {
        deadline: Duration::from_secs(20),
        ..MetaClientOptions::default()
    };
    let client = MetaClient::new(&cluster.addrs, options).unwrap();
    let tso = Arc::new(TsoClient::new(&client));
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answered = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..8 {
        let (tso, running, answered) = (tso.clone(), running.clone(), answered.clone());
        callers.push(tokio::spawn(async move {
            let mut calls: Vec<Call> = Vec::new();
            while running.load(Ordering::SeqCst) {
                let started = Instant::now();
                if let Ok(ts) = tso.timestamp().await {
                    calls.push((started, Instant::now(), ts));
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            }
            calls
        }));
    }
    let more_answers = |n: u64| {
        let answered = answered.clone();
        let from = answered.load(Ordering::SeqCst);
        async move {
            wait_until(Duration::from_secs(30), || async {
                let now = answered.load(Ordering::SeqCst);
                check(now >= from + n, || format!("{} answers so far", now - from))
            })
            .await
        }
    };
    more_answers(200).await;
    cluster.procs[first].take().unwrap().kill9();
    cluster.leader().await;
    more_answers(200).await;
    running.store(false, Ordering::SeqCst);
    let mut all = Vec::new();
    for caller in callers {
        all.extend(caller.await.unwrap());
    }
    check_real_time_order(all).unwrap();
}
