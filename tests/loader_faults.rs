//! Stage two under proxy faults: a scripted proxy in front of the real ClickHouse answers 503, 504
//! after the insert landed, drops the connection, says "bad gateway" (ClickHouse down) for
//! several slots, and has the loader killed once its request is on the wire. The rows must still
//! land exactly once, every retry must be the same batch (same token), and the loader must never
//! send faster than its slot spacing.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use edgelog::body::BodyCompression;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// nginx's limit_req refusal: nothing reaches ClickHouse.
    SlotBusy,
    /// The insert reaches ClickHouse and lands, but the client is told 504 (proxy read timeout).
    LandThenGatewayTimeout,
    /// The connection closes without an answer.
    Drop,
    /// ClickHouse unreachable behind the proxy.
    BadGateway,
    /// nginx's body limit refusal (a proxy briefly configured smaller): nothing reaches ClickHouse.
    TooLarge,
    /// The loader process is SIGKILLed once its request has been sent in full; the insert then
    /// reaches ClickHouse and lands, with nobody left to hear the answer.
    KillSenderThenLand,
}

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    query: String,
    body_len: usize,
}

async fn read_request(stream: &mut TcpStream) -> Option<(String, Vec<(String, String)>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let header_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let target = lines.next()?.split(' ').nth(1)?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((target, headers, body))
}

async fn respond(stream: &mut TcpStream, status: u16, extra_headers: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
}

/// Forwards one request to the real ClickHouse; returns (status, exception-code header, body).
async fn forward(
    target: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> (u16, Option<String>, Vec<u8>) {
    edgelog::clickhouse::install_crypto_provider();
    let mut req = reqwest::Client::new()
        .post(format!("{CLICKHOUSE}{target}"))
        .body(body);
    for (k, v) in headers {
        if k.starts_with("x-clickhouse") || k == "content-encoding" {
            req = req.header(k, v);
        }
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let code = resp
        .headers()
        .get("x-clickhouse-exception-code")
        .map(|v| v.to_str().unwrap().to_string());
    (status, code, resp.bytes().await.unwrap().to_vec())
}

/// Serves the faults in order, then forwards faithfully. Records every request.
/// `sender` is the PID of the loader process that [`Fault::KillSenderThenLand`] kills.
async fn fault_proxy(
    listener: TcpListener,
    script: Vec<Fault>,
    seen: Arc<Mutex<Vec<Seen>>>,
    sender: Arc<AtomicU32>,
) {
    let mut script = script.into_iter();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        // When the request came, not when its body had been read: reading a body takes a
        // varying time on a loaded machine, and the slot-spacing check compares arrivals.
        let at = Instant::now();
        let Some((target, headers, body)) = read_request(&mut stream).await else {
            continue;
        };
        let query = url::Url::parse(&format!("http://x{target}"))
            .unwrap()
            .query()
            .unwrap_or("")
            .to_string();
        seen.lock().unwrap().push(Seen {
            at,
            query,
            body_len: body.len(),
        });
        match script.next() {
            Some(Fault::SlotBusy) => {
                respond(
                    &mut stream,
                    503,
                    "",
                    b"<html>503 Service Temporarily Unavailable</html>",
                )
                .await
            }
            Some(Fault::LandThenGatewayTimeout) => {
                let (status, _, _) = forward(&target, &headers, body).await;
                assert_eq!(status, 200, "the insert landed behind the 504");
                respond(&mut stream, 504, "", b"<html>504 Gateway Time-out</html>").await;
            }
            Some(Fault::Drop) => drop(stream),
            Some(Fault::KillSenderThenLand) => {
                let pid = sender.load(Ordering::SeqCst);
                assert_ne!(pid, 0, "the sender's PID is known");
                let killed = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .unwrap();
                assert!(killed.success());
                let (status, _, _) = forward(&target, &headers, body).await;
                assert_eq!(status, 200, "the insert landed after its sender died");
                drop(stream);
            }
            Some(Fault::BadGateway) => {
                respond(&mut stream, 502, "", b"<html>502 Bad Gateway</html>").await
            }
            Some(Fault::TooLarge) => {
                respond(
                    &mut stream,
                    413,
                    "",
                    b"<html>413 Request Entity Too Large</html>",
                )
                .await
            }
            None => {
                let (status, code, body) = forward(&target, &headers, body).await;
                let extra = code
                    .map(|c| format!("X-ClickHouse-Exception-Code: {c}\r\n"))
                    .unwrap_or_default();
                respond(&mut stream, status, &extra, &body).await;
            }
        }
    }
}

/// Starts [`fault_proxy`] on a free port: its URL, and the requests it will have seen.
async fn start_fault_proxy(
    script: Vec<Fault>,
    sender: Arc<AtomicU32>,
) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(fault_proxy(listener, script, seen.clone(), sender));
    (url, seen)
}

fn token_of(query: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "insert_deduplication_token")
        .map(|(_, v)| v.into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_faults_lose_nothing_and_duplicate_nothing() {
    require_stack();
    let script = vec![
        Fault::SlotBusy,
        Fault::LandThenGatewayTimeout,
        Fault::Drop,
        Fault::BadGateway,
        Fault::BadGateway,
        Fault::BadGateway,
    ];
    let faults = script.len();
    let (proxy_url, seen) = start_fault_proxy(script, Default::default()).await;

    let mut s = isolated_settings();
    s.clickhouse.url = proxy_url;
    s.loader.slot_spacing = Duration::from_millis(400);
    // All records are in the anonymized topic before the loader starts, so the first batch holds
    // them all and every fault hits that same batch.
    fill_anonymized_topic(&s, 4000).await;
    let loader = start_loader(&s);
    let db = s.clickhouse.database.clone();
    wait_for("all rows after the faults", Duration::from_secs(60), || {
        let db = db.clone();
        let seen = seen.clone();
        async move {
            let rows = count(format!("SELECT count() FROM {db}.http_log")).await;
            (rows >= 4000 && seen.lock().unwrap().len() > faults).then_some(())
        }
    })
    .await;
    loader.stop().await.unwrap();

    assert_loaded_exactly_once(&s, 4000).await;

    let seen = seen.lock().unwrap().clone();
    let first = token_of(&seen[0].query).expect("inserts carry a token");
    for attempt in &seen[..=faults] {
        assert_eq!(
            token_of(&attempt.query).as_deref(),
            Some(first.as_str()),
            "every retry re-sends the same batch"
        );
        assert_eq!(attempt.body_len, seen[0].body_len, "byte-identical body");
    }
    for pair in seen.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(390),
            "never faster than the slot spacing: {gap:?}"
        );
    }
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loader_killed_after_sending_is_succeeded_by_the_same_batch_once() {
    require_stack();
    let sender = Arc::new(AtomicU32::new(0));
    let (proxy_url, seen) =
        start_fault_proxy(vec![Fault::KillSenderThenLand], sender.clone()).await;

    let mut s = isolated_settings();
    s.clickhouse.url = proxy_url;
    s.loader.source_address = Some(fresh_loopback_ip());
    fill_anonymized_topic(&s, 4000).await;
    let mut first = KillOnDrop::spawn(&mut loader_command(&s));
    sender.store(first.id(), Ordering::SeqCst);
    let status = tokio::task::spawn_blocking(move || first.0.wait().unwrap())
        .await
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "the first loader died by SIGKILL");
    let db = s.clickhouse.database.clone();
    wait_for(
        "the orphaned insert to land",
        Duration::from_secs(30),
        || {
            let db = db.clone();
            async move {
                (count(format!("SELECT count() FROM {db}.http_log")).await >= 4000).then_some(())
            }
        },
    )
    .await;

    // Its successor finds the recorded batch, re-sends it, and ClickHouse drops the copy.
    let _second = KillOnDrop::spawn(&mut loader_command(&s));
    wait_no_pending_batch(
        &s,
        "the successor to finish the batch",
        Duration::from_secs(60),
    )
    .await;
    assert_loaded_exactly_once(&s, 4000).await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "the batch was sent again: {seen:?}");
    assert_eq!(
        token_of(&seen[1].query),
        token_of(&seen[0].query),
        "same token"
    );
    assert!(token_of(&seen[0].query).is_some());
    assert_eq!(seen[1].body_len, seen[0].body_len, "same bytes");
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_over_the_proxys_limit_is_re_planned_smaller_never_dropped() {
    require_stack();
    let mut s = isolated_settings(); // through the fast nginx proxy: real nginx, 1 MiB body limit
    let ip = fresh_loopback_ip();
    s.loader.source_address = Some(ip);
    s.loader.max_body_bytes = 3_000_000; // more than nginx accepts
    s.loader.slot_spacing = Duration::from_millis(150);
    // The least dense codec (~14 B/row): the first batch is over nginx's limit as soon as it
    // holds ~75k rows, however few of the topic's records the consumer has fetched by then
    // (with xz, ~10.5 B/row, a slow first fetch once left it under the limit).
    s.loader.body_compression = BodyCompression::Gzip;
    fill_anonymized_topic(&s, 200_000).await; // ~2.8 MB of compressed body: over the limit in one batch
    let loader = start_loader(&s);
    let db = s.clickhouse.database.clone();
    wait_for("all 200k rows", Duration::from_secs(120), || {
        let db = db.clone();
        async move {
            (count(format!("SELECT count() FROM {db}.http_log")).await >= 200_000).then_some(())
        }
    })
    .await;
    loader.stop().await.unwrap();
    assert_eq!(
        count(format!("SELECT count() FROM {db}.http_log")).await,
        200_000
    );
    assert_eq!(
        count(format!(
            "SELECT uniqExact(source_partition, source_offset) FROM {db}.http_log"
        ))
        .await,
        200_000
    );

    let home = std::env::var("EDGESTACK_HOME")
        .unwrap_or_else(|_| format!("{}/.cache/edgelog-stack", std::env::var("HOME").unwrap()));
    let log = std::fs::read_to_string(format!("{home}/run/proxy-fast/access.log")).unwrap();
    let refused = log
        .lines()
        .filter(|l| l.starts_with(&format!("{ip} ")) && l.contains("\" 413 "))
        .count();
    assert!(refused >= 1, "nginx refused at least one body as too large");
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}

/// One 413 from a proxy briefly configured smaller: the loader plans smaller bodies for a while,
/// then climbs back to `max_body_bytes` as inserts pass, and loads everything once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_body_limit_climbs_back_after_a_transient_413() {
    require_stack();
    let (proxy_url, seen) = start_fault_proxy(vec![Fault::TooLarge], Default::default()).await;
    let mut s = isolated_settings();
    s.clickhouse.url = proxy_url;
    s.loader.slot_spacing = Duration::from_millis(150);
    let max = 40_000;
    s.loader.max_body_bytes = max;
    s.loader.body_compression = BodyCompression::Zstd;
    // Over 30 full bodies of ~3,000 rows: room for the climb back.
    fill_anonymized_topic(&s, 100_000).await;
    let loader = start_loader(&s);
    let db = s.clickhouse.database.clone();
    wait_for("all rows", Duration::from_secs(180), || {
        let db = db.clone();
        async move {
            (count(format!("SELECT count() FROM {db}.http_log")).await >= 100_000).then_some(())
        }
    })
    .await;
    loader.stop().await.unwrap();
    assert_loaded_exactly_once(&s, 100_000).await;

    let sizes: Vec<usize> = seen.lock().unwrap().iter().map(|r| r.body_len).collect();
    eprintln!("body sizes: {sizes:?}");
    let refused = sizes[0];
    assert!(
        sizes[1] <= refused * 3 / 4,
        "planned smaller after the 413: {sizes:?}"
    );
    // While the refusal is recent, bodies stay under 7/8 of the refused one (BodyLimit).
    assert!(
        sizes[1..16].iter().all(|&b| b <= refused / 8 * 7),
        "kept under the recent refusal: {sizes:?}"
    );
    // Then full bodies again, before the last (which takes what is left).
    assert!(
        sizes[16..sizes.len() - 1]
            .iter()
            .any(|&b| b as f64 > max as f64 * 0.9),
        "the limit climbed back to loader.max_body_bytes: {sizes:?}"
    );
    admin()
        .query(&format!("DROP DATABASE {db}"), &[])
        .await
        .unwrap();
}
