//! Prometheus metrics, served as text at `GET /metrics` on the HTTP port; every name
//! starts with `metasrv_`, and `docs/metrics.md` lists them all (a test compares).
//!
//! Counters and histograms are kept by the part that counts (the raft threads, the
//! cluster plane, the gRPC layer below) as cheap clonable handles, and registered here
//! once per member, so two members in one process never share a count. Gauges of state
//! (raft indexes, the store, nodes, procedures, the route catalog) are read at scrape
//! time from the same sources `/status` and `metactl` read, so they cannot drift.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds: 100 us to 10 s.
const SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn counter(name: &str, help: &str) -> IntCounter {
    // Names and help are constants of this file: valid by construction.
    IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS.to_vec()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(SECONDS.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| panic!("metric {name}: {e}"))
}

/// What the raft threads count.
#[derive(Clone)]
pub struct RaftMetrics {
    /// Client writes proposed.
    pub proposals: IntCounter,
    /// Client writes refused before or by raft (not leader, back-pressure).
    pub proposal_failures: IntCounter,
    /// Times the known leader changed.
    pub leader_changes: IntCounter,
    /// Log fsyncs (group commit: one per batch of Readies).
    pub fsync_seconds: Histogram,
    /// Batches of committed entries applied to the state machine.
    pub apply_seconds: Histogram,
    /// Snapshots sent to followers, by outcome (`ok`, `failed`).
    pub snapshot_sends: IntCounterVec,
}

impl std::fmt::Debug for RaftMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftMetrics")
            .field("proposals", &self.proposals.get())
            .finish_non_exhaustive()
    }
}

impl Default for RaftMetrics {
    fn default() -> Self {
        RaftMetrics {
            proposals: counter("metasrv_raft_proposals_total", "Client writes proposed"),
            proposal_failures: counter(
                "metasrv_raft_proposal_failures_total",
                "Client writes refused before or by raft (not leader, back-pressure)",
            ),
            leader_changes: counter(
                "metasrv_raft_leader_changes_total",
                "Times the leader this member knows changed",
            ),
            fsync_seconds: histogram("metasrv_raft_fsync_seconds", "Log fsyncs"),
            apply_seconds: histogram(
                "metasrv_raft_apply_seconds",
                "Batches of committed entries applied to the state machine",
            ),
            snapshot_sends: counter_vec(
                "metasrv_raft_snapshot_sends_total",
                "Snapshots sent to followers, by outcome",
                &["outcome"],
            ),
        }
    }
}

/// What the cluster plane counts (leader side).
#[derive(Clone)]
pub struct PlaneMetrics {
    /// Heartbeat requests received.
    pub heartbeats: IntCounter,
    /// Heartbeat streams open.
    pub streams: IntGauge,
    /// Region stats received (a full report counts every region).
    pub region_stats: IntCounter,
    /// Instructions sent to nodes.
    pub mailbox_sends: IntCounter,
    /// Instructions whose reply did not come in time.
    pub mailbox_timeouts: IntCounter,
    /// Leases revoked because their TTL ran out (by the leader).
    pub leases_expired: IntCounter,
}

impl Default for PlaneMetrics {
    fn default() -> Self {
        PlaneMetrics {
            heartbeats: counter("metasrv_heartbeats_total", "Heartbeat requests received"),
            streams: gauge("metasrv_heartbeat_streams", "Heartbeat streams open"),
            region_stats: counter(
                "metasrv_heartbeat_region_stats_total",
                "Region stats received (a full report counts every region)",
            ),
            mailbox_sends: counter("metasrv_mailbox_sends_total", "Instructions sent to nodes"),
            mailbox_timeouts: counter(
                "metasrv_mailbox_timeouts_total",
                "Instructions to nodes whose reply did not come in time",
            ),
            leases_expired: counter(
                "metasrv_leases_expired_total",
                "Leases revoked because their TTL ran out (leader)",
            ),
        }
    }
}

/// One gRPC method's label values; beyond [`MAX_METHODS`] distinct ones, `other`.
const MAX_METHODS: usize = 512;

/// What the gRPC layer counts.
#[derive(Clone)]
pub struct GrpcMetrics {
    requests: IntCounterVec,
    errors: IntCounterVec,
    seconds: HistogramVec,
    /// The (service, method) pairs seen, so a client sending made-up paths cannot grow
    /// the label set without bound.
    seen: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Default for GrpcMetrics {
    fn default() -> Self {
        GrpcMetrics {
            requests: counter_vec(
                "metasrv_grpc_requests_total",
                "gRPC requests by service and method",
                &["service", "method"],
            ),
            errors: counter_vec(
                "metasrv_grpc_errors_total",
                "gRPC requests answered with an error, by service, method and status code",
                &["service", "method", "code"],
            ),
            seconds: histogram_vec(
                "metasrv_grpc_request_seconds",
                "gRPC requests until the answer's headers (a stream: until it opened)",
                &["service", "method"],
            ),
            seen: Arc::default(),
        }
    }
}

impl GrpcMetrics {
    /// The labels of a request path `/package.Service/Method`.
    fn labels(&self, path: &str) -> (String, String) {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (service, method) = match (parts.next(), parts.next()) {
            (Some(s), Some(m)) if !s.is_empty() && !m.is_empty() && !m.contains('/') => {
                (s.to_string(), m.to_string())
            }
            _ => return ("other".to_string(), "other".to_string()),
        };
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let pair = (service, method);
        if seen.contains(&pair) || seen.len() < MAX_METHODS {
            seen.insert(pair.clone());
            return pair;
        }
        ("other".to_string(), "other".to_string())
    }

    fn record(&self, (service, method): &(String, String), code: i32, took: f64) {
        let labels = [service.as_str(), method.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.seconds.with_label_values(&labels).observe(took);
        if code != 0 {
            let name = format!("{:?}", tonic::Code::from_i32(code));
            self.errors
                .with_label_values(&[service.as_str(), method.as_str(), name.as_str()])
                .inc();
        }
    }
}

/// A tower layer over the gRPC server that counts every request by method.
#[derive(Clone)]
pub struct GrpcLayer(pub GrpcMetrics);

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = GrpcCounted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcCounted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The gRPC server's service, counted.
#[derive(Clone)]
pub struct GrpcCounted<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcCounted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let labels = self.metrics.labels(request.uri().path());
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            // An error answered by the handler is a trailers-only response: its code
            // is in the headers. A success's code comes in trailers: 0.
            let code = match &answer {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                Err(_) => tonic::Code::Internal as i32,
            };
            metrics.record(&labels, code, started.elapsed().as_secs_f64());
            answer
        })
    }
}

/// Gauges read at scrape time.
struct Scraped {
    term: IntGauge,
    is_leader: IntGauge,
    commit_index: IntGauge,
    applied_index: IntGauge,
    first_index: IntGauge,
    members: IntGaugeVec,
    revision: IntGauge,
    keys: IntGauge,
    db_size: IntGauge,
    nodes: IntGaugeVec,
    procedures: IntGaugeVec,
    routes: IntGauge,
    route_version: IntGauge,
    watchers: IntGauge,
    leases: IntGauge,
    auth_enabled: IntGauge,
    auth_users: IntGauge,
    auth_revision: IntGauge,
}

/// What one scrape read, handed to [`Metrics::render`].
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Raft term.
    pub term: u64,
    /// Whether this member leads.
    pub is_leader: bool,
    /// Raft indexes: commit, applied, first in the log.
    pub indexes: (u64, u64, u64),
    /// Voters and learners.
    pub members: (usize, usize),
    /// Store revision, keys, bytes on disk.
    pub store: (i64, usize, u64),
    /// Nodes by (role, state, liveness) (the leader's view; empty elsewhere).
    pub nodes: Vec<((String, String, String), i64)>,
    /// Procedures by (type, state) (the leader's; empty elsewhere).
    pub procedures: Vec<((String, String), i64)>,
    /// Routes in the catalog and its version.
    pub routes: (usize, u64),
    /// Watchers open on this member.
    pub watchers: usize,
    /// Auth: on or off, users, auth revision.
    pub auth: (bool, usize, u64),
    /// Leases granted and not yet revoked or expired.
    pub leases: usize,
}

/// One member's registry.
pub struct Metrics {
    registry: Registry,
    /// The raft threads' counters.
    pub raft: RaftMetrics,
    /// The cluster plane's counters.
    pub plane: PlaneMetrics,
    /// The gRPC layer's counters.
    pub grpc: GrpcMetrics,
    scraped: Scraped,
}

impl Metrics {
    /// Registers the counters of `raft` and `plane` (kept by their owners), the gRPC
    /// layer's, and the scrape-time gauges.
    pub fn new(raft: RaftMetrics, plane: PlaneMetrics) -> Metrics {
        let scraped = Scraped {
            term: gauge("metasrv_raft_term", "Raft term"),
            is_leader: gauge("metasrv_raft_is_leader", "1 while this member leads"),
            commit_index: gauge(
                "metasrv_raft_commit_index",
                "Highest log index known committed",
            ),
            applied_index: gauge("metasrv_raft_applied_index", "Highest log index applied"),
            first_index: gauge("metasrv_raft_first_index", "First index still in the log"),
            members: gauge_vec("metasrv_raft_members", "Members by role", &["role"]),
            revision: gauge("metasrv_kv_revision", "The store's revision"),
            keys: gauge("metasrv_kv_keys", "Keys in the store"),
            db_size: gauge("metasrv_kv_db_size_bytes", "The store's size on disk"),
            nodes: gauge_vec(
                "metasrv_nodes",
                "Registered nodes by role, state and liveness (on the leader)",
                &["role", "state", "liveness"],
            ),
            procedures: gauge_vec(
                "metasrv_procedures",
                "Procedures on record by type and state (on the leader)",
                &["type", "state"],
            ),
            routes: gauge("metasrv_routes", "Routes in the range route catalog"),
            route_version: gauge(
                "metasrv_route_catalog_version",
                "The route catalog's version",
            ),
            watchers: gauge("metasrv_watchers", "Watchers open on this member"),
            leases: gauge("metasrv_leases", "Leases granted and not yet revoked"),
            auth_enabled: gauge("metasrv_auth_enabled", "1 while auth is enabled"),
            auth_users: gauge("metasrv_auth_users", "Users defined"),
            auth_revision: gauge(
                "metasrv_auth_revision",
                "The auth revision (moved by every user or role change)",
            ),
        };
        let registry = Registry::new();
        let grpc = GrpcMetrics::default();
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(raft.proposals.clone()),
            Box::new(raft.proposal_failures.clone()),
            Box::new(raft.leader_changes.clone()),
            Box::new(raft.fsync_seconds.clone()),
            Box::new(raft.apply_seconds.clone()),
            Box::new(raft.snapshot_sends.clone()),
            Box::new(plane.heartbeats.clone()),
            Box::new(plane.streams.clone()),
            Box::new(plane.region_stats.clone()),
            Box::new(plane.mailbox_sends.clone()),
            Box::new(plane.mailbox_timeouts.clone()),
            Box::new(plane.leases_expired.clone()),
            Box::new(grpc.requests.clone()),
            Box::new(grpc.errors.clone()),
            Box::new(grpc.seconds.clone()),
            Box::new(scraped.term.clone()),
            Box::new(scraped.is_leader.clone()),
            Box::new(scraped.commit_index.clone()),
            Box::new(scraped.applied_index.clone()),
            Box::new(scraped.first_index.clone()),
            Box::new(scraped.members.clone()),
            Box::new(scraped.revision.clone()),
            Box::new(scraped.keys.clone()),
            Box::new(scraped.db_size.clone()),
            Box::new(scraped.nodes.clone()),
            Box::new(scraped.procedures.clone()),
            Box::new(scraped.routes.clone()),
            Box::new(scraped.route_version.clone()),
            Box::new(scraped.watchers.clone()),
            Box::new(scraped.leases.clone()),
            Box::new(scraped.auth_enabled.clone()),
            Box::new(scraped.auth_users.clone()),
            Box::new(scraped.auth_revision.clone()),
        ];
        for collector in collectors {
            // Each name is registered once, in this fresh registry.
            registry
                .register(collector)
                .unwrap_or_else(|e| panic!("registering a metric: {e}"));
        }
        Metrics {
            registry,
            raft,
            plane,
            grpc,
            scraped,
        }
    }

    /// The Prometheus text of every metric, with the gauges set from `now`.
    pub fn render(&self, now: &Snapshot) -> String {
        let s = &self.scraped;
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        s.term.set(int(now.term));
        s.is_leader.set(i64::from(now.is_leader));
        s.commit_index.set(int(now.indexes.0));
        s.applied_index.set(int(now.indexes.1));
        s.first_index.set(int(now.indexes.2));
        s.members
            .with_label_values(&["voter"])
            .set(now.members.0 as i64);
        s.members
            .with_label_values(&["learner"])
            .set(now.members.1 as i64);
        s.revision.set(now.store.0);
        s.keys.set(now.store.1 as i64);
        s.db_size.set(int(now.store.2));
        // Label sets that are gone must not linger at their last value.
        s.nodes.reset();
        for ((role, state, liveness), count) in &now.nodes {
            s.nodes
                .with_label_values(&[role, state, liveness])
                .set(*count);
        }
        s.procedures.reset();
        for ((kind, state), count) in &now.procedures {
            s.procedures.with_label_values(&[kind, state]).set(*count);
        }
        s.routes.set(now.routes.0 as i64);
        s.route_version.set(int(now.routes.1));
        s.watchers.set(now.watchers as i64);
        s.leases.set(now.leases as i64);
        s.auth_enabled.set(i64::from(now.auth.0));
        s.auth_users.set(now.auth.1 as i64);
        s.auth_revision.set(int(now.auth.2));
        let mut text = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::warn!(error = %e, "metrics could not be encoded");
        }
        text
    }

    /// Every metric name registered (what `docs/metrics.md` must list).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .registry
            .gather()
            .iter()
            .map(|family| family.name().to_string())
            .collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_labels_are_bounded_and_codes_named() {
        let grpc = GrpcMetrics::default();
        assert_eq!(
            grpc.labels("/meta.v1.Store/Put"),
            ("meta.v1.Store".to_string(), "Put".to_string())
        );
        assert_eq!(grpc.labels("/nonsense").0, "other");
        for i in 0..MAX_METHODS + 10 {
            grpc.labels(&format!("/s/m{i}"));
        }
        assert_eq!(grpc.labels("/s/new").0, "other", "the label set is capped");
        assert_eq!(
            grpc.labels("/meta.v1.Store/Put").1,
            "Put",
            "known pairs stay"
        );
        grpc.record(&("s".into(), "m".into()), 3, 0.001);
        let errors = grpc
            .errors
            .with_label_values(&["s", "m", "InvalidArgument"])
            .get();
        assert_eq!(errors, 1);
    }

    #[test]
    fn docs_list_every_metric() {
        let docs = include_str!("../../../docs/metrics.md");
        let listed: Vec<String> = docs
            .lines()
            .filter_map(|line| line.strip_prefix("| `metasrv_"))
            .filter_map(|rest| rest.split('`').next())
            .map(|name| format!("metasrv_{name}"))
            .collect();
        let metrics = Metrics::new(RaftMetrics::default(), PlaneMetrics::default());
        // Vectors appear once a label set has a value.
        metrics.raft.snapshot_sends.with_label_values(&["ok"]).inc();
        metrics.grpc.record(&("s".into(), "m".into()), 2, 0.1);
        metrics.render(&Snapshot {
            nodes: vec![(("r".into(), "s".into(), "l".into()), 1)],
            procedures: vec![(("t".into(), "s".into()), 1)],
            ..Snapshot::default()
        });
        let mut listed_sorted = listed.clone();
        listed_sorted.sort();
        assert_eq!(
            listed_sorted,
            metrics.names(),
            "docs/metrics.md and the registry differ"
        );
    }

    #[test]
    fn a_scrape_sets_gauges_and_forgets_gone_label_sets() {
        let metrics = Metrics::new(RaftMetrics::default(), PlaneMetrics::default());
        metrics.raft.proposals.inc_by(7);
        let first = Snapshot {
            term: 3,
            is_leader: true,
            nodes: vec![(("datanode".into(), "active".into(), "alive".into()), 2)],
            ..Snapshot::default()
        };
        let text = metrics.render(&first);
        assert!(text.contains("metasrv_raft_proposals_total 7"), "{text}");
        assert!(text.contains("metasrv_raft_term 3"), "{text}");
        assert!(text.contains("metasrv_raft_is_leader 1"), "{text}");
        assert!(
            text.contains(r#"metasrv_nodes{liveness="alive",role="datanode",state="active"} 2"#),
            "{text}"
        );
        let text = metrics.render(&Snapshot::default());
        assert!(!text.contains("liveness=\"alive\""), "{text}");
        assert!(metrics.names().iter().all(|n| n.starts_with("metasrv_")));
    }
}
