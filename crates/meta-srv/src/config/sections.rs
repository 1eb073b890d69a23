//! The sections of the configuration file (`[raft]`, `[limits]`, `[failover]`, ...):
//! each one's options, defaults and the conversions to what the subsystems take.

use common_meta::kv::KvLimits;
use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::cluster_plane::failure_detector::DetectorConfig;

/// `[failure_detector]`: phi-accrual tuning (GreptimeDB's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailureDetectorConfig {
    /// phi at or above which a node is failed (suspect from half of it).
    pub threshold: f64,
    /// Lower bound of the heartbeat interval's standard deviation, in ms.
    pub min_std_dev_ms: u64,
    /// Silence tolerated beyond the mean interval before phi rises, in ms.
    pub acceptable_pause_ms: u64,
    /// The interval assumed before any is observed, in ms.
    pub first_heartbeat_estimate_ms: u64,
}

impl Default for FailureDetectorConfig {
    fn default() -> Self {
        let d = DetectorConfig::default();
        FailureDetectorConfig {
            threshold: d.threshold,
            min_std_dev_ms: d.min_std_dev_ms as u64,
            acceptable_pause_ms: d.acceptable_pause_ms as u64,
            first_heartbeat_estimate_ms: d.first_interval_ms as u64,
        }
    }
}

impl From<FailureDetectorConfig> for DetectorConfig {
    fn from(c: FailureDetectorConfig) -> Self {
        DetectorConfig {
            threshold: c.threshold,
            min_std_dev_ms: c.min_std_dev_ms as f64,
            acceptable_pause_ms: c.acceptable_pause_ms as f64,
            first_interval_ms: c.first_heartbeat_estimate_ms as f64,
            ..DetectorConfig::default()
        }
    }
}

/// How new regions are placed on datanodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectorKind {
    /// In turn over the eligible datanodes (the same table's regions spread evenly).
    #[default]
    RoundRobin,
    /// At random among the eligible datanodes.
    LeaseBased,
    /// The eligible datanodes with the fewest regions (from their heartbeats) first.
    LoadBased,
}

/// `[metadata]`: tables, id sequences and DDL procedures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetadataConfig {
    /// Ids a sequence reserves per raft write (`AllocIds`, table ids).
    pub id_batch: u64,
    /// Where new regions go.
    pub selector: SelectorKind,
    /// How long a datanode may take to answer one region instruction, in ms.
    pub region_timeout_ms: u64,
    /// Attempts at a datanode that does not answer a region instruction before the
    /// DDL fails (and rolls back).
    pub region_attempts: u32,
    /// How long a DDL request waits for its procedure when the client gives no
    /// timeout, in ms.
    pub ddl_timeout_ms: u64,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        MetadataConfig {
            id_batch: 100,
            selector: SelectorKind::RoundRobin,
            region_timeout_ms: 10_000,
            region_attempts: 4,
            ddl_timeout_ms: 30_000,
        }
    }
}

/// `[region]`: region leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegionConfig {
    /// How long a region lease lasts, in seconds, counted from the datanode's own send
    /// time; 0 derives it from the heartbeat interval (3 intervals + 1 s).
    pub lease_secs: u64,
}

/// `[failover]`: the region supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Move the leader regions of failed datanodes automatically.
    pub enabled: bool,
    /// How long a live datanode may leave a region it leads out of its stats before
    /// that region alone is failed, in ms.
    pub region_missing_ms: u64,
    /// Migrations the supervisor (failover, drain, balancer) runs at once.
    pub max_concurrent_migrations: usize,
    /// How long one migration may take before it rolls back, in ms.
    pub migration_timeout_ms: u64,
    /// The wait before a region whose move failed is tried again (doubling up to 8
    /// times that), in ms.
    pub backoff_ms: u64,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            enabled: true,
            region_missing_ms: 30_000,
            max_concurrent_migrations: 32,
            migration_timeout_ms: 60_000,
            backoff_ms: 5_000,
        }
    }
}

/// `[balancer]`: evening out leader regions (turned on and off with `metactl balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalancerConfig {
    /// Leader regions the busiest datanode may have above the idlest before regions
    /// move.
    pub tolerance: usize,
    /// How long a region moved by the balancer stays put, in ms.
    pub cooldown_ms: u64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            tolerance: 2,
            cooldown_ms: 300_000,
        }
    }
}

/// `[compaction]`: automatic compaction of the KV history (etcd's
/// `--auto-compaction-mode` and `--auto-compaction-retention`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    /// `periodic` (keep the history of the last `retention`, a duration), `revision`
    /// (keep the last `retention` revisions) or `off`.
    pub mode: String,
    /// A duration (`1h`, `30m`) for `periodic`, a number of revisions for `revision`.
    pub retention: String,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        CompactionConfig {
            mode: "periodic".to_string(),
            retention: "1h".to_string(),
        }
    }
}

impl CompactionConfig {
    /// What automatic compaction keeps, or `None` when it is off.
    pub fn retention(&self) -> Result<Option<crate::compactor::Retention>, ConfigError> {
        use crate::compactor::Retention;
        let bad = |why: String| ConfigError::Invalid(format!("compaction.retention: {why}"));
        match self.mode.as_str() {
            "off" => Ok(None),
            "periodic" => {
                let period = crate::cli::parse_duration(&self.retention).map_err(bad)?;
                if period.is_zero() {
                    return Err(bad("must be longer than 0".to_string()));
                }
                Ok(Some(Retention::Period(period)))
            }
            "revision" => match self.retention.trim().parse::<i64>() {
                Ok(keep) if keep >= 1 => Ok(Some(Retention::Revisions(keep))),
                _ => Err(bad(format!(
                    "{:?} is not a number of revisions (at least 1)",
                    self.retention
                ))),
            },
            other => Err(ConfigError::Invalid(format!(
                "compaction.mode {other:?} is not one of periodic, revision, off"
            ))),
        }
    }
}

/// `[lease]`: keys that live as long as their lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// How often the leader records every lease's remaining TTL through the log, in ms,
    /// so leader changes cannot keep a lease alive for ever (etcd's checkpoint).
    pub checkpoint_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            checkpoint_ms: 300_000,
        }
    }
}

/// `[etcd]`: etcd's v3 API on the client port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// The version `Maintenance.Status` reports. etcd's clients turn features on and
    /// off by it, so it names the etcd release whose API is served, not Metasrv's own
    /// version (that one is in the log and `/status`).
    pub version: String,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            version: DEFAULT_ETCD_VERSION.to_string(),
        }
    }
}

/// `[routes]`: the range route catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutesConfig {
    /// The group that owns the whole key space in a new cluster's first catalog.
    pub initial_group: u64,
    /// Split hot routes automatically, from the load nodes report in their
    /// heartbeats.
    pub hotspot_split: bool,
    /// The length of one load window, in ms.
    pub hotspot_window_ms: u64,
    /// A route is hot in a window when its load per second (writes x 4 + reads)
    /// reaches this.
    pub hotspot_threshold: u64,
    /// Consecutive hot windows before a route is split.
    pub hotspot_windows: u32,
    /// How long the halves of a hot route that was split are left alone, in ms.
    pub hotspot_cooldown_ms: u64,
    /// Automatic splits stop once the catalog holds this many routes (manual splits
    /// do not).
    pub max_routes: u64,
}

impl Default for RoutesConfig {
    fn default() -> Self {
        RoutesConfig {
            initial_group: 1,
            hotspot_split: true,
            hotspot_window_ms: 10_000,
            hotspot_threshold: 20_000,
            hotspot_windows: 3,
            hotspot_cooldown_ms: 60_000,
            max_routes: 10_000,
        }
    }
}

/// `[tls]`: TLS on the gRPC port (clients and members); off while `cert_file` is
/// empty.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate this member serves and presents to the other members.
    pub cert_file: std::path::PathBuf,
    /// PEM private key of that certificate.
    pub key_file: std::path::PathBuf,
    /// PEM CA the other members' certificates are verified with (default: the client
    /// CA).
    pub ca_file: std::path::PathBuf,
    /// PEM CA clients and members must present a certificate of (mutual TLS); empty:
    /// no client certificate asked.
    pub client_ca_file: std::path::PathBuf,
    /// Keep the HTTP port (admin API, metrics, dashboard) plain text while the gRPC
    /// port uses TLS. By default it serves HTTPS with the same certificate, and asks
    /// for a client certificate of `client_ca_file` when that is set.
    pub plain_http: bool,
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// `[tso]`: the timestamp oracle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TsoConfig {
    /// How far ahead of the clock the leader persists its window of timestamps, in
    /// milliseconds: one raft write per window, and a new leader starts above it.
    pub save_interval_ms: u64,
}

impl Default for TsoConfig {
    fn default() -> Self {
        TsoConfig {
            save_interval_ms: 3_000,
        }
    }
}

/// `[auth]`: users and tokens (auth itself is turned on and off through the API:
/// `metactl auth enable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a token from `Authenticate` is valid, in seconds (1 to 604800). A
    /// client authenticates again when its token stops verifying.
    pub token_ttl_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_ttl_secs: 300,
        }
    }
}

/// The etcd release `Maintenance.Status` reports by default.
pub const DEFAULT_ETCD_VERSION: &str = "3.5.17";

/// `[raft]`: consensus timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Length of one raft tick, in milliseconds.
    pub tick_ms: u64,
    /// Ticks without a leader before a follower campaigns (randomised up to twice that).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats; must be less than `election_ticks`.
    pub heartbeat_ticks: usize,
    /// How long a request may wait for consensus before failing as unavailable, in ms.
    pub request_timeout_ms: u64,
    /// Compact the log once this many applied entries are in it beyond `keep_entries`.
    pub compact_after: u64,
    /// Applied entries kept after a compaction for lagging members to catch up from.
    pub keep_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            request_timeout_ms: 5000,
            compact_after: 10_000,
            keep_entries: 1_000,
        }
    }
}

/// `[limits]`: request limits, see [`KvLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest key in bytes.
    pub max_key_bytes: usize,
    /// Largest value in bytes.
    pub max_value_bytes: usize,
    /// Most ops in each list of a transaction.
    pub max_txn_ops: usize,
    /// Largest request in bytes.
    pub max_request_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = KvLimits::default();
        LimitsConfig {
            max_key_bytes: d.max_key_bytes,
            max_value_bytes: d.max_value_bytes,
            max_txn_ops: d.max_txn_ops,
            max_request_bytes: d.max_request_bytes,
        }
    }
}

impl From<LimitsConfig> for KvLimits {
    fn from(l: LimitsConfig) -> Self {
        KvLimits {
            max_key_bytes: l.max_key_bytes,
            max_value_bytes: l.max_value_bytes,
            max_txn_ops: l.max_txn_ops,
            max_request_bytes: l.max_request_bytes,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[logging]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Filter in `tracing_subscriber::EnvFilter` syntax; `RUST_LOG` overrides it.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}
