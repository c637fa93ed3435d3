//! A dead dependency is reported, not endured in silence or noise: a stage whose Kafka cluster
//! (or ClickHouse proxy) does not answer stays unready with the reason on `/readyz`, logs the
//! condition at a bounded rate, and exits cleanly within a few seconds of SIGTERM.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A stage binary started with `cmd`, its health endpoint on `port`, its log in a file.
struct Stage {
    child: KillOnDrop,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl Stage {
    /// `listen_key`: the environment variable of the stage's `metrics_listen`.
    fn start(mut cmd: Command, listen_key: &str) -> Stage {
        let port = closed_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        cmd.env(listen_key, format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .env("EDGELOG_LOG__FORMAT", "json");
        Stage {
            child: KillOnDrop::spawn(&mut cmd),
            port,
            log,
        }
    }

    async fn readyz(&self) -> Option<(u16, String)> {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        edgelog::clickhouse::install_crypto_provider();
        let response = reqwest::get(&url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    /// Waits until `/readyz` answers 503 with `reason` in its body.
    async fn wait_unready_because(&self, reason: &str) -> String {
        wait_for(
            &format!("/readyz to say {reason:?}"),
            Duration::from_secs(60),
            || async {
                match self.readyz().await {
                    Some((503, body)) if body.contains(reason) => Some(body),
                    _ => None,
                }
            },
        )
        .await
    }

    fn log_lines(&self) -> Vec<String> {
        let mut text = String::new();
        std::fs::File::open(self.log.path())
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text.lines().map(str::to_string).collect()
    }

    /// SIGTERM: the stage exits successfully within 5 s, whatever it was waiting for.
    fn assert_stops_on_sigterm(&mut self) {
        let (took, status) = self.terminate();
        let log = self.log_lines().join("\n");
        assert!(status.success(), "{status}; log:\n{log}");
        assert!(
            took < Duration::from_secs(5),
            "exited {took:?} after SIGTERM"
        );
    }

    /// SIGTERM, then the time until the process exited and its status.
    fn terminate(&mut self) -> (Duration, std::process::ExitStatus) {
        let asked = Instant::now();
        terminate(&self.child);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (asked.elapsed(), status);
            }
            assert!(
                asked.elapsed() < Duration::from_secs(30),
                "still running 30 s after SIGTERM; log:\n{}",
                self.log_lines().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Over `window`, at most `max` log lines: a dead dependency must not flood the log.
async fn assert_quiet(stage: &Stage, window: Duration, max: usize) {
    let before = stage.log_lines().len();
    tokio::time::sleep(window).await; // the window being measured, not a wait for a condition
    let lines = stage.log_lines();
    let new = &lines[before..];
    assert!(
        new.len() <= max,
        "{} log lines in {window:?} (at most {max}):\n{}",
        new.len(),
        new.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymizer_without_a_cluster_is_unready_quiet_and_stops_on_sigterm() {
    let mut s = isolated_settings();
    s.kafka.brokers = format!("127.0.0.1:{}", closed_port());
    let mut stage = Stage::start(
        anonymizer_command(&s, "0"),
        "EDGELOG_ANONYMIZER__METRICS_LISTEN",
    );

    let body = stage.wait_unready_because("kafka unavailable").await;
    assert!(
        body.contains("max.message.bytes"),
        "names what it waits for: {body}"
    );
    // librdkafka reports a refused connection several times a second; one line per kind per 10 s.
    assert_quiet(&stage, Duration::from_secs(12), 4).await;

    stage.assert_stops_on_sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_without_a_cluster_is_unready_quiet_and_stops_on_sigterm() {
    let mut s = isolated_settings();
    s.kafka.brokers = format!("127.0.0.1:{}", closed_port());
    s.loader.source_address = Some(fresh_loopback_ip());
    let mut stage = Stage::start(loader_command(&s), "EDGELOG_LOADER__METRICS_LISTEN");

    let body = stage.wait_unready_because("kafka unavailable").await;
    assert!(
        body.contains("topic's id"),
        "names what it waits for: {body}"
    );
    assert_quiet(&stage, Duration::from_secs(12), 4).await;

    stage.assert_stops_on_sigterm();
}

/// Kafka answers, the proxy does not: the loader keeps its batch, says why it is unready, and
/// still stops at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_whose_proxy_is_gone_is_unready_and_stops_on_sigterm() {
    require_stack();
    let mut s = fast_loader_settings();
    fill_anonymized_topic(&s, 200).await;
    s.clickhouse.url = format!("http://127.0.0.1:{}", closed_port());
    let mut stage = Stage::start(loader_command(&s), "EDGELOG_LOADER__METRICS_LISTEN");

    let body = stage.wait_unready_because("clickhouse unavailable").await;
    assert!(body.contains("request failed"), "{body}");
    // One attempt per slot (300 ms here): each failed attempt is one warning, not a flood.
    assert_quiet(&stage, Duration::from_secs(6), 25).await;

    stage.assert_stops_on_sigterm();
    assert_eq!(
        count(format!(
            "SELECT count() FROM {}.http_log",
            s.clickhouse.database
        ))
        .await,
        0
    );
}
