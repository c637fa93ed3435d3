//! One insert request through the proxy (its URL is [`crate::body::insert_url`]), and the
//! classification of its outcome into what the loader does next.

use std::net::IpAddr;
use std::time::Duration;

use crate::body::BodyCompression;
use crate::clickhouse::{ClickHouseClient, ClickHouseError, ClientOptions, TlsFiles};
use crate::config::ClickHouseSettings;
use crate::loader::classify::{classify_clickhouse, ErrorClass};

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
    /// A client for `settings.url` as `settings.user`, with its TLS files. `source_address` pins
    /// the local address, which is what the proxy budgets by. Fails at start-up on TLS files that
    /// cannot be used.
    pub fn new(
        settings: &ClickHouseSettings,
        source_address: Option<IpAddr>,
        timeout: Duration,
    ) -> Result<InsertClient, ClickHouseError> {
        let options = ClientOptions {
            source_address,
            timeout,
            // One request per minute: a pooled connection would have been closed by nginx anyway.
            reuse_connections: false,
            tls: TlsFiles::from_settings(settings),
        };
        // Every request's URL is given whole to `send` (`insert_url`); the base URL tells the
        // client whether it needs TLS.
        Ok(InsertClient {
            client: ClickHouseClient::with_options(
                &settings.url,
                &settings.user,
                &settings.password,
                &options,
            )?,
        })
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
            // A certificate the client does not trust (or a server refusing ours) stays so until
            // someone changes a certificate or a setting: retrying would loop forever.
            Err(e @ (ClickHouseError::Tls { .. } | ClickHouseError::TlsSetup(_))) => {
                Outcome::Permanent(e.to_string())
            }
            Err(e) => Outcome::Transient(format!("request failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
