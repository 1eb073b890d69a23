//! Server configuration: defaults, a TOML file, `METASRV_*` environment variables and
//! command-line flags, merged in that order (flags win over env over file over defaults).
//!
//! Every option is documented in `config/meta-srv.example.toml`, from which
//! `cargo xtask codegen` generates `docs/config.md`; a test keeps the example and this
//! struct in agreement.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::identity::InitialCluster;
use serde::{Deserialize, Serialize};

mod sections;

pub use sections::*;

/// Why a configuration was refused. Rendered as one line naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct (syntax, unknown key, wrong type).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's one-line message, with line and column.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole server configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This member's id, unique in the cluster, at least 1.
    pub node_id: u64,
    /// Directory holding this member's data; created if missing.
    pub data_dir: PathBuf,
    /// Address of the gRPC service for clients.
    pub listen_addr: SocketAddr,
    /// Address of the HTTP admin API.
    pub http_addr: SocketAddr,
    /// The members of a new cluster, `ID=HOST:PORT,...`; empty for a one-member cluster.
    pub initial_cluster: String,
    /// Mixed into the cluster id, so that two clusters with the same member ids differ.
    pub cluster_token: String,
    /// Members of a running cluster to join, `HOST:PORT,...` (after `metactl member add`).
    pub join: String,
    /// The interval datanodes and frontends are told to heartbeat at, in ms.
    pub heartbeat_interval_ms: u64,
    /// When set (16 bytes or more), nodes need a join token made with it to register;
    /// empty turns join tokens off.
    pub cluster_secret: String,
    /// Failure detection of heartbeating nodes.
    pub failure_detector: FailureDetectorConfig,
    /// Raft timing.
    pub raft: RaftConfig,
    /// Limits on KV requests.
    pub limits: LimitsConfig,
    /// Tables, ids and DDL.
    pub metadata: MetadataConfig,
    /// Region leases.
    pub region: RegionConfig,
    /// Automatic failover of regions off failed datanodes.
    pub failover: FailoverConfig,
    /// Evening out leader regions across datanodes.
    pub balancer: BalancerConfig,
    /// Automatic compaction of the KV history.
    pub compaction: CompactionConfig,
    /// Leases of keys.
    pub lease: LeaseConfig,
    /// etcd's v3 API.
    pub etcd: EtcdConfig,
    /// The timestamp oracle.
    pub tso: TsoConfig,
    /// The range route catalog.
    pub routes: RoutesConfig,
    /// `[tls]`.
    pub tls: TlsConfig,
    /// `[auth]`.
    pub auth: AuthConfig,
    /// Logging.
    pub logging: LoggingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 1,
            data_dir: PathBuf::from("./meta-data"),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 3002)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 4002)),
            initial_cluster: String::new(),
            cluster_token: "metasrv".to_string(),
            join: String::new(),
            heartbeat_interval_ms: 3_000,
            cluster_secret: String::new(),
            failure_detector: FailureDetectorConfig::default(),
            raft: RaftConfig::default(),
            limits: LimitsConfig::default(),
            metadata: MetadataConfig::default(),
            region: RegionConfig::default(),
            failover: FailoverConfig::default(),
            balancer: BalancerConfig::default(),
            compaction: CompactionConfig::default(),
            lease: LeaseConfig::default(),
            etcd: EtcdConfig::default(),
            tso: TsoConfig::default(),
            routes: RoutesConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            logging: LoggingConfig::default(),
        }
    }
}

impl Config {
    /// The region lease length in ms: `[region] lease_secs`, or 3 heartbeat intervals
    /// plus 1 s (a lease survives two lost heartbeats).
    pub fn region_lease_ms(&self) -> u64 {
        match self.region.lease_secs {
            0 => 3 * self.heartbeat_interval_ms + 1_000,
            secs => secs * 1_000,
        }
    }

    /// The longest a deposed raft leader may go on believing it leads (and granting
    /// region leases): it steps down after an election timeout without a quorum
    /// (check-quorum), and the randomised timeout reaches twice the configured one.
    pub fn deposed_leader_ms(&self) -> u64 {
        2 * self.raft.election_ticks as u64 * self.raft.tick_ms
    }

    /// One (configured) election timeout: what a new leader adds to the leases it takes
    /// over.
    pub fn election_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.raft.election_ticks as u64 * self.raft.tick_ms)
    }

    /// The smallest lease TTL: 1.5 election timeouts, in whole seconds rounded up (as
    /// etcd), so a lease outlives the election that may follow its grant.
    pub fn min_lease_ttl_secs(&self) -> i64 {
        let millis = self.raft.election_ticks as u64 * self.raft.tick_ms * 3 / 2;
        i64::try_from(millis.div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1)
    }
}

/// Settings given as flags or environment variables; `None` leaves the file's value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--node-id` / `METASRV_NODE_ID`.
    pub node_id: Option<u64>,
    /// `--data-dir` / `METASRV_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--listen-addr` / `METASRV_LISTEN_ADDR`.
    pub listen_addr: Option<SocketAddr>,
    /// `--http-addr` / `METASRV_HTTP_ADDR`.
    pub http_addr: Option<SocketAddr>,
    /// `--initial-cluster` / `METASRV_INITIAL_CLUSTER`.
    pub initial_cluster: Option<String>,
    /// `--join` / `METASRV_JOIN`.
    pub join: Option<String>,
    /// `--cluster-secret` / `METASRV_CLUSTER_SECRET`.
    pub cluster_secret: Option<String>,
    /// `--log-format` / `METASRV_LOG_FORMAT`: `text` or `json`.
    pub log_format: Option<String>,
    /// `--log-level` / `METASRV_LOG_LEVEL`: a level or per-module filters.
    pub log_level: Option<String>,
    /// `--tls-cert` / `METASRV_TLS_CERT`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key` / `METASRV_TLS_KEY`.
    pub tls_key: Option<PathBuf>,
    /// `--tls-ca` / `METASRV_TLS_CA`.
    pub tls_ca: Option<PathBuf>,
    /// `--tls-client-ca` / `METASRV_TLS_CLIENT_CA`.
    pub tls_client_ca: Option<PathBuf>,
}

impl Config {
    /// The initial cluster; empty means a one-member cluster of this node.
    pub fn cluster(&self) -> Result<InitialCluster, ConfigError> {
        InitialCluster::parse(&self.initial_cluster)
            .map_err(|e| ConfigError::Invalid(format!("initial_cluster: {e}")))
    }

    /// Parses a TOML document; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let message = e.message().trim().replace('\n', " ");
            let location = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                let column = before.len() - line_start + 1;
                let source: String = text[line_start..]
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .chars()
                    .take(80)
                    .collect();
                format!(" (line {line}, column {column}: {source:?})")
            });
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("{message}{}", location.unwrap_or_default()),
            }
        })
    }

    /// Builds the configuration: defaults, then the file if given, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let mut config = match file {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::from_toml(&text, path)?
            }
        };
        let Overrides {
            node_id,
            data_dir,
            listen_addr,
            http_addr,
            initial_cluster,
            join,
            cluster_secret,
            log_format,
            log_level,
            tls_cert,
            tls_key,
            tls_ca,
            tls_client_ca,
        } = overrides;
        let tls = &mut config.tls;
        tls.cert_file = tls_cert.unwrap_or(std::mem::take(&mut tls.cert_file));
        tls.key_file = tls_key.unwrap_or(std::mem::take(&mut tls.key_file));
        tls.ca_file = tls_ca.unwrap_or(std::mem::take(&mut tls.ca_file));
        tls.client_ca_file = tls_client_ca.unwrap_or(std::mem::take(&mut tls.client_ca_file));
        config.node_id = node_id.unwrap_or(config.node_id);
        config.data_dir = data_dir.unwrap_or(config.data_dir);
        config.listen_addr = listen_addr.unwrap_or(config.listen_addr);
        config.http_addr = http_addr.unwrap_or(config.http_addr);
        config.initial_cluster = initial_cluster.unwrap_or(config.initial_cluster);
        config.join = join.unwrap_or(config.join);
        config.cluster_secret = cluster_secret.unwrap_or(config.cluster_secret);
        if let Some(format) = log_format {
            config.logging.format = match format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(ConfigError::Invalid(format!(
                        "log format {other:?} is not one of text, json"
                    )));
                }
            };
        }
        config.logging.level = log_level.unwrap_or(config.logging.level);
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::Invalid("node_id must be at least 1".into()));
        }
        let tls = &self.tls;
        if tls.cert_file.as_os_str().is_empty() != tls.key_file.as_os_str().is_empty() {
            return Err(ConfigError::Invalid(
                "tls.cert_file and tls.key_file go together: set both or neither".into(),
            ));
        }
        let cas = !tls.ca_file.as_os_str().is_empty() || !tls.client_ca_file.as_os_str().is_empty();
        if cas && !tls.enabled() {
            return Err(ConfigError::Invalid(
                "tls.ca_file and tls.client_ca_file need tls.cert_file and tls.key_file".into(),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.logging.level) {
            return Err(ConfigError::Invalid(format!(
                "logging.level {:?} is not a level or a list of module filters: {e}",
                self.logging.level
            )));
        }
        let l = &self.limits;
        for (name, value) in [
            ("limits.max_key_bytes", l.max_key_bytes),
            ("limits.max_value_bytes", l.max_value_bytes),
            ("limits.max_txn_ops", l.max_txn_ops),
            ("limits.max_request_bytes", l.max_request_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if l.max_value_bytes > l.max_request_bytes {
            return Err(ConfigError::Invalid(format!(
                "limits.max_value_bytes ({}) must not exceed limits.max_request_bytes ({})",
                l.max_value_bytes, l.max_request_bytes
            )));
        }
        self.compaction.retention()?;
        let version = self.etcd.version.split('.').collect::<Vec<_>>();
        if version.len() != 3 || version.iter().any(|part| part.parse::<u32>().is_err()) {
            return Err(ConfigError::Invalid(format!(
                "etcd.version {:?} is not MAJOR.MINOR.PATCH (etcd's clients parse it)",
                self.etcd.version
            )));
        }
        if self.routes.initial_group == 0 {
            return Err(ConfigError::Invalid(
                "routes.initial_group must be at least 1".into(),
            ));
        }
        let routes = &self.routes;
        for (name, value, low, high) in [
            (
                "hotspot_window_ms",
                routes.hotspot_window_ms,
                100,
                3_600_000,
            ),
            ("hotspot_threshold", routes.hotspot_threshold, 1, u64::MAX),
            (
                "hotspot_windows",
                u64::from(routes.hotspot_windows),
                1,
                1_000,
            ),
            (
                "hotspot_cooldown_ms",
                routes.hotspot_cooldown_ms,
                0,
                86_400_000,
            ),
            ("max_routes", routes.max_routes, 1, 10_000_000),
        ] {
            if !(low..=high).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "routes.{name} ({value}) must be between {low} and {high}"
                )));
            }
        }
        if !(1..=604_800).contains(&self.auth.token_ttl_secs) {
            return Err(ConfigError::Invalid(format!(
                "auth.token_ttl_secs ({}) must be between 1 and 604800",
                self.auth.token_ttl_secs
            )));
        }
        if !(100..=600_000).contains(&self.tso.save_interval_ms) {
            return Err(ConfigError::Invalid(format!(
                "tso.save_interval_ms ({}) must be between 100 and 600000",
                self.tso.save_interval_ms
            )));
        }
        let cluster = self.cluster()?;
        if !cluster.is_empty() && !self.join.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "initial_cluster starts a new cluster and join enters a running one: give only one"
                    .into(),
            ));
        }
        if !cluster.is_empty() && !cluster.members().contains_key(&self.node_id) {
            return Err(ConfigError::Invalid(format!(
                "node_id {} is not in initial_cluster {:?}",
                self.node_id, self.initial_cluster
            )));
        }
        if !self.cluster_secret.is_empty()
            && self.cluster_secret.len() < common_meta::model::join_token::MIN_SECRET_BYTES
        {
            return Err(ConfigError::Invalid(format!(
                "cluster_secret must have at least {} bytes (or be empty to turn join tokens off)",
                common_meta::model::join_token::MIN_SECRET_BYTES
            )));
        }
        let m = &self.metadata;
        for (name, value) in [
            ("metadata.id_batch", m.id_batch),
            ("metadata.region_timeout_ms", m.region_timeout_ms),
            ("metadata.region_attempts", u64::from(m.region_attempts)),
            ("metadata.ddl_timeout_ms", m.ddl_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        let f = &self.failover;
        for (name, value) in [
            ("failover.region_missing_ms", f.region_missing_ms),
            (
                "failover.max_concurrent_migrations",
                f.max_concurrent_migrations as u64,
            ),
            ("failover.migration_timeout_ms", f.migration_timeout_ms),
            ("failover.backoff_ms", f.backoff_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.region.lease_secs != 0
            && self.region.lease_secs * 1_000 <= self.heartbeat_interval_ms
        {
            return Err(ConfigError::Invalid(format!(
                "region.lease_secs ({} s) must be longer than heartbeat_interval_ms ({} ms), or 0 to derive it",
                self.region.lease_secs, self.heartbeat_interval_ms
            )));
        }
        let fd = &self.failure_detector;
        if !(fd.threshold.is_finite() && fd.threshold > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "failure_detector.threshold must be a number above 0, not {}",
                fd.threshold
            )));
        }
        if fd.min_std_dev_ms == 0 || fd.first_heartbeat_estimate_ms == 0 {
            return Err(ConfigError::Invalid(
                "failure_detector.min_std_dev_ms and first_heartbeat_estimate_ms must be at least 1"
                    .into(),
            ));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "heartbeat_interval_ms must be at least 1".into(),
            ));
        }
        let r = &self.raft;
        if self.lease.checkpoint_ms == 0 {
            return Err(ConfigError::Invalid(
                "lease.checkpoint_ms must be at least 1".into(),
            ));
        }
        if r.tick_ms == 0 || r.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "raft.tick_ms and raft.request_timeout_ms must be at least 1".into(),
            ));
        }
        if r.heartbeat_ticks == 0 || r.heartbeat_ticks >= r.election_ticks {
            return Err(ConfigError::Invalid(format!(
                "raft.heartbeat_ticks ({}) must be at least 1 and less than raft.election_ticks ({})",
                r.heartbeat_ticks, r.election_ticks
            )));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("data_dir must not be empty".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case: a TOML document and a fragment the error must contain (None: it parses).
    #[test]
    fn parsing_cases() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", None),
            ("node_id = 3\n[limits]\nmax_txn_ops = 64\n", None),
            ("node_id = 3\nbogus = 1\n", Some("unknown field `bogus`")),
            ("node_id = 3\nbogus = 1\n", Some("line 2, column 1")),
            ("node_id = \"three\"\n", Some("invalid type")),
            ("[limits]\nmax_keys = 1\n", Some("unknown field `max_keys`")),
            (
                "listen_addr = \"nowhere\"\n",
                Some("invalid socket address"),
            ),
            ("node_id = \n", Some("line 1")),
            (
                "[logging]\nformat = \"xml\"\n",
                Some("unknown variant `xml`"),
            ),
        ];
        for (text, want) in cases {
            let got = Config::from_toml(text, Path::new("t.toml"));
            match (want, got) {
                (None, Ok(_)) => {}
                (Some(want), Err(e)) => {
                    let line = e.to_string();
                    assert!(line.contains(want), "{text:?}: {line:?} lacks {want:?}");
                    assert!(
                        !line.contains('\n'),
                        "{text:?}: error is one line: {line:?}"
                    );
                    assert!(line.contains("t.toml"), "{text:?}: names the file");
                }
                (want, got) => panic!("{text:?}: expected {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn overrides_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.toml");
        std::fs::write(&path, "node_id = 5\ndata_dir = \"/from/file\"\n").unwrap();
        let config = Config::load(
            Some(&path),
            Overrides {
                data_dir: Some("/from/flag".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(config.node_id, 5);
        assert_eq!(config.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(config.listen_addr, Config::default().listen_addr);

        let logging = Config::load(
            None,
            Overrides {
                log_format: Some("json".into()),
                log_level: Some("info,meta_srv::raft=debug".into()),
                ..Default::default()
            },
        )
        .unwrap()
        .logging;
        assert_eq!(logging.format, LogFormat::Json);
        assert_eq!(logging.level, "info,meta_srv::raft=debug");
        for (overrides, want) in [
            (
                Overrides {
                    log_format: Some("xml".into()),
                    ..Default::default()
                },
                "log format \"xml\" is not one of text, json",
            ),
            (
                Overrides {
                    log_level: Some("info,[=".into()),
                    ..Default::default()
                },
                "is not a level or a list of module filters",
            ),
        ] {
            let err = Config::load(None, overrides).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn invalid_values_are_refused() {
        let cases = [
            ("node_id = 0", "node_id must be at least 1"),
            (
                "initial_cluster = \"2=a:1\"",
                "node_id 1 is not in initial_cluster",
            ),
            (
                "initial_cluster = \"1=a\"",
                "initial_cluster: member \"1=a\"",
            ),
            (
                "[raft]\nheartbeat_ticks = 10",
                "must be at least 1 and less than",
            ),
            (
                "[limits]\nmax_txn_ops = 0",
                "limits.max_txn_ops must be at least 1",
            ),
            (
                "[compaction]\nmode = \"daily\"",
                "compaction.mode \"daily\" is not one of periodic, revision, off",
            ),
            (
                "[compaction]\nmode = \"revision\"\nretention = \"1h\"",
                "compaction.retention: \"1h\" is not a number of revisions",
            ),
            (
                "[compaction]\nretention = \"0s\"",
                "compaction.retention: \"0s\" is out of range",
            ),
            (
                "[limits]\nmax_value_bytes = 10\nmax_request_bytes = 5",
                "must not exceed limits.max_request_bytes",
            ),
            (
                "[tls]\ncert_file = \"a.crt\"",
                "tls.cert_file and tls.key_file go together",
            ),
            (
                "[tls]\nclient_ca_file = \"ca.crt\"",
                "tls.ca_file and tls.client_ca_file need tls.cert_file and tls.key_file",
            ),
            (
                "[routes]\nhotspot_windows = 0",
                "routes.hotspot_windows (0) must be between 1 and 1000",
            ),
            (
                "[routes]\nhotspot_window_ms = 5",
                "routes.hotspot_window_ms (5) must be between 100 and 3600000",
            ),
            (
                "[auth]\ntoken_ttl_secs = 0",
                "auth.token_ttl_secs (0) must be between 1 and 604800",
            ),
            (
                "[tso]\nsave_interval_ms = 10",
                "tso.save_interval_ms (10) must be between 100 and 600000",
            ),
            (
                "cluster_secret = \"short\"",
                "cluster_secret must have at least 16 bytes",
            ),
            (
                "[failure_detector]\nthreshold = 0.0",
                "failure_detector.threshold must be a number above 0",
            ),
            (
                "[failure_detector]\nthreshold = nan",
                "failure_detector.threshold must be a number above 0",
            ),
            (
                "[failure_detector]\nmin_std_dev_ms = 0",
                "min_std_dev_ms and first_heartbeat_estimate_ms must be at least 1",
            ),
        ];
        for (text, want) in cases {
            let err = Config::from_toml(text, Path::new("t.toml"))
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(err.to_string().contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let err =
            Config::load(Some(Path::new("/no/such/meta.toml")), Overrides::default()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read config file /no/such/meta.toml"),
            "{err}"
        );
    }

    #[test]
    fn example_config_lists_every_option_at_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/meta-srv.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(Config::from_toml(&text, &path).unwrap(), Config::default());
        // Same keys as well as same values: no option is left out of the example.
        let example: toml::Table = toml::from_str(&text).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        assert_eq!(example, defaults);
    }
}
