//! The validity policy of a decoded input record: one pure decision per field, applied by stage
//! one before anything is produced. A record passes whole, or is rejected with a
//! [`Reason`] and a text naming the field and the bound (it then goes to the dead-letter topic
//! with its original bytes). The table in `docs/FORMATS.md` ("Validity policy") is this module.
//!
//! Nothing here is corrected silently: stage one's corrections, an address that is not an IP
//! address becoming `invalid` ([`crate::anonymize`]) and a URL's query redacted by
//! `anonymizer.url_query` ([`crate::url_query`], applied before this check), are counted where
//! the anonymizer sends the record.
//! "Now" is a parameter, so the decision is reproducible and property-testable.

use std::time::Duration;

use crate::config::Settings;
use crate::dead_letter::Reason;
use crate::record::RecordView;

/// Last millisecond ClickHouse `DateTime` (UInt32 seconds) can hold: 2106-02-07 06:28:15.999 UTC.
/// The loader stores whole seconds, so every millisecond of the last second is still exact.
pub const DATETIME_MAX_MS: u64 = u32::MAX as u64 * 1000 + 999;

/// `method` and `cache_status` are short tokens (the longest standard method, `UPDATEREDIRECTREF`,
/// has 17 bytes; nginx's cache statuses at most 11); 64 bytes leaves room for extensions while a
/// longer one is garbage that would bloat `LowCardinality` dictionaries.
pub const MAX_LABEL_BYTES: usize = 64;

/// Longest address text parsed: an IPv6 address with an embedded IPv4 (`INET6_ADDRSTRLEN` = 46)
/// and surrounding whitespace fits; anything longer is not an address and becomes `invalid`
/// without parsing (the text is never stored, so no need to dead-letter it).
pub const MAX_ADDRESS_BYTES: usize = 64;

/// HTTP status codes are three digits, 100 to 599 (RFC 9110, section 15).
pub const STATUS_RANGE: std::ops::RangeInclusive<u16> = 100..=599;

/// 1 TiB in one response: far beyond any real object, and it keeps the per-minute `sum()` rollups
/// (UInt64) at least 2^24 records away from wrapping.
pub const MAX_BYTES_SENT: u64 = 1 << 40;

/// About 49.7 days (u32 milliseconds): no HTTP request lasts longer; the bound keeps
/// `sum(request_time_milli)` rollups from wrapping.
pub const MAX_REQUEST_TIME_MILLI: u64 = u32::MAX as u64;

/// The configurable part of the policy, derived from settings once at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Timestamps later than now + this are rejected (`anonymizer.max_future_skew`).
    pub max_future_skew_ms: u64,
    /// Timestamps earlier than now − this are rejected; `None` when the raw table keeps rows
    /// forever (`clickhouse.raw_ttl_days` = 0). Raw TTL minus `anonymizer.retention_margin`.
    pub max_age_ms: Option<u64>,
    /// Longest `url` in bytes (`anonymizer.max_url_bytes`).
    pub max_url_bytes: usize,
}

impl Policy {
    /// The policy the settings describe; settings are assumed validated (margin < TTL).
    pub fn from_settings(s: &Settings) -> Policy {
        let a = &s.anonymizer;
        let ttl = Duration::from_secs(u64::from(s.clickhouse.raw_ttl_days) * 86_400);
        Policy {
            max_future_skew_ms: a.max_future_skew.as_millis() as u64,
            max_age_ms: (s.clickhouse.raw_ttl_days > 0)
                .then(|| ttl.saturating_sub(a.retention_margin).as_millis() as u64),
            max_url_bytes: a.max_url_bytes,
        }
    }
}

/// Why a record is rejected: the dead-letter reason and a text for `edgelog.error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub error: String,
}

fn reject(reason: Reason, error: String) -> Result<(), Rejection> {
    Err(Rejection { reason, error })
}

/// The whole policy: `Ok` when every field is storable as it is.
pub fn check(r: &RecordView<'_>, policy: &Policy, now_ms: u64) -> Result<(), Rejection> {
    check_timestamp(r.timestamp_epoch_milli, policy, now_ms)?;
    check_numbers(r)?;
    check_texts(r, policy)
}

/// Order matters only for the reason given: out of `DateTime` first (a property of the value
/// alone), then the windows around now.
pub fn check_timestamp(ts: u64, policy: &Policy, now_ms: u64) -> Result<(), Rejection> {
    if ts > DATETIME_MAX_MS {
        return reject(
            Reason::TimestampOutOfRange,
            format!("timestamp_epoch_milli {ts} is after DateTime's last second (2106-02-07 06:28:15 UTC, {DATETIME_MAX_MS})"),
        );
    }
    let latest = now_ms.saturating_add(policy.max_future_skew_ms);
    if ts > latest {
        return reject(
            Reason::TimestampInFuture,
            format!(
                "timestamp_epoch_milli {ts} is more than {} ms after now ({now_ms})",
                policy.max_future_skew_ms
            ),
        );
    }
    if let Some(max_age) = policy.max_age_ms {
        let earliest = now_ms.saturating_sub(max_age);
        if ts < earliest {
            return reject(
                Reason::OlderThanRetention,
                format!("timestamp_epoch_milli {ts} is more than {max_age} ms before now ({now_ms}): the raw table's TTL would drop it"),
            );
        }
    }
    Ok(())
}

fn check_numbers(r: &RecordView<'_>) -> Result<(), Rejection> {
    if !STATUS_RANGE.contains(&r.response_status) {
        return reject(
            Reason::ValueOutOfRange,
            format!("response_status {} is not 100-599", r.response_status),
        );
    }
    for (field, value, max) in [
        ("bytes_sent", r.bytes_sent, MAX_BYTES_SENT),
        (
            "request_time_milli",
            r.request_time_milli,
            MAX_REQUEST_TIME_MILLI,
        ),
    ] {
        if value > max {
            return reject(
                Reason::ValueOutOfRange,
                format!("{field} {value} is over {max}"),
            );
        }
    }
    Ok(())
}

fn check_texts(r: &RecordView<'_>, policy: &Policy) -> Result<(), Rejection> {
    for (field, text, max) in [
        ("url", r.url, policy.max_url_bytes),
        ("method", r.method, MAX_LABEL_BYTES),
        ("cache_status", r.cache_status, MAX_LABEL_BYTES),
    ] {
        if text.len() > max {
            return reject(
                Reason::FieldTooLong,
                format!("{field} has {} bytes, over {max}", text.len()),
            );
        }
    }
    Ok(())
}

/// The address text worth parsing: `None` (→ `invalid`) when it is too long to be an address.
pub fn address_to_parse(addr: &str) -> Option<&str> {
    (addr.len() <= MAX_ADDRESS_BYTES).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const NOW: u64 = 1_780_000_000_000;
    const DAY: u64 = 86_400_000;

    pub(crate) fn policy() -> Policy {
        Policy {
            max_future_skew_ms: 3_600_000,
            max_age_ms: Some(29 * DAY),
            max_url_bytes: 8192,
        }
    }

    fn view(ts: u64) -> RecordView<'static> {
        RecordView {
            timestamp_epoch_milli: ts,
            resource_id: 1,
            bytes_sent: 100,
            request_time_milli: 5,
            response_status: 200,
            cache_status: "HIT",
            method: "GET",
            remote_addr: "1.2.3.4",
            url: "/a",
        }
    }

    fn reason(r: &RecordView<'_>, p: &Policy) -> Option<Reason> {
        check(r, p, NOW).err().map(|e| e.reason)
    }

    #[test]
    fn defaults_from_settings() {
        let p = Policy::from_settings(&Settings::default());
        assert_eq!(
            p,
            policy(),
            "30-day TTL minus a 1-day margin, 1 h skew, 8 KiB URLs"
        );
        let mut s = Settings::default();
        s.clickhouse.raw_ttl_days = 0;
        assert_eq!(Policy::from_settings(&s).max_age_ms, None);
    }

    #[test]
    fn time_boundaries() {
        let p = policy();
        let skew = p.max_future_skew_ms;
        let age = p.max_age_ms.unwrap();
        use Reason::*;
        let table = [
            (NOW, None),
            (NOW + skew, None),
            (NOW + skew + 1, Some(TimestampInFuture)),
            (NOW - age, None),
            (NOW - age - 1, Some(OlderThanRetention)),
            (0, Some(OlderThanRetention)),
            (DATETIME_MAX_MS + 1, Some(TimestampOutOfRange)),
            (u64::MAX, Some(TimestampOutOfRange)),
        ];
        for (ts, expected) in table {
            assert_eq!(reason(&view(ts), &p), expected, "{ts}");
        }
        // Without a TTL: 1970 and DateTime's last millisecond are storable (when "now" allows).
        let forever = Policy {
            max_age_ms: None,
            ..p
        };
        assert_eq!(reason(&view(0), &forever), None);
        assert_eq!(
            check(&view(DATETIME_MAX_MS), &forever, DATETIME_MAX_MS),
            Ok(())
        );
    }

    #[test]
    fn field_boundaries() {
        let p = policy();
        let url_ok = "u".repeat(8192);
        let url_long = "u".repeat(8193);
        let label_long = "L".repeat(MAX_LABEL_BYTES + 1);
        let cases: Vec<(RecordView<'_>, Option<Reason>)> = vec![
            (
                RecordView {
                    url: &url_ok,
                    ..view(NOW)
                },
                None,
            ),
            (
                RecordView {
                    url: &url_long,
                    ..view(NOW)
                },
                Some(Reason::FieldTooLong),
            ),
            (
                RecordView {
                    method: &label_long,
                    ..view(NOW)
                },
                Some(Reason::FieldTooLong),
            ),
            (
                RecordView {
                    cache_status: &label_long,
                    ..view(NOW)
                },
                Some(Reason::FieldTooLong),
            ),
            (
                RecordView {
                    method: "",
                    cache_status: "",
                    url: "",
                    ..view(NOW)
                },
                None,
            ),
            (
                RecordView {
                    response_status: 99,
                    ..view(NOW)
                },
                Some(Reason::ValueOutOfRange),
            ),
            (
                RecordView {
                    response_status: 100,
                    ..view(NOW)
                },
                None,
            ),
            (
                RecordView {
                    response_status: 599,
                    ..view(NOW)
                },
                None,
            ),
            (
                RecordView {
                    response_status: 600,
                    ..view(NOW)
                },
                Some(Reason::ValueOutOfRange),
            ),
            (
                RecordView {
                    response_status: 0,
                    ..view(NOW)
                },
                Some(Reason::ValueOutOfRange),
            ),
            (
                RecordView {
                    bytes_sent: MAX_BYTES_SENT,
                    ..view(NOW)
                },
                None,
            ),
            (
                RecordView {
                    bytes_sent: u64::MAX,
                    ..view(NOW)
                },
                Some(Reason::ValueOutOfRange),
            ),
            (
                RecordView {
                    request_time_milli: u64::MAX,
                    ..view(NOW)
                },
                Some(Reason::ValueOutOfRange),
            ),
            (
                RecordView {
                    resource_id: u64::MAX,
                    ..view(NOW)
                },
                None,
            ),
        ];
        for (r, expected) in cases {
            assert_eq!(reason(&r, &p), expected, "{r:?}");
        }
    }

    #[test]
    fn long_addresses_are_not_parsed() {
        assert_eq!(address_to_parse("1.2.3.4"), Some("1.2.3.4"));
        assert_eq!(address_to_parse(&"1".repeat(65)), None);
    }
}

#[cfg(test)]
mod props {
    use super::tests::{policy, NOW};
    use super::*;
    use proptest::prelude::*;

    type Parts = ((u64, u64, u64, u16), (String, String, String));

    fn any_view_parts() -> impl Strategy<Value = Parts> {
        (
            (
                prop_oneof![any::<u64>(), NOW - 40 * 86_400_000..NOW + 7_200_000],
                prop_oneof![any::<u64>(), 0..MAX_BYTES_SENT + 2],
                prop_oneof![any::<u64>(), 0..MAX_REQUEST_TIME_MILLI + 2],
                any::<u16>(),
            ),
            (".{0,80}", ".{0,80}", prop_oneof![".{0,20}", "u{8180,8200}"]),
        )
    }

    proptest! {
        /// The verdict is exactly the conjunction of the documented per-field bounds, and every
        /// rejection names its field or bound in the text.
        #[test]
        fn verdict_matches_the_documented_bounds(
            ((ts, bytes, millis, status), (method, cache, url)) in any_view_parts(),
            now in prop_oneof![Just(NOW), any::<u64>()],
        ) {
            let p = policy();
            let r = RecordView {
                timestamp_epoch_milli: ts,
                resource_id: 0,
                bytes_sent: bytes,
                request_time_milli: millis,
                response_status: status,
                cache_status: &cache,
                method: &method,
                remote_addr: "",
                url: &url,
            };
            let storable = ts <= DATETIME_MAX_MS
                && ts <= now.saturating_add(p.max_future_skew_ms)
                && ts >= now.saturating_sub(p.max_age_ms.unwrap())
                && (100..=599).contains(&status)
                && bytes <= MAX_BYTES_SENT
                && millis <= MAX_REQUEST_TIME_MILLI
                && url.len() <= p.max_url_bytes
                && method.len() <= MAX_LABEL_BYTES
                && cache.len() <= MAX_LABEL_BYTES;
            let verdict = check(&r, &p, now);
            prop_assert_eq!(verdict.is_ok(), storable, "{:?}", verdict);
            if let Err(e) = verdict {
                prop_assert!(!e.error.is_empty() && Reason::ALL.contains(&e.reason));
            }
        }
    }
}
