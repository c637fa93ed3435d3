//! One insert request through the proxy: the URL (pure), the request, and the classification of
//! its outcome into what the loader does next.

use std::net::IpAddr;
use std::time::Duration;

use crate::body::{BodyCompression, COLUMNS};
use crate::clickhouse::{ClickHouseClient, ClickHouseError, ClientOptions};
use crate::config::Secret;
use crate::loader::classify::{classify_clickhouse, ErrorClass};

/// Settings pinned on every insert. A retried batch must be cut into the same blocks as the first
/// attempt (dedup works per block), so block sizes are fixed here, never left to server defaults.
/// Every one of them exists in ClickHouse 22.1 (an unknown setting fails the request). The Native
/// String -> LowCardinality conversion the body relies on is on by default on every version.
pub const INSERT_SETTINGS: [(&str, &str); 8] = [
    ("async_insert", "0"),
    ("insert_deduplicate", "1"),
    ("deduplicate_blocks_in_dependent_materialized_views", "1"),
    ("max_insert_block_size", "1048576"),
    ("min_insert_block_size_rows", "0"),
    ("min_insert_block_size_bytes", "0"),
    // Without these, each materialized view's GROUP BY output reaches its table as up to ~256
    // small blocks per insert, each taking a slot of the target's dedup window: a retry was then
    // caught only within ~39 inserts (measured, docs/BENCHMARKS.md). Squashed, it is a few blocks.
    (
        "min_insert_block_size_rows_for_materialized_views",
        "1048576",
    ),
    (
        "min_insert_block_size_bytes_for_materialized_views",
        "268435456",
    ),
];

/// The insert URL: `base` + the INSERT statement + pinned settings (+ the dedup token).
/// The database name is a validated identifier; nothing from a record is in the URL.
pub fn insert_url(base: &str, database: &str, token: Option<&str>) -> String {
    insert_url_into(base, database, "http_log", token)
}

/// [`insert_url`] into another table of the same structure (replay's staging table).
pub fn insert_url_into(base: &str, database: &str, table: &str, token: Option<&str>) -> String {
    let columns: Vec<&str> = COLUMNS.iter().map(|(name, _)| *name).collect();
    let query = format!(
        "INSERT INTO {database}.{table} ({}) FORMAT Native",
        columns.join(", ")
    );
    let mut url = url::Url::parse(base).expect("clickhouse.url is validated at start-up");
    {
        let mut pairs = url.query_pairs_mut();
        pairs.append_pair("query", &query);
        for (k, v) in INSERT_SETTINGS {
            pairs.append_pair(k, v);
        }
        if let Some(token) = token {
            pairs.append_pair("insert_deduplication_token", token);
        }
    }
    url.into()
}

/// What happened to one insert request, and so what the loader does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ClickHouse confirmed the insert (or dropped it as a duplicate): commit the offsets.
    Inserted,
    /// The proxy's budget for our address was spent (nginx `limit_req`, 503 without a ClickHouse
    /// exception): the batch did not reach ClickHouse. Wait a full slot, send the same batch.
    SlotBusy,
    /// Body over the proxy's limit (413): the batch did not reach ClickHouse; plan a smaller one.
    TooLarge,
    /// Might or might not have landed (5xx, 504, timeout, refused): send the same batch again in
    /// the next slot; the dedup token makes a second landing a no-op.
    Transient(String),
    /// ClickHouse rejected the request for a reason no batch can get past (schema, auth,
    /// settings): stop consuming, commit nothing, alert.
    Permanent(String),
    /// ClickHouse refused this batch for what is in it (a value, too many partitions): it will
    /// never pass as it is, smaller batches can. Split it; a single record is quarantined.
    Rejected(String),
}

/// Classifies an HTTP answer. `clickhouse_code` is the `X-ClickHouse-Exception-Code` header: its
/// presence tells a ClickHouse error from one made by the proxy.
pub fn classify_response(status: u16, clickhouse_code: Option<u32>, body: &str) -> Outcome {
    let detail = || {
        let snippet: String = body.trim().chars().take(300).collect();
        match clickhouse_code {
            Some(code) => format!("HTTP {status}, ClickHouse code {code}: {snippet}"),
            None => format!("HTTP {status}: {snippet}"),
        }
    };
    match (status, clickhouse_code) {
        (200, None) => Outcome::Inserted,
        // A 200 whose body carries an exception: the insert failed part-way, retry it.
        (200, Some(_)) => Outcome::Transient(detail()),
        (503, None) => Outcome::SlotBusy,
        (413, _) => Outcome::TooLarge,
        (_, Some(code)) => match classify_clickhouse(code, body) {
            ErrorClass::Retriable => Outcome::Transient(detail()),
            ErrorClass::Permanent => Outcome::Permanent(detail()),
            ErrorClass::BatchCannotPass => Outcome::Rejected(detail()),
        },
        (401 | 403, None) => Outcome::Permanent(detail()),
        _ => Outcome::Transient(detail()),
    }
}

/// Sends bodies to the proxy (through the one ClickHouse client) and classifies the answers.
pub struct InsertClient {
    client: ClickHouseClient,
}

impl InsertClient {
    /// `source_address` pins the local address, which is what the proxy budgets by.
    pub fn new(
        user: &str,
        password: &Secret,
        source_address: Option<IpAddr>,
        timeout: Duration,
    ) -> InsertClient {
        let options = ClientOptions {
            source_address,
            timeout,
            // One request per minute: a pooled connection would have been closed by nginx anyway.
            reuse_connections: false,
        };
        // No base URL: every request's URL is given whole to `send` (`insert_url`).
        InsertClient {
            client: ClickHouseClient::with_options("http://127.0.0.1", user, password, &options),
        }
    }

    /// Sends one compressed Native body to `url`.
    pub async fn send(&self, url: &str, compression: BodyCompression, body: Vec<u8>) -> Outcome {
        match self
            .client
            .post(url, Some(compression.content_encoding()), body)
            .await
        {
            Ok(a) => classify_response(a.status, a.exception_code, &a.body),
            Err(ClickHouseError::Transport { detail, .. }) => {
                Outcome::Transient(format!("request failed: {detail}"))
            }
            Err(e) => Outcome::Transient(format!("request failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_carries_query_settings_and_token() {
        let url = insert_url("http://127.0.0.1:8124", "edgelog", Some("tok-1"));
        let parsed = url::Url::parse(&url).unwrap();
        let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("query"),
            Some(
                "INSERT INTO edgelog.http_log (timestamp, resource_id, bytes_sent, request_time_milli, \
                 response_status, cache_status, method, remote_addr, url, source_partition, source_offset) \
                 FORMAT Native"
            )
        );
        assert_eq!(get("insert_deduplication_token"), Some("tok-1"));
        assert_eq!(get("async_insert"), Some("0"));
        assert_eq!(
            get("deduplicate_blocks_in_dependent_materialized_views"),
            Some("1")
        );
        assert_eq!(parsed.host_str(), Some("127.0.0.1"));
        assert_eq!(parsed.port(), Some(8124));
    }

    #[test]
    fn url_without_token_and_with_a_path() {
        let url = insert_url("http://proxy:8124/ch/", "db", None);
        assert!(
            url.starts_with("http://proxy:8124/ch/?query=INSERT+INTO+db.http_log"),
            "{url}"
        );
        assert!(!url.contains("insert_deduplication_token"));
    }

    #[test]
    fn classification_table() {
        use Outcome::*;
        assert_eq!(classify_response(200, None, ""), Inserted);
        assert_eq!(
            classify_response(503, None, "<html>503 Service Temporarily Unavailable"),
            SlotBusy
        );
        assert_eq!(
            classify_response(413, None, "Request Entity Too Large"),
            TooLarge
        );
        assert!(matches!(
            classify_response(504, None, "Gateway Time-out"),
            Transient(_)
        ));
        assert!(matches!(
            classify_response(502, None, "Bad Gateway"),
            Transient(_)
        ));
        assert!(matches!(
            classify_response(500, Some(252), "Too many parts"),
            Transient(_)
        ));
        assert!(matches!(
            classify_response(
                500,
                Some(252),
                "Too many partitions for single INSERT block (more than 100)"
            ),
            Rejected(_)
        ));
        assert!(matches!(
            classify_response(500, Some(469), "Constraint `c` is violated"),
            Rejected(_)
        ));
        assert!(matches!(
            classify_response(503, Some(202), "too many queries"),
            Transient(_)
        ));
        assert!(matches!(
            classify_response(200, Some(241), "memory"),
            Transient(_)
        ));
        assert!(matches!(
            classify_response(404, Some(60), "Unknown table"),
            Permanent(_)
        ));
        assert!(matches!(
            classify_response(400, Some(27), "Cannot parse input"),
            Rejected(_)
        ));
        assert!(matches!(
            classify_response(400, Some(115), "Unknown setting"),
            Permanent(_)
        ));
        assert!(matches!(
            classify_response(516, Some(516), "Authentication failed"),
            Permanent(_)
        ));
        assert!(matches!(
            classify_response(403, None, "Forbidden"),
            Permanent(_)
        ));
        assert!(matches!(
            classify_response(429, None, "Too Many"),
            Transient(_)
        ));
    }
}
