//! Settings for every binary, loaded with figment.
//!
//! Precedence, lowest first: built-in defaults < TOML file given with `--config` < environment
//! variables prefixed `EDGELOG_` (nested keys separated by `__`, e.g. `EDGELOG_LOADER__SLOT_SPACING=65s`)
//! < command-line overrides. Unknown keys and invalid values are errors that name the key.
//!
//! librdkafka options pass through `kafka.options` (all clients) and the per-stage
//! `*.kafka_options` maps. Because environment variable names cannot hold dots, an option key may be
//! written with `_` instead of `.` (`EDGELOG_KAFKA__OPTIONS__SECURITY_PROTOCOL=SASL_SSL`); keys are
//! normalised to dots. No librdkafka property that takes a string has an underscore in its name.
//!
//! Secrets can be read from files, the way Docker and Kubernetes mount them:
//! `clickhouse.password_file`, `clickhouse.admin_password_file`, and for librdkafka options the
//! `kafka.secret_files` map (option name -> file, e.g. `"sasl.password" = "/run/secrets/kafka"`),
//! a map of its own so that no file key can collide with a real librdkafka property (librdkafka
//! has `*.location` keys holding paths). A value and its file both set is an error; one trailing
//! newline is stripped from a file; [`Settings::validated`] reads the files. Every secret prints
//! as `***` (see [`is_secret_key`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::body::BodyCompression;
use crate::url_query::UrlQuery;

/// Environment variable prefix for every setting.
pub const ENV_PREFIX: &str = "EDGELOG_";

/// Why settings could not be loaded. The message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(String),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

impl From<figment::Error> for ConfigError {
    fn from(errors: figment::Error) -> Self {
        // One message per problem, each naming the dotted key and where the value came from (the
        // exact environment variable, or the file).
        let msgs: Vec<String> = errors.into_iter().map(|e| describe_error(&e)).collect();
        ConfigError::Load(msgs.join("; "))
    }
}

fn describe_error(e: &figment::Error) -> String {
    let key = e.path.join(".").to_lowercase();
    let origin = match &e.metadata {
        Some(m) if m.name.contains("environment") => {
            format!(
                " (from environment variable {ENV_PREFIX}{})",
                e.path.join("__").to_uppercase()
            )
        }
        Some(m) => match &m.source {
            Some(source) => format!(" (from {source})"),
            None => format!(" (from {})", m.name),
        },
        None => String::new(),
    };
    if key.is_empty() {
        format!("{}{origin}", e.kind)
    } else {
        format!("`{key}`: {}{origin}", e.kind)
    }
}

/// Accepts any scalar as a string. The environment provider parses `7` as a number, yet an
/// instance id, a topic name or a password may well look like one.
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_u64<E>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u128<E>(self, v: u128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i128<E>(self, v: i128) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_char<E>(self, v: char) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

fn lenient_string_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    struct S(#[serde(deserialize_with = "lenient_string")] String);
    let map = BTreeMap::<String, S>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, S(v))| (k, v)).collect())
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        problem: problem.into(),
    }
}

/// A secret string (passwords). Never printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(#[serde(deserialize_with = "lenient_string")] String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is handed to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// librdkafka properties passed through as they are. `Debug` hides the values of secret keys.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct KafkaOptions(
    #[serde(deserialize_with = "lenient_string_map")] pub BTreeMap<String, String>,
);

impl KafkaOptions {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Keys with `_` written as `.` (environment variable names cannot hold dots).
    fn normalised(&self) -> KafkaOptions {
        KafkaOptions(
            self.0
                .iter()
                .map(|(k, v)| (k.replace('_', "."), v.clone()))
                .collect(),
        )
    }

    /// A copy whose secret values read `***`.
    pub fn redacted(&self) -> KafkaOptions {
        KafkaOptions(
            self.0
                .iter()
                .map(|(k, v)| {
                    let v = if is_secret_key(k) {
                        "***".to_string()
                    } else {
                        v.clone()
                    };
                    (k.clone(), v)
                })
                .collect(),
        )
    }
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted().0).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `human` (default) or `json`.
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive, e.g. `info` or `edgelog=debug,rdkafka=warn`.
    #[serde(deserialize_with = "lenient_string")]
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    #[serde(deserialize_with = "lenient_string")]
    pub brokers: String,
    /// librdkafka options applied to every client (secrets such as `sasl.password` included;
    /// values of keys that look secret are never logged).
    pub options: KafkaOptions,
    /// Secret librdkafka options read from files: option name (`_` for `.` as in `options`) ->
    /// path. Each becomes an entry of `options` for every client; the option must not also be set
    /// in `options` or a stage's `kafka_options`, and must be one [`is_secret_key`] hides.
    pub secret_files: BTreeMap<String, PathBuf>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            options: KafkaOptions::default(),
            secret_files: BTreeMap::new(),
        }
    }
}

impl KafkaSettings {
    /// What types alone cannot check; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicSettings {
    /// Cap'n Proto input written by the edge servers.
    #[serde(deserialize_with = "lenient_string")]
    pub input: String,
    /// MessagePack output of the anonymizer, input of the loader.
    #[serde(deserialize_with = "lenient_string")]
    pub anonymized: String,
    /// Input that stage one rejects, with the original bytes (or a bounded envelope) and headers
    /// naming where it came from and why (`shared/dead_letter.rs`).
    #[serde(deserialize_with = "lenient_string")]
    pub dead_letter: String,
    /// Anonymized records the loader quarantines (undecodable, or rejected by ClickHouse on their
    /// own), with the same headers.
    #[serde(deserialize_with = "lenient_string")]
    pub loader_dead_letter: String,
    /// Partitions used by `edgelog setup` when it creates the topics (1 to [`MAX_PARTITIONS`]).
    pub partitions: i32,
    /// Replicas of each created topic; `edgelog setup` refuses more than the cluster has brokers.
    pub replication_factor: i32,
    /// `min.insync.replicas` set on created topics: how many replicas must have a write before
    /// it is acknowledged. Unset: [`TopicSettings::effective_min_insync_replicas`] derives it.
    pub min_insync_replicas: Option<i32>,
    /// `retention.ms` set on created topics (at least 1 minute). Must exceed the longest outage
    /// you want to survive.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for TopicSettings {
    fn default() -> Self {
        TopicSettings {
            input: "http_log".into(),
            anonymized: "http_log_anon".into(),
            dead_letter: "http_log_dlq".into(),
            loader_dead_letter: "http_log_anon_dlq".into(),
            partitions: 4,
            replication_factor: 1,
            min_insync_replicas: None,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl TopicSettings {
    /// `min.insync.replicas` for created topics: the configured value, or else one replica fewer
    /// than the replication factor, but at most a majority and at least 1 (RF 1 → 1, 2 → 1,
    /// 3 → 2, 5 → 3). So one broker may be down without stopping writes, and with 3 or more
    /// replicas an acknowledged write is on a majority of them (two, for the usual 3).
    pub fn effective_min_insync_replicas(&self) -> i32 {
        self.min_insync_replicas.unwrap_or_else(|| {
            let rf = self.replication_factor;
            (rf - 1).min(rf / 2 + 1).max(1)
        })
    }

    /// What types alone cannot check; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = self;
        for (key, topic) in [
            ("topics.input", &t.input),
            ("topics.anonymized", &t.anonymized),
            ("topics.dead_letter", &t.dead_letter),
            ("topics.loader_dead_letter", &t.loader_dead_letter),
        ] {
            check_topic_name(key, topic)?;
        }
        // The anonymizer would read its own output (or dead letters) back as input, forever.
        if t.anonymized == t.input {
            return Err(invalid(
                "topics.anonymized",
                "must differ from topics.input",
            ));
        }
        if t.dead_letter == t.input || t.dead_letter == t.anonymized {
            return Err(invalid(
                "topics.dead_letter",
                "must differ from topics.input and topics.anonymized",
            ));
        }
        if [&t.input, &t.anonymized, &t.dead_letter].contains(&&t.loader_dead_letter) {
            return Err(invalid(
                "topics.loader_dead_letter",
                "must differ from topics.input, topics.anonymized and topics.dead_letter",
            ));
        }
        // A batch's ranges (every partition it spans) go into each partition's commit metadata,
        // which Kafka caps at 4096 bytes by default; 100 partitions fit (see the batch module's tests).
        check_range("topics.partitions", t.partitions, 1, MAX_PARTITIONS)?;
        // CreateTopics carries the replication factor as a 16-bit integer.
        check_range(
            "topics.replication_factor",
            t.replication_factor,
            1,
            i32::from(i16::MAX),
        )?;
        // More than the replicas would make every write fail (NOT_ENOUGH_REPLICAS).
        if let Some(min_isr) = t.min_insync_replicas {
            check_range(
                "topics.min_insync_replicas",
                min_isr,
                1,
                t.replication_factor,
            )?;
        }
        // retention.ms = 0 deletes records before anyone reads them; Kafka takes a signed 64-bit
        // number of milliseconds.
        check_duration(
            "topics.retention",
            t.retention,
            Duration::from_secs(60),
            Duration::from_millis(i64::MAX as u64),
        )?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseSettings {
    /// Where the loader sends inserts: the rate-limited proxy.
    #[serde(deserialize_with = "lenient_string")]
    pub url: String,
    /// Direct ClickHouse HTTP endpoint for set-up, `status` and audits (never the loader's path).
    #[serde(deserialize_with = "lenient_string")]
    pub admin_url: String,
    #[serde(deserialize_with = "lenient_string")]
    pub user: String,
    pub password: Secret,
    /// Read `password` from this file instead (one trailing newline stripped).
    pub password_file: Option<PathBuf>,
    #[serde(deserialize_with = "lenient_string")]
    pub admin_user: String,
    pub admin_password: Secret,
    /// Read `admin_password` from this file instead (one trailing newline stripped).
    pub admin_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) trusted for `https` URLs instead of the system roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) presented to a server that asks for one; needs
    /// `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
    #[serde(deserialize_with = "lenient_string")]
    pub database: String,
    /// TTL of raw rows in `http_log`, in days (0 = keep forever, at most [`MAX_TTL_DAYS`]).
    pub raw_ttl_days: u32,
    /// TTL of the totals table, in days (0 = keep forever, at most [`MAX_TTL_DAYS`]).
    pub totals_ttl_days: u32,
    /// Cluster mode: the `<remote_servers>` cluster the tables are sharded over (each table a
    /// shard-local `<table>_local` and a `Distributed` table under the table's own name; see
    /// [`crate::cluster_schema`]). Unset: one server.
    pub cluster: Option<String>,
    /// Cluster mode on servers without Keeper (the local stack): each shard's direct HTTP
    /// endpoint; `edgelog setup` applies the per-shard schema to every one of them. Empty:
    /// `setup` applies the `ON CLUSTER` schema once, through `admin_url`.
    pub shard_admin_urls: Vec<String>,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        ClickHouseSettings {
            url: "http://127.0.0.1:8124".into(),
            admin_url: "http://127.0.0.1:8123".into(),
            user: "edgelog_loader".into(),
            password: Secret::default(),
            password_file: None,
            admin_user: "default".into(),
            admin_password: Secret::default(),
            admin_password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            database: "edgelog".into(),
            raw_ttl_days: 30,
            totals_ttl_days: 400,
            cluster: None,
            shard_admin_urls: Vec::new(),
        }
    }
}

impl ClickHouseSettings {
    /// What types alone cannot check; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ch = self;
        check_identifier("clickhouse.database", &ch.database)?;
        // Credentials travel as HTTP header values: a character a header cannot hold fails every
        // request, which the loader would retry forever as a transient error.
        check_header_value("clickhouse.user", &ch.user, false)?;
        check_header_value("clickhouse.admin_user", &ch.admin_user, false)?;
        // A password read from a file is named by its file key: that is where to look.
        for (key, file_key, password, file) in [
            (
                "clickhouse.password",
                "clickhouse.password_file",
                &ch.password,
                &ch.password_file,
            ),
            (
                "clickhouse.admin_password",
                "clickhouse.admin_password_file",
                &ch.admin_password,
                &ch.admin_password_file,
            ),
        ] {
            let named = if file.is_some() { file_key } else { key };
            check_header_value(named, password.expose(), true)?;
        }
        if ch.client_cert_file.is_some() != ch.client_key_file.is_some() {
            return Err(invalid(
                if ch.client_cert_file.is_some() {
                    "clickhouse.client_key_file"
                } else {
                    "clickhouse.client_cert_file"
                },
                "must be set together with clickhouse.client_cert_file and \
                 clickhouse.client_key_file (a client certificate needs its key)",
            ));
        }
        // TTLs are written into the table DDL; DateTime ends in 2106, and a TTL reaching past it
        // would overflow.
        check_range("clickhouse.raw_ttl_days", ch.raw_ttl_days, 0, MAX_TTL_DAYS)?;
        check_range(
            "clickhouse.totals_ttl_days",
            ch.totals_ttl_days,
            0,
            MAX_TTL_DAYS,
        )?;
        for (key, url) in [
            ("clickhouse.url", &ch.url),
            ("clickhouse.admin_url", &ch.admin_url),
        ] {
            check_http_url(key, url)?;
        }
        for url in &ch.shard_admin_urls {
            check_http_url("clickhouse.shard_admin_urls", url)?;
        }
        match &ch.cluster {
            // Written into DDL (ON CLUSTER, Distributed) like the database name.
            Some(name) => check_identifier("clickhouse.cluster", name)?,
            None if !ch.shard_admin_urls.is_empty() => {
                return Err(invalid(
                    "clickhouse.shard_admin_urls",
                    "needs clickhouse.cluster (the cluster the shards form)",
                ))
            }
            None => {}
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerSettings {
    pub metrics_listen: Option<SocketAddr>,
    /// Records per second; 0 means as fast as possible.
    pub rate: f64,
    /// Stop after this many records (none = unbounded).
    pub count: Option<u64>,
    /// Stop after this long (none = unbounded).
    #[serde(with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// Seed of the traffic model: the same seed gives the same records (timestamps aside).
    pub seed: u64,
    /// Number of distinct resource ids, Zipf-distributed.
    pub resources: u64,
    pub resource_zipf_exponent: f64,
    /// Distinct URLs per resource, Zipf-distributed.
    pub urls_per_resource: u64,
    /// Number of distinct clients, Zipf-distributed.
    pub clients: u64,
    pub client_zipf_exponent: f64,
    /// Share of clients with IPv6 addresses.
    pub ipv6_share: f64,
    /// Share of records whose remote address is malformed (not an IP address).
    pub malformed_ip_share: f64,
    /// Share of messages that are not Cap'n Proto at all (exercise the dead-letter path).
    pub garbage_share: f64,
    /// Share of records that stage one dead-letters under its default validity policy (times
    /// out of range, oversized fields, text that is not UTF-8, truncated frames).
    pub hostile_share: f64,
    /// Extra librdkafka options for this producer.
    pub kafka_options: KafkaOptions,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9101))),
            rate: 200.0,
            count: None,
            duration: None,
            seed: 1,
            resources: 10_000,
            resource_zipf_exponent: 1.1,
            urls_per_resource: 200,
            clients: 100_000,
            client_zipf_exponent: 1.05,
            ipv6_share: 0.05,
            malformed_ip_share: 0.001,
            garbage_share: 0.0,
            hostile_share: 0.0,
            kafka_options: KafkaOptions::default(),
        }
    }
}

impl ProducerSettings {
    /// What types alone cannot check; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self;
        if !(p.rate.is_finite() && p.rate >= 0.0) {
            return Err(invalid(
                "producer.rate",
                "must be a number >= 0 (0 = as fast as possible)",
            ));
        }
        for (key, share) in [
            ("producer.ipv6_share", p.ipv6_share),
            ("producer.malformed_ip_share", p.malformed_ip_share),
            ("producer.garbage_share", p.garbage_share),
            ("producer.hostile_share", p.hostile_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(invalid(
                    key,
                    format!("must be between 0 and 1, got {share}"),
                ));
            }
        }
        for (key, n) in [
            ("producer.resources", p.resources),
            ("producer.urls_per_resource", p.urls_per_resource),
            ("producer.clients", p.clients),
        ] {
            if n == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        for (key, s) in [
            ("producer.resource_zipf_exponent", p.resource_zipf_exponent),
            ("producer.client_zipf_exponent", p.client_zipf_exponent),
        ] {
            if !(s.is_finite() && s > 0.0) {
                return Err(invalid(key, format!("must be > 0, got {s}")));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnonymizerSettings {
    pub metrics_listen: Option<SocketAddr>,
    #[serde(deserialize_with = "lenient_string")]
    pub group_id: String,
    /// Stable name of this instance; `transactional.id` is `<group_id>-<instance_id>`, so a
    /// restarted instance fences its own zombie. Give every concurrent instance its own id.
    #[serde(deserialize_with = "lenient_string")]
    pub instance_id: String,
    /// Close the transaction after this many input records...
    pub txn_max_records: usize,
    /// ...or after this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub txn_max_duration: Duration,
    /// `transaction.timeout.ms`: the broker aborts a transaction open longer than this.
    #[serde(with = "humantime_serde")]
    pub txn_timeout: Duration,
    /// IPv6 addresses keep this many leading bits (the network, at most 64); the rest becomes `X`.
    pub ipv6_prefix_bits: u8,
    /// Records stamped later than now + this are dead-lettered (`timestamp_in_future`): edge
    /// clocks drift, a record from next year is a broken clock.
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    /// Records older than `clickhouse.raw_ttl_days` minus this are dead-lettered
    /// (`older_than_retention`) instead of being dropped by ClickHouse's TTL at insert: the margin
    /// is how late the loader may insert a record and still land it.
    #[serde(with = "humantime_serde")]
    pub retention_margin: Duration,
    /// Longest `url` stored, in bytes, after `url_query`; longer records are dead-lettered
    /// (`field_too_long`).
    pub max_url_bytes: usize,
    /// What stage one keeps of each URL's query string and fragment: `"keep"` (default, the URL
    /// as logged), `"drop_values"`, or `{ allow = ["page", "lang"] }` (only these parameters,
    /// whole). From the environment: `EDGELOG_ANONYMIZER__URL_QUERY=drop_values`,
    /// `EDGELOG_ANONYMIZER__URL_QUERY__ALLOW=page,lang`. See [`crate::url_query`].
    pub url_query: UrlQuery,
    pub kafka_options: KafkaOptions,
}

impl Default for AnonymizerSettings {
    fn default() -> Self {
        AnonymizerSettings {
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9102))),
            group_id: "edgelog-anonymizer".into(),
            instance_id: "0".into(),
            // Measured (docs/BENCHMARKS.md): 50k-record transactions reach 87-102% of a plain
            // passthrough, 10k 71-90%, 1k 25%. A 1 s bound is invisible behind the 64 s slots.
            txn_max_records: 50_000,
            txn_max_duration: Duration::from_secs(1),
            txn_timeout: Duration::from_secs(60),
            ipv6_prefix_bits: 48,
            max_future_skew: Duration::from_secs(3600),
            // A day: far beyond the loader's normal delay (seconds to a minute), and an outage
            // longer than that is visible on the lag metrics long before.
            retention_margin: Duration::from_secs(86_400),
            // nginx's default `large_client_header_buffers` (8 KiB) bounds the request line an
            // edge accepts, so a longer URL is not one an edge served.
            max_url_bytes: 8192,
            // Today's behaviour: what to redact depends on the sites behind the CDN.
            url_query: UrlQuery::Keep,
            kafka_options: KafkaOptions::default(),
        }
    }
}

impl AnonymizerSettings {
    /// What types alone cannot check; each error names its key. `raw_ttl_days`
    /// (`clickhouse.raw_ttl_days`) bounds the retention margin.
    pub fn validate(&self, raw_ttl_days: u32) -> Result<(), ConfigError> {
        let a = self;
        if a.group_id.is_empty() {
            return Err(invalid("anonymizer.group_id", "must not be empty"));
        }
        if a.instance_id.is_empty() {
            return Err(invalid("anonymizer.instance_id", "must not be empty"));
        }
        if a.txn_max_records == 0 {
            return Err(invalid("anonymizer.txn_max_records", "must be at least 1"));
        }
        // librdkafka's transaction.timeout.ms (and message.timeout.ms, set to the same) is a
        // 32-bit number of milliseconds, at least 1000.
        check_duration(
            "anonymizer.txn_timeout",
            a.txn_timeout,
            Duration::from_secs(1),
            Duration::from_millis(i32::MAX as u64),
        )?;
        if a.txn_max_duration.is_zero() {
            return Err(invalid(
                "anonymizer.txn_max_duration",
                "must be greater than 0",
            ));
        }
        if a.txn_max_duration >= a.txn_timeout {
            return Err(invalid(
                "anonymizer.txn_max_duration",
                "must be shorter than anonymizer.txn_timeout",
            ));
        }
        if a.ipv6_prefix_bits > 128 {
            return Err(invalid(
                "anonymizer.ipv6_prefix_bits",
                "must be between 0 and 128",
            ));
        }
        check_duration(
            "anonymizer.max_future_skew",
            a.max_future_skew,
            Duration::ZERO,
            Duration::from_secs(365 * 86_400),
        )?;
        let raw_ttl = Duration::from_secs(u64::from(raw_ttl_days) * 86_400);
        if raw_ttl_days > 0 && a.retention_margin >= raw_ttl {
            return Err(invalid(
                "anonymizer.retention_margin",
                format!(
                    "must be shorter than clickhouse.raw_ttl_days ({} days), got {:?}",
                    raw_ttl_days, a.retention_margin
                ),
            ));
        }
        // A URL must fit a record far below any topic's limit; 1 MiB is Kafka's default.
        check_range("anonymizer.max_url_bytes", a.max_url_bytes, 1, 1 << 20)?;
        if let Some(problem) = a.url_query.problem() {
            return Err(invalid("anonymizer.url_query", problem));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderSettings {
    pub metrics_listen: Option<SocketAddr>,
    #[serde(deserialize_with = "lenient_string")]
    pub group_id: String,
    /// Time between two requests to the proxy. nginx's `1r/m` really means one per 62.5 s.
    #[serde(with = "humantime_serde")]
    pub slot_spacing: Duration,
    /// Largest request body sent to the proxy (nginx's default limit is 1 MiB = 1048576); 4096 to
    /// [`MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// Local address the loader's HTTP client binds to. The proxy budgets per client IP, so two
    /// loaders need two source addresses to get two budgets.
    pub source_address: Option<IpAddr>,
    /// Timeout of one insert request (nginx's own `proxy_read_timeout` is 60 s).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Send `insert_deduplication_token` (ClickHouse >= 22.2). Off = rely on the block hash.
    pub dedup_token: bool,
    /// `xz` (default, most rows per body), `zstd`, or `gzip` (for servers such as ClickHouse 22.1
    /// that decode only gzip and deflate request bodies).
    pub body_compression: BodyCompression,
    /// Consumption pauses while this many bytes of records wait for a slot (bounds memory); at
    /// least `max_body_bytes`.
    pub max_buffer_bytes: usize,
    /// Most UTC days (of the records' timestamps) one insert may touch, 1 to 1000. `http_log` has
    /// a partition per day and ClickHouse refuses an insert spanning more than
    /// `max_partitions_per_insert_block` (100 by default) partitions; one UTC day overlaps at most
    /// two days of the server's time zone, so the default 50 fits the default limit anywhere.
    pub max_days_per_batch: usize,
    /// Records ClickHouse refuses on their own, in a row with no insert passing in between, after
    /// which the loader stops instead of quarantining more: that many is taken for something
    /// systematic (a schema change, an encoder bug), not bad records. At least 1.
    pub max_rejected_in_a_row: u32,
    pub kafka_options: KafkaOptions,
}

impl Default for LoaderSettings {
    fn default() -> Self {
        LoaderSettings {
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9103))),
            group_id: "edgelog-loader".into(),
            slot_spacing: Duration::from_millis(64_000),
            max_body_bytes: 1_000_000,
            source_address: None,
            request_timeout: Duration::from_secs(55),
            dedup_token: true,
            body_compression: BodyCompression::Xz,
            max_buffer_bytes: 256 << 20,
            max_days_per_batch: 50,
            max_rejected_in_a_row: 10,
            kafka_options: KafkaOptions::default(),
        }
    }
}

impl LoaderSettings {
    /// What types alone cannot check; each error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = self;
        if l.group_id.is_empty() {
            return Err(invalid("loader.group_id", "must not be empty"));
        }
        // Bodies are built whole in memory, twice (Native, then compressed); far beyond any proxy's
        // limit a value is a typo, not a plan.
        check_range(
            "loader.max_body_bytes",
            l.max_body_bytes,
            4096,
            MAX_BODY_BYTES,
        )?;
        if l.max_buffer_bytes < l.max_body_bytes {
            return Err(invalid(
                "loader.max_buffer_bytes",
                "must be at least loader.max_body_bytes (a full body must fit the buffer)",
            ));
        }
        // Slot times are `Instant + slot_spacing`, which panics on overflow; a day is already
        // far past any proxy budget.
        check_duration(
            "loader.slot_spacing",
            l.slot_spacing,
            Duration::from_millis(1),
            Duration::from_secs(24 * 3600),
        )?;
        // A zero timeout fails every insert before it is sent.
        check_duration(
            "loader.request_timeout",
            l.request_timeout,
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?;
        check_range("loader.max_days_per_batch", l.max_days_per_batch, 1, 1000)?;
        check_range(
            "loader.max_rejected_in_a_row",
            l.max_rejected_in_a_row,
            1,
            u32::MAX,
        )?;
        Ok(())
    }
}

/// Every setting of every binary. Each binary reads the sections it needs, so one file can serve
/// a whole deployment.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub log: LogSettings,
    pub kafka: KafkaSettings,
    pub topics: TopicSettings,
    pub clickhouse: ClickHouseSettings,
    pub producer: ProducerSettings,
    pub anonymizer: AnonymizerSettings,
    pub loader: LoaderSettings,
}

impl Settings {
    /// Loads defaults < `file` < `EDGELOG_*` environment < `overrides` (dotted key, value).
    pub fn load(
        file: Option<&Path>,
        overrides: &[(&str, figment::value::Value)],
    ) -> Result<Settings, ConfigError> {
        Self::figment(file, overrides)
            .extract::<Settings>()?
            .validated()
    }

    /// The figment behind [`Settings::load`], exposed for tests and `edgelog config`.
    pub fn figment(file: Option<&Path>, overrides: &[(&str, figment::value::Value)]) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            // file_exact: a missing --config file is an error, not silently ignored.
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        for (key, value) in overrides {
            figment = figment.merge(Serialized::default(key, value.clone()));
        }
        figment
    }

    /// Checks what types alone cannot (each section its own part), normalises librdkafka option
    /// keys and reads the secrets given by file into their settings (so validating the result
    /// again finds each secret set twice: `load` does it once).
    pub fn validated(mut self) -> Result<Settings, ConfigError> {
        for options in [
            &mut self.kafka.options,
            &mut self.producer.kafka_options,
            &mut self.anonymizer.kafka_options,
            &mut self.loader.kafka_options,
        ] {
            *options = options.normalised();
        }
        self.resolve_secret_files()?;
        self.kafka.validate()?;
        self.topics.validate()?;
        self.clickhouse.validate()?;
        self.producer.validate()?;
        self.anonymizer.validate(self.clickhouse.raw_ttl_days)?;
        self.loader.validate()?;
        Ok(self)
    }

    /// Reads every secret given by file into its setting (see the module doc).
    fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        let ch = &mut self.clickhouse;
        for (key, file_key, password, file) in [
            (
                "clickhouse.password",
                "clickhouse.password_file",
                &mut ch.password,
                &ch.password_file,
            ),
            (
                "clickhouse.admin_password",
                "clickhouse.admin_password_file",
                &mut ch.admin_password,
                &ch.admin_password_file,
            ),
        ] {
            if let Some(path) = file {
                if !password.is_empty() {
                    return Err(invalid(
                        file_key,
                        format!("and {key} are both set; set one of them"),
                    ));
                }
                *password = read_secret_file(file_key, path)?;
            }
        }
        let files = std::mem::take(&mut self.kafka.secret_files);
        let mut normalised = BTreeMap::new();
        for (option, path) in files {
            let option = option.replace('_', ".");
            let file_key = format!("kafka.secret_files.{option}");
            if !is_secret_key(&option) {
                return Err(invalid(
                    &file_key,
                    "is not a secret librdkafka option (one whose name holds password, secret, \
                     token, passphrase, or a key's PEM or sasl.oauthbearer.config): set it in \
                     kafka.options",
                ));
            }
            for (section, options) in [
                ("kafka.options", &self.kafka.options),
                ("producer.kafka_options", &self.producer.kafka_options),
                ("anonymizer.kafka_options", &self.anonymizer.kafka_options),
                ("loader.kafka_options", &self.loader.kafka_options),
            ] {
                if options.get(&option).is_some() {
                    return Err(invalid(
                        &file_key,
                        format!("and {section}.{option} are both set; set one of them"),
                    ));
                }
            }
            let secret = read_secret_file(&file_key, &path)?;
            normalised.insert(option, (path, secret));
        }
        for (option, (path, secret)) in normalised {
            self.kafka
                .options
                .0
                .insert(option.clone(), secret.expose().to_string());
            self.kafka.secret_files.insert(option, path);
        }
        Ok(())
    }

    /// The effective settings as TOML with secrets redacted, for `edgelog config`.
    pub fn to_redacted_toml(&self) -> String {
        let mut copy = self.clone();
        for options in [
            &mut copy.kafka.options,
            &mut copy.producer.kafka_options,
            &mut copy.anonymizer.kafka_options,
            &mut copy.loader.kafka_options,
        ] {
            *options = options.redacted();
        }
        if !copy.clickhouse.password.is_empty() {
            copy.clickhouse.password = Secret::new("***");
        }
        if !copy.clickhouse.admin_password.is_empty() {
            copy.clickhouse.admin_password = Secret::new("***");
        }
        toml::to_string(&copy).expect("settings serialise to TOML")
    }
}

/// Most partitions `topics.partitions` may ask for (see the check).
pub const MAX_PARTITIONS: i32 = 100;

/// Longest TTL in days: about 68 years, so `timestamp + TTL` stays inside DateTime (2106).
pub const MAX_TTL_DAYS: u32 = 25_000;

/// Largest `loader.max_body_bytes`: 256 MiB.
pub const MAX_BODY_BYTES: usize = 256 << 20;

fn check_range<T: PartialOrd + fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), ConfigError> {
    if min <= value && value <= max {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ))
    }
}

fn check_duration(
    key: &str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    if min <= value && value <= max {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be between {min:?} and {max:?}, got {value:?}"),
        ))
    }
}

/// Visible ASCII only (and spaces inside secrets): what an HTTP client accepts in a header value.
/// The value itself is not echoed, since it may be a password.
fn check_header_value(key: &str, value: &str, secret: bool) -> Result<(), ConfigError> {
    let allowed = |c: char| c.is_ascii_graphic() || (secret && c == ' ');
    if !secret && value.is_empty() {
        return Err(invalid(key, "must not be empty"));
    }
    match value.chars().position(|c| !allowed(c)) {
        None => Ok(()),
        Some(i) => Err(invalid(
            key,
            format!(
                "has a character an HTTP header cannot carry at position {i} (visible ASCII{} only)",
                if secret { " and spaces" } else { "" }
            ),
        )),
    }
}

/// A secret from `path` (`key` is the setting that names the file): the whole file, less one
/// trailing newline (what `echo` and editors add). The error names the key and the path, never
/// what the file holds.
fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let bytes = std::fs::read(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| invalid(key, format!("{} is not UTF-8 text", path.display())))?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if text.is_empty() {
        // An empty secret file is a mount that went wrong, not an empty password.
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(Secret::new(text))
}

/// True for librdkafka keys whose values must never be logged: passwords, passphrases, secrets,
/// tokens, `sasl.oauthbearer.config` (which holds client secrets), and private key material
/// given inline (`ssl.key.pem`, `ssl_key`, `sasl.oauthbearer.assertion.private.key.pem`). Paths
/// to key files (`*.location`) are not secret. `_` and `.` are the same here, as in option keys.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase().replace('_', ".");
    ["password", "passphrase", "secret", "token", "credential"]
        .iter()
        .any(|word| k.contains(word))
        || k == "sasl.oauthbearer.config"
        || k == "ssl.key"
        || (k.contains("key") && k.ends_with(".pem"))
}

fn check_topic_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{name:?} is not a valid Kafka topic name ([a-zA-Z0-9._-], 1-249 chars)"),
        ))
    }
}

/// ClickHouse identifiers from configuration end up in SQL text, so only plain names pass:
/// `^[A-Za-z_][A-Za-z0-9_]{0,62}$`, nothing that needs quoting.
pub fn check_identifier(key: &str, name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let ok = name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!(
                "{name:?} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63 chars)"
            ),
        ))
    }
}

fn check_http_url(key: &str, value: &str) -> Result<(), ConfigError> {
    match url::Url::parse(value) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {
            if u.password().is_some() || !u.username().is_empty() {
                Err(invalid(
                    key,
                    "must not carry credentials; use clickhouse.user and clickhouse.password",
                ))
            } else {
                Ok(())
            }
        }
        Ok(u) => Err(invalid(
            key,
            format!("scheme {:?} is not http or https", u.scheme()),
        )),
        Err(e) => Err(invalid(key, format!("is not a URL: {e}"))),
    }
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, which is large; that is its API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid() {
        Jail::expect_with(|_| {
            let s = Settings::load(None, &[]).expect("defaults load");
            assert_eq!(s, Settings::default().validated().unwrap());
            assert_eq!(s.topics.input, "http_log");
            assert_eq!(s.loader.slot_spacing, Duration::from_secs(64));
            Ok(())
        });
    }

    #[test]
    fn min_insync_replicas_is_derived_from_the_replication_factor_unless_set() {
        let mut t = TopicSettings::default();
        for (rf, derived) in [(1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (7, 4)] {
            t.replication_factor = rf;
            assert_eq!(t.effective_min_insync_replicas(), derived, "RF {rf}");
            assert!(t.validate().is_ok());
        }
        t.replication_factor = 3;
        t.min_insync_replicas = Some(3);
        assert_eq!(t.effective_min_insync_replicas(), 3);
        assert!(t.validate().is_ok());
        t.min_insync_replicas = Some(4);
        let err = t.validate().unwrap_err().to_string();
        assert!(err.contains("topics.min_insync_replicas"), "{err}");
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "edgelog.toml",
                r#"
                [kafka]
                brokers = "k1:9092"
                [kafka.options]
                "security.protocol" = "SASL_SSL"
                [loader]
                slot_spacing = "70s"
                max_body_bytes = 500000
                [anonymizer]
                instance_id = "a"
                "#,
            )?;
            jail.set_env("EDGELOG_LOADER__MAX_BODY_BYTES", "600000");
            jail.set_env("EDGELOG_KAFKA__OPTIONS__SASL_USERNAME", "alice");
            jail.set_env("EDGELOG_KAFKA__OPTIONS__LINGER_MS", "5");
            jail.set_env("EDGELOG_ANONYMIZER__INSTANCE_ID", "7");
            let s = Settings::load(Some(Path::new("edgelog.toml")), &[]).expect("loads");
            assert_eq!(s.kafka.brokers, "k1:9092");
            assert_eq!(s.loader.slot_spacing, Duration::from_secs(70));
            assert_eq!(s.loader.max_body_bytes, 600_000, "env beats file");
            assert_eq!(
                s.anonymizer.instance_id, "7",
                "a numeric-looking env value still fills a string"
            );
            assert_eq!(
                s.kafka.options.get("security.protocol").unwrap(),
                "SASL_SSL"
            );
            assert_eq!(
                s.kafka.options.get("sasl.username").unwrap(),
                "alice",
                "_ becomes ."
            );
            assert_eq!(s.kafka.options.get("linger.ms").unwrap(), "5");
            Ok(())
        });
    }

    #[test]
    fn overrides_beat_env() {
        Jail::expect_with(|jail| {
            jail.set_env("EDGELOG_PRODUCER__RATE", "5");
            let s = Settings::load(None, &[("producer.rate", 9.5.into())]).unwrap();
            assert_eq!(s.producer.rate, 9.5);
            Ok(())
        });
    }

    #[test]
    fn cluster_mode_loads_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.set_env("EDGELOG_CLICKHOUSE__CLUSTER", "edgelog_shards");
            jail.set_env(
                "EDGELOG_CLICKHOUSE__SHARD_ADMIN_URLS",
                r#"["http://127.0.0.1:8133", "http://127.0.0.1:8143"]"#,
            );
            let s = Settings::load(None, &[]).unwrap();
            assert_eq!(s.clickhouse.cluster.as_deref(), Some("edgelog_shards"));
            assert_eq!(
                s.clickhouse.shard_admin_urls,
                ["http://127.0.0.1:8133", "http://127.0.0.1:8143"]
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[loader]\nslot_spacin = \"70s\"\n")?;
            let err = Settings::load(Some(Path::new("bad.toml")), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("`loader.slot_spacin`"), "{err}");
            assert!(err.contains("bad.toml"), "names the file: {err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_env_key_is_named() {
        Jail::expect_with(|jail| {
            jail.set_env("EDGELOG_LOADER__TYPO", "1");
            let err = Settings::load(None, &[]).unwrap_err().to_string();
            assert!(err.contains("`loader.typo`"), "{err}");
            assert!(
                err.contains("EDGELOG_LOADER__TYPO"),
                "names the variable: {err}"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_value_type_is_named() {
        Jail::expect_with(|jail| {
            jail.set_env("EDGELOG_LOADER__MAX_BODY_BYTES", "lots");
            let err = Settings::load(None, &[]).unwrap_err().to_string();
            assert!(err.contains("`loader.max_body_bytes`"), "{err}");
            assert!(err.contains("EDGELOG_LOADER__MAX_BODY_BYTES"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_duration_is_named() {
        Jail::expect_with(|jail| {
            jail.set_env("EDGELOG_LOADER__SLOT_SPACING", "soon");
            let err = Settings::load(None, &[]).unwrap_err().to_string();
            assert!(err.contains("`loader.slot_spacing`"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        Jail::expect_with(|_| {
            let err = Settings::load(Some(Path::new("nope.toml")), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("nope.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn semantic_checks_name_the_key() {
        let cases: &[(&str, figment::value::Value, &str)] = &[
            ("producer.ipv6_share", 1.5.into(), "producer.ipv6_share"),
            ("producer.rate", (-1.0).into(), "producer.rate"),
            (
                "anonymizer.ipv6_prefix_bits",
                129.into(),
                "anonymizer.ipv6_prefix_bits",
            ),
            (
                "clickhouse.database",
                "x; DROP TABLE y".into(),
                "clickhouse.database",
            ),
            (
                "clickhouse.database",
                "db\nname".into(),
                "clickhouse.database",
            ),
            ("topics.input", "bad topic".into(), "topics.input"),
            ("clickhouse.url", "ftp://x".into(), "clickhouse.url"),
            (
                "clickhouse.url",
                "http://u:p@host:8124".into(),
                "clickhouse.url",
            ),
            ("loader.max_body_bytes", 10.into(), "loader.max_body_bytes"),
            (
                "anonymizer.txn_max_duration",
                "2m".into(),
                "anonymizer.txn_max_duration",
            ),
        ];
        Jail::expect_with(|_| {
            for (key, value, named) in cases {
                let err = Settings::load(None, &[(key, value.clone())])
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(named), "{key}: {err}");
            }
            Ok(())
        });
    }

    /// Hostile values, given the three ways an operator can (TOML file, environment, override),
    /// all go through `Settings::load` as `cli::init` does at start-up; each error names the key.
    #[test]
    fn hostile_values_are_rejected_naming_the_key() {
        let names: &[&str] = &[
            "",
            " ",
            "edgelog db",
            "edgelog`",
            "`edgelog`",
            "edge'log",
            "edge\"log",
            "edgelog; DROP DATABASE system",
            "edgelog;",
            "edgelog\nx",
            "edgelog\r",
            "edgelog\t",
            "edgelog.http_log",
            "edgelog--",
            "edgelog/*",
            "1edgelog",
            "édgelog",
            "edgelog\u{0}",
            "${database}",
        ];
        let long_identifier = "a".repeat(64);
        let topics: &[&str] = &[
            "",
            ".",
            "..",
            "http log",
            "http_log;",
            "http/log",
            "http:log",
            "http_log\n",
            "'http_log'",
            "http*",
            "héllo",
        ];
        let long_topic = "t".repeat(250);
        let mut cases: Vec<(&str, toml::Value)> = Vec::new();
        for name in names.iter().copied().chain([long_identifier.as_str()]) {
            cases.push(("clickhouse.database", name.into()));
        }
        for key in [
            "topics.input",
            "topics.anonymized",
            "topics.dead_letter",
            "topics.loader_dead_letter",
        ] {
            for name in topics.iter().copied().chain([long_topic.as_str()]) {
                cases.push((key, name.into()));
            }
        }
        let numbers: &[(&str, toml::Value)] = &[
            ("loader.max_body_bytes", 0.into()),
            ("loader.max_body_bytes", (-1).into()),
            ("loader.max_body_bytes", 4095.into()),
            ("loader.max_body_bytes", i64::MAX.into()),
            ("loader.max_body_bytes", 1e20.into()),
            ("loader.max_buffer_bytes", 0.into()),
            ("loader.max_buffer_bytes", (-5).into()),
            ("loader.max_days_per_batch", 0.into()),
            ("loader.max_days_per_batch", 1001.into()),
            ("loader.max_rejected_in_a_row", 0.into()),
            ("loader.max_rejected_in_a_row", (-1).into()),
            ("topics.partitions", 0.into()),
            ("topics.partitions", (-3).into()),
            ("topics.partitions", 101.into()),
            ("topics.partitions", i64::MAX.into()),
            ("topics.replication_factor", 0.into()),
            ("topics.replication_factor", 40_000.into()),
            ("topics.min_insync_replicas", 0.into()),
            ("topics.min_insync_replicas", 2.into()),
            ("topics.retention", "0s".into()),
            ("topics.retention", "1ms".into()),
            ("topics.retention", "999999999999years".into()),
            ("clickhouse.raw_ttl_days", 25_001.into()),
            ("clickhouse.raw_ttl_days", (-1).into()),
            ("clickhouse.totals_ttl_days", 4_000_000_000i64.into()),
            ("clickhouse.totals_ttl_days", 1e20.into()),
            ("anonymizer.txn_max_records", 0.into()),
            ("anonymizer.txn_max_records", (-1).into()),
            ("anonymizer.txn_max_duration", "0s".into()),
            ("anonymizer.txn_timeout", "100ms".into()),
            ("anonymizer.txn_timeout", "30days".into()),
            ("anonymizer.ipv6_prefix_bits", 129.into()),
            ("anonymizer.ipv6_prefix_bits", 256.into()),
            ("anonymizer.ipv6_prefix_bits", (-1).into()),
            ("anonymizer.max_future_skew", "2years".into()),
            ("anonymizer.max_future_skew", "soon".into()),
            ("anonymizer.retention_margin", "30days".into()),
            ("anonymizer.retention_margin", "100days".into()),
            ("anonymizer.max_url_bytes", 0.into()),
            ("anonymizer.max_url_bytes", 2_000_000.into()),
            ("anonymizer.max_url_bytes", (-1).into()),
            ("anonymizer.url_query", "drop".into()),
            ("anonymizer.url_query", "allow".into()),
            ("anonymizer.url_query", 5.into()),
            (
                "anonymizer.url_query",
                url_query_table("allow", &["page", ""]),
            ),
            (
                "anonymizer.url_query",
                url_query_table("allow", &["%65mail"]),
            ),
            ("anonymizer.url_query", url_query_table("allo", &["page"])),
            ("loader.slot_spacing", "0s".into()),
            ("loader.slot_spacing", "1000years".into()),
            ("loader.request_timeout", "0s".into()),
            ("loader.request_timeout", "2days".into()),
            ("producer.rate", (-1.0).into()),
            ("producer.rate", f64::NAN.into()),
            ("producer.clients", 0.into()),
            ("clickhouse.user", "".into()),
            ("clickhouse.user", "edgelog loader".into()),
            ("clickhouse.user", "edgelog\r\nX-Injected: 1".into()),
            ("clickhouse.admin_user", "adm\nin".into()),
            ("clickhouse.cluster", "edge shards".into()),
            ("clickhouse.cluster", "c;DROP".into()),
            ("clickhouse.cluster", "".into()),
            (
                "clickhouse.shard_admin_urls",
                toml::Value::Array(vec!["ftp://127.0.0.1:8133".into()]),
            ),
            (
                "clickhouse.shard_admin_urls",
                toml::Value::Array(vec!["http://u:p@127.0.0.1:8133".into()]),
            ),
            (
                // Shards without a cluster to form.
                "clickhouse.shard_admin_urls",
                toml::Value::Array(vec!["http://127.0.0.1:8133".into()]),
            ),
        ];
        cases.extend(numbers.iter().cloned());
        Jail::expect_with(|jail| {
            for (key, value) in &cases {
                let (section, field) = key.split_once('.').unwrap();
                let mut table = toml::Table::new();
                table.insert(field.to_string(), value.clone());
                let mut file = toml::Table::new();
                file.insert(section.to_string(), toml::Value::Table(table));
                jail.create_file("hostile.toml", &toml::to_string(&file).unwrap())?;
                let err = Settings::load(Some(Path::new("hostile.toml")), &[])
                    .expect_err(&format!("{key} = {value} was accepted"))
                    .to_string();
                assert!(err.contains(&format!("`{key}`")), "{key} = {value}: {err}");
            }
            Ok(())
        });
        // The environment is where most deployments set values; it reaches the same checks.
        Jail::expect_with(|jail| {
            for (var, value, key) in [
                (
                    "EDGELOG_CLICKHOUSE__DATABASE",
                    "x;DROP TABLE y",
                    "clickhouse.database",
                ),
                ("EDGELOG_TOPICS__INPUT", "in put", "topics.input"),
                (
                    "EDGELOG_LOADER__MAX_BODY_BYTES",
                    "100000000000000000000",
                    "loader.max_body_bytes",
                ),
                (
                    "EDGELOG_LOADER__MAX_BODY_BYTES",
                    "-1",
                    "loader.max_body_bytes",
                ),
                ("EDGELOG_TOPICS__PARTITIONS", "0", "topics.partitions"),
            ] {
                jail.clear_env();
                jail.set_env(var, value);
                let err = Settings::load(None, &[])
                    .expect_err(&format!("{var}={value} was accepted"))
                    .to_string();
                assert!(err.contains(&format!("`{key}`")), "{var}={value}: {err}");
            }
            Ok(())
        });
    }

    fn url_query_table(key: &str, names: &[&str]) -> toml::Value {
        let mut t = toml::Table::new();
        t.insert(
            key.into(),
            toml::Value::Array(names.iter().map(|&n| n.into()).collect()),
        );
        toml::Value::Table(t)
    }

    /// Every form of `anonymizer.url_query` an operator can write, in a file and in the
    /// environment, and `edgelog config`'s printout loads back to the same policy.
    #[test]
    fn url_query_loads_from_file_and_environment() {
        use crate::url_query::AllowList;
        let allow = |names: &[&str]| UrlQuery::AllowList(AllowList::new(names.iter().copied()));
        let page_lang = allow(&["page", "lang"]);
        Jail::expect_with(|jail| {
            assert_eq!(
                Settings::load(None, &[]).unwrap().anonymizer.url_query,
                UrlQuery::Keep
            );
            for (line, expected) in [
                ("url_query = \"keep\"", UrlQuery::Keep),
                ("url_query = \"drop_values\"", UrlQuery::DropValues),
                (
                    "url_query = { allow = [\"page\", \"lang\", \"page\"] }",
                    page_lang.clone(),
                ),
                ("url_query = { allow = [] }", allow(&[])),
                ("url_query.allow = \"page, lang\"", page_lang.clone()),
            ] {
                jail.create_file("u.toml", &format!("[anonymizer]\n{line}\n"))?;
                let s = Settings::load(Some(Path::new("u.toml")), &[]).unwrap();
                assert_eq!(s.anonymizer.url_query, expected, "{line}");
                jail.create_file("printed.toml", &s.to_redacted_toml())?;
                let printed = Settings::load(Some(Path::new("printed.toml")), &[]).unwrap();
                assert_eq!(printed.anonymizer.url_query, expected, "{line} printed");
            }
            Ok(())
        });
        Jail::expect_with(|jail| {
            for (var, value, expected) in [
                ("URL_QUERY", "drop_values", UrlQuery::DropValues),
                ("URL_QUERY", "keep", UrlQuery::Keep),
                ("URL_QUERY", "{allow=[page,lang]}", page_lang.clone()),
                ("URL_QUERY__ALLOW", "page,lang", page_lang.clone()),
                ("URL_QUERY__ALLOW", " page , lang ", page_lang.clone()),
                ("URL_QUERY__ALLOW", "[page, lang]", page_lang.clone()),
                ("URL_QUERY__ALLOW", "10", allow(&["10"])),
                ("URL_QUERY__ALLOW", "[page, 10]", allow(&["page", "10"])),
                ("URL_QUERY__ALLOW", "", allow(&[])),
            ] {
                jail.clear_env();
                jail.set_env(format!("EDGELOG_ANONYMIZER__{var}"), value);
                let s = Settings::load(None, &[]).unwrap();
                assert_eq!(s.anonymizer.url_query, expected, "{var}={value}");
            }
            // The environment beats the file whichever form each uses.
            for (line, var, value, expected) in [
                (
                    "url_query = \"drop_values\"",
                    "URL_QUERY__ALLOW",
                    "page,lang",
                    page_lang.clone(),
                ),
                (
                    "url_query = { allow = [\"page\"] }",
                    "URL_QUERY",
                    "keep",
                    UrlQuery::Keep,
                ),
                (
                    "url_query = { allow = [\"x\"] }",
                    "URL_QUERY__ALLOW",
                    "page,lang",
                    page_lang.clone(),
                ),
            ] {
                jail.clear_env();
                jail.create_file("u.toml", &format!("[anonymizer]\n{line}\n"))?;
                jail.set_env(format!("EDGELOG_ANONYMIZER__{var}"), value);
                let s = Settings::load(Some(Path::new("u.toml")), &[]).unwrap();
                assert_eq!(
                    s.anonymizer.url_query, expected,
                    "{line} then {var}={value}"
                );
            }
            for (var, value) in [
                ("URL_QUERY", "drop-values"),
                ("URL_QUERY__ALLOW", "page,,lang"),
                ("URL_QUERY__ALLOW", "%65mail"),
                ("URL_QUERY__DENY", "page"),
            ] {
                jail.clear_env();
                jail.set_env(format!("EDGELOG_ANONYMIZER__{var}"), value);
                let err = Settings::load(None, &[]).unwrap_err().to_string();
                assert!(
                    err.contains("`anonymizer.url_query"),
                    "{var}={value}: {err}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn topics_must_be_distinct() {
        Jail::expect_with(|_| {
            for (key, value, named) in [
                ("topics.anonymized", "http_log", "topics.anonymized"),
                ("topics.dead_letter", "http_log", "topics.dead_letter"),
                ("topics.dead_letter", "http_log_anon", "topics.dead_letter"),
                (
                    "topics.loader_dead_letter",
                    "http_log_dlq",
                    "topics.loader_dead_letter",
                ),
                (
                    "topics.loader_dead_letter",
                    "http_log",
                    "topics.loader_dead_letter",
                ),
            ] {
                let err = Settings::load(None, &[(key, value.into())])
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(&format!("`{named}`")), "{err}");
            }
            Ok(())
        });
    }

    #[test]
    fn credentials_a_header_cannot_carry_are_rejected_without_echoing_them() {
        Jail::expect_with(|_| {
            for (key, value) in [
                ("clickhouse.password", "pässword"),
                ("clickhouse.password", "line\nbreak"),
                ("clickhouse.admin_password", "tab\there"),
            ] {
                let err = Settings::load(None, &[(key, value.into())])
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(&format!("`{key}`")), "{err}");
                assert!(!err.contains(value), "the secret is echoed: {err}");
            }
            let s = Settings::load(None, &[("clickhouse.password", "a b!~".into())]).unwrap();
            assert_eq!(s.clickhouse.password.expose(), "a b!~");
            Ok(())
        });
    }

    #[test]
    fn edges_of_the_accepted_ranges_load() {
        Jail::expect_with(|_| {
            let max_identifier = format!("_{}", "a".repeat(62));
            let max_topic = "a.b-c_".repeat(41) + "abc";
            assert_eq!(max_topic.len(), 249);
            let s = Settings::load(
                None,
                &[
                    ("clickhouse.database", max_identifier.as_str().into()),
                    ("topics.input", max_topic.as_str().into()),
                    ("topics.partitions", MAX_PARTITIONS.into()),
                    ("clickhouse.raw_ttl_days", MAX_TTL_DAYS.into()),
                    ("clickhouse.totals_ttl_days", 0.into()),
                    ("loader.max_body_bytes", 4096.into()),
                    ("loader.slot_spacing", "24h".into()),
                ],
            )
            .unwrap();
            assert_eq!(s.clickhouse.database, max_identifier);
            Ok(())
        });
    }

    #[test]
    fn secret_keys_cover_passwords_secrets_tokens_and_key_material() {
        for key in [
            "sasl.password",
            "sasl_password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.truststore.password",
            "ssl.key.pem",
            "ssl_key",
            "ssl.key",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.assertion.private.key.pem",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret_key(key), "{key} is secret");
        }
        for key in [
            "sasl.username",
            "sasl.mechanism",
            "security.protocol",
            "ssl.key.location",
            "ssl.keystore.location",
            "ssl.certificate.pem",
            "ssl.ca.pem",
            "ssl.ca.location",
            "linger.ms",
        ] {
            assert!(!is_secret_key(key), "{key} is not secret");
        }
    }

    #[test]
    fn passwords_are_read_from_files_without_the_trailing_newline() {
        Jail::expect_with(|jail| {
            jail.create_file("ch_password", "s3cret pass\n")?;
            jail.create_file("admin_password", "adm1n\r\n")?;
            jail.create_file("kafka_password", "k4fka\n\n")?;
            jail.create_file("oauth", "principal=edgelog secret=0auth")?;
            jail.set_env("EDGELOG_CLICKHOUSE__PASSWORD_FILE", "ch_password");
            jail.set_env("EDGELOG_CLICKHOUSE__ADMIN_PASSWORD_FILE", "admin_password");
            jail.set_env(
                "EDGELOG_KAFKA__SECRET_FILES__SASL_PASSWORD",
                "kafka_password",
            );
            jail.set_env(
                "EDGELOG_KAFKA__SECRET_FILES__SASL_OAUTHBEARER_CONFIG",
                "oauth",
            );
            let s = Settings::load(None, &[]).unwrap();
            assert_eq!(s.clickhouse.password.expose(), "s3cret pass");
            assert_eq!(s.clickhouse.admin_password.expose(), "adm1n");
            // Only one newline goes: the rest is the secret's.
            assert_eq!(s.kafka.options.get("sasl.password"), Some("k4fka\n"));
            assert_eq!(
                s.kafka.options.get("sasl.oauthbearer.config"),
                Some("principal=edgelog secret=0auth")
            );
            let toml = s.to_redacted_toml();
            let debug = format!("{s:?}");
            for text in [&toml, &debug] {
                for secret in ["s3cret", "adm1n", "k4fka", "0auth"] {
                    assert!(!text.contains(secret), "{secret} shows: {text}");
                }
            }
            assert!(toml.contains("password_file = \"ch_password\""), "{toml}");
            assert!(
                toml.contains("\"sasl.oauthbearer.config\" = \"oauth\""),
                "{toml}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_secret_and_its_file_both_set_is_an_error() {
        Jail::expect_with(|jail| {
            jail.create_file("pw", "from-file")?;
            jail.set_env("EDGELOG_CLICKHOUSE__PASSWORD", "inline");
            jail.set_env("EDGELOG_CLICKHOUSE__PASSWORD_FILE", "pw");
            let err = Settings::load(None, &[]).unwrap_err().to_string();
            assert!(err.contains("`clickhouse.password_file`"), "{err}");
            assert!(err.contains("clickhouse.password are both set"), "{err}");
            jail.clear_env();
            for (var, value) in [
                ("EDGELOG_KAFKA__OPTIONS__SASL_PASSWORD", "inline"),
                ("EDGELOG_LOADER__KAFKA_OPTIONS__SASL_PASSWORD", "inline"),
            ] {
                jail.clear_env();
                jail.set_env("EDGELOG_KAFKA__SECRET_FILES__SASL_PASSWORD", "pw");
                jail.set_env(var, value);
                let err = Settings::load(None, &[]).unwrap_err().to_string();
                assert!(
                    err.contains("`kafka.secret_files.sasl.password`"),
                    "{var}: {err}"
                );
                assert!(
                    !err.contains("inline") && !err.contains("from-file"),
                    "{err}"
                );
            }
            Ok(())
        });
    }

    #[test]
    fn an_unusable_secret_file_names_the_key_and_path_never_the_content() {
        Jail::expect_with(|jail| {
            jail.create_file("empty", "\n")?;
            std::fs::write(jail.directory().join("binary"), b"hunter2\xff")
                .map_err(|e| e.to_string())?;
            for (key, path, named) in [
                (
                    "clickhouse.password_file",
                    "nope/missing",
                    "clickhouse.password_file",
                ),
                (
                    "clickhouse.admin_password_file",
                    "empty",
                    "clickhouse.admin_password_file",
                ),
                (
                    "clickhouse.password_file",
                    "binary",
                    "clickhouse.password_file",
                ),
                (
                    "kafka.secret_files.sasl_password",
                    "nope/missing",
                    "kafka.secret_files.sasl.password",
                ),
            ] {
                let err = Settings::load(None, &[(key, path.into())])
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(&format!("`{named}`")), "{err}");
                assert!(err.contains(path), "names the path: {err}");
                assert!(!err.contains("hunter2"), "{err}");
            }
            // A character a header cannot carry, read from a file, is named by the file's key.
            jail.create_file("tabbed", "tab\there")?;
            let err = Settings::load(None, &[("clickhouse.password_file", "tabbed".into())])
                .unwrap_err()
                .to_string();
            assert!(err.contains("`clickhouse.password_file`"), "{err}");
            assert!(!err.contains("tab\there"), "{err}");
            // Only options that are hidden everywhere may come from a secret file.
            jail.create_file("cert.pem", "-----BEGIN CERTIFICATE-----")?;
            let err = Settings::load(
                None,
                &[("kafka.secret_files.ssl_certificate_pem", "cert.pem".into())],
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("`kafka.secret_files.ssl.certificate.pem`"),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        Jail::expect_with(|_| {
            for (set, named) in [
                ("clickhouse.client_cert_file", "clickhouse.client_key_file"),
                ("clickhouse.client_key_file", "clickhouse.client_cert_file"),
            ] {
                let err = Settings::load(None, &[(set, "x.pem".into())])
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(&format!("`{named}`")), "{err}");
            }
            let s = Settings::load(
                None,
                &[
                    ("clickhouse.ca_file", "ca.pem".into()),
                    ("clickhouse.client_cert_file", "c.pem".into()),
                    ("clickhouse.client_key_file", "c.key".into()),
                ],
            )
            .unwrap();
            assert_eq!(s.clickhouse.ca_file, Some(PathBuf::from("ca.pem")));
            Ok(())
        });
    }

    #[test]
    fn secrets_never_print() {
        Jail::expect_with(|jail| {
            jail.set_env("EDGELOG_CLICKHOUSE__PASSWORD", "hunter2");
            jail.set_env("EDGELOG_KAFKA__OPTIONS__SASL_PASSWORD", "s3cret");
            let s = Settings::load(None, &[]).unwrap();
            assert_eq!(s.clickhouse.password.expose(), "hunter2");
            let debug = format!("{s:?}");
            let toml = s.to_redacted_toml();
            for text in [&debug, &toml] {
                assert!(!text.contains("hunter2"), "{text}");
                assert!(!text.contains("s3cret"), "{text}");
            }
            assert!(toml.contains("sasl.password"), "{toml}");
            Ok(())
        });
    }
}
