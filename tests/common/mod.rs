//! Shared helpers of the integration tests. They need the local stack (`scripts/stack.sh up`):
//! real Apache Kafka on 127.0.0.1:9092, real ClickHouse on 8123, nginx proxies on 8124 (1r/m, the
//! original) and 8125 (600r/m, for tests that need many slots). A missing server fails the test
//! with a message saying how to start it; nothing is skipped silently.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use edgelog::clickhouse::ClickHouseClient;
use edgelog::config::Settings;

pub const KAFKA: &str = "127.0.0.1:9092";
pub const CLICKHOUSE: &str = "http://127.0.0.1:8123";
pub const PROXY: &str = "http://127.0.0.1:8124";
pub const FAST_PROXY: &str = "http://127.0.0.1:8125";
pub const LOADER_PASSWORD: &str = "edgelog-dev-password";

/// Panics with instructions unless every server of the stack accepts connections.
pub fn require_stack() {
    for (name, addr) in [
        ("Kafka", "127.0.0.1:9092"),
        ("ClickHouse", "127.0.0.1:8123"),
        ("proxy (1r/m)", "127.0.0.1:8124"),
        ("fast proxy", "127.0.0.1:8125"),
    ] {
        let sock: SocketAddr = addr.parse().unwrap();
        if TcpStream::connect_timeout(&sock, Duration::from_secs(2)).is_err() {
            panic!(
                "{name} is not running on {addr}. Integration tests need the local stack: run \
                 `scripts/stack.sh up` (or `scripts/test.sh`, which starts it)."
            );
        }
    }
}

/// A name unique to this test run, usable as a topic, group or database name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Settings for an isolated pipeline: own topics, groups and database.
pub fn isolated_settings() -> Settings {
    let id = unique("t");
    let mut s = Settings::default();
    s.kafka.brokers = KAFKA.into();
    s.topics.input = format!("{id}_in");
    s.topics.anonymized = format!("{id}_anon");
    s.topics.dead_letter = format!("{id}_dlq");
    s.topics.partitions = 3;
    s.anonymizer.group_id = format!("{id}_anonymizer");
    s.anonymizer.metrics_listen = None;
    s.loader.group_id = format!("{id}_loader");
    s.loader.metrics_listen = None;
    s.producer.metrics_listen = None;
    s.clickhouse.database = id;
    s.clickhouse.admin_url = CLICKHOUSE.into();
    s.clickhouse.url = FAST_PROXY.into();
    s.clickhouse.password = edgelog::config::Secret::new(LOADER_PASSWORD);
    s.validated().expect("test settings are valid")
}

pub fn admin() -> ClickHouseClient {
    ClickHouseClient::new(CLICKHOUSE, "default", &Default::default())
}

/// Polls `probe` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A loopback source address unlikely to have used the proxy's budget in the last minute
/// (nginx budgets per client IP; all of 127.0.0.0/8 reaches the proxy on Linux).
pub fn fresh_loopback_ip() -> std::net::IpAddr {
    let n = uuid::Uuid::new_v4().as_u128();
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        77,
        (n >> 8) as u8,
        (n as u8).max(1),
    ))
}
