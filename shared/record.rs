//! The access-log record and its Cap'n Proto wire form (the input topic `http_log`).

use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use serde::{Deserialize, Serialize};

use crate::http_log_capnp::http_log_record;

/// One HTTP request served by an edge server, as the edge writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpLogRecord {
    pub timestamp_epoch_milli: u64,
    pub resource_id: u64,
    pub bytes_sent: u64,
    pub request_time_milli: u64,
    pub response_status: u16,
    pub cache_status: String,
    pub method: String,
    pub remote_addr: String,
    pub url: String,
}

/// Why a payload is not a valid `HttpLogRecord`.
#[derive(Debug, thiserror::Error)]
#[error("not a Cap'n Proto HttpLogRecord: {0}")]
pub struct DecodeError(String);

impl From<capnp::Error> for DecodeError {
    fn from(e: capnp::Error) -> Self {
        DecodeError(e.to_string())
    }
}

impl From<std::str::Utf8Error> for DecodeError {
    fn from(e: std::str::Utf8Error) -> Self {
        DecodeError(format!("text field is not UTF-8: {e}"))
    }
}

/// Words needed for one record in a single segment: root pointer, 5 data words, 4 pointers, texts.
fn single_segment_words(r: &HttpLogRecord) -> u32 {
    let text_words = |s: &str| (s.len() + 1).div_ceil(8) as u32;
    1 + 5
        + 4
        + text_words(&r.cache_status)
        + text_words(&r.method)
        + text_words(&r.remote_addr)
        + text_words(&r.url)
}

/// Encodes as an unpacked, single-segment Cap'n Proto message (what a typical producer writes).
pub fn encode_capnp(r: &HttpLogRecord) -> Vec<u8> {
    let mut message =
        Builder::new(HeapAllocator::new().first_segment_words(single_segment_words(r)));
    let mut b = message.init_root::<http_log_record::Builder>();
    b.set_timestamp_epoch_milli(r.timestamp_epoch_milli);
    b.set_resource_id(r.resource_id);
    b.set_bytes_sent(r.bytes_sent);
    b.set_request_time_milli(r.request_time_milli);
    b.set_response_status(r.response_status);
    b.set_cache_status(r.cache_status.as_str());
    b.set_method(r.method.as_str());
    b.set_remote_addr(r.remote_addr.as_str());
    b.set_url(r.url.as_str());
    capnp::serialize::write_message_to_words(&message)
}

/// A decoded record whose text borrows from the message bytes (no copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub timestamp_epoch_milli: u64,
    pub resource_id: u64,
    pub bytes_sent: u64,
    pub request_time_milli: u64,
    pub response_status: u16,
    pub cache_status: &'a str,
    pub method: &'a str,
    pub remote_addr: &'a str,
    pub url: &'a str,
}

/// Decodes a payload zero-copy and hands the view to `f`. Works on unaligned input (the capnp
/// `unaligned` feature: Kafka hands out payloads at any address). Bytes after the message or a
/// text field that is not UTF-8 are errors.
pub fn with_record<R>(
    payload: &[u8],
    f: impl FnOnce(RecordView<'_>) -> R,
) -> Result<R, DecodeError> {
    let mut rest = payload;
    let message =
        capnp::serialize::read_message_from_flat_slice_no_alloc(&mut rest, ReaderOptions::new())?;
    if !rest.is_empty() {
        return Err(DecodeError(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    let r = message.get_root::<http_log_record::Reader>()?;
    let view = RecordView {
        timestamp_epoch_milli: r.get_timestamp_epoch_milli(),
        resource_id: r.get_resource_id(),
        bytes_sent: r.get_bytes_sent(),
        request_time_milli: r.get_request_time_milli(),
        response_status: r.get_response_status(),
        cache_status: r.get_cache_status()?.to_str()?,
        method: r.get_method()?.to_str()?,
        remote_addr: r.get_remote_addr()?.to_str()?,
        url: r.get_url()?.to_str()?,
    };
    Ok(f(view))
}

/// Decodes a payload into an owned record.
pub fn decode_capnp(payload: &[u8]) -> Result<HttpLogRecord, DecodeError> {
    with_record(payload, |r| HttpLogRecord {
        timestamp_epoch_milli: r.timestamp_epoch_milli,
        resource_id: r.resource_id,
        bytes_sent: r.bytes_sent,
        request_time_milli: r.request_time_milli,
        response_status: r.response_status,
        cache_status: r.cache_status.to_owned(),
        method: r.method.to_owned(),
        remote_addr: r.remote_addr.to_owned(),
        url: r.url.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> HttpLogRecord {
        HttpLogRecord {
            timestamp_epoch_milli: 1_700_000_000_123,
            resource_id: 42,
            bytes_sent: 1234,
            request_time_milli: 17,
            response_status: 404,
            cache_status: "MISS".into(),
            method: "GET".into(),
            remote_addr: "1.2.3.4".into(),
            url: "/r42/assets/7.jpg".into(),
        }
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(decode_capnp(&encode_capnp(&r)).unwrap(), r);
    }

    #[test]
    fn encodes_a_single_segment_without_slack() {
        let bytes = encode_capnp(&sample());
        let segments = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) + 1;
        assert_eq!(segments, 1);
        let words = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        assert_eq!(bytes.len(), 8 + words * 8);
        assert_eq!(words as u32, single_segment_words(&sample()));
    }

    #[test]
    fn decodes_unaligned_payloads() {
        let bytes = encode_capnp(&sample());
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode_capnp(&shifted[1..]).unwrap(), sample());
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(decode_capnp(b"").is_err());
        assert!(decode_capnp(b"garbage: not capnp at all").is_err());
        let bytes = encode_capnp(&sample());
        assert!(decode_capnp(&bytes[..bytes.len() / 2]).is_err());
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert!(decode_capnp(&trailing).is_err(), "trailing bytes");
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert!(decode_capnp(&trailing).is_err(), "trailing bytes");
    }
}

/// Property tests of the Cap'n Proto round trip.
#[cfg(test)]
pub(crate) mod props {
    use super::*;
    use proptest::prelude::*;

    /// Any record, text fields any Unicode (NUL included: Cap'n Proto text is length-prefixed).
    pub(crate) fn any_record() -> impl Strategy<Value = HttpLogRecord> {
        (
            any::<(u64, u64, u64, u64, u16)>(),
            any::<(String, String, String, String)>(),
        )
            .prop_map(
                |(
                    (timestamp_epoch_milli, resource_id, bytes_sent, request_time_milli, status),
                    (cache_status, method, remote_addr, url),
                )| HttpLogRecord {
                    timestamp_epoch_milli,
                    resource_id,
                    bytes_sent,
                    request_time_milli,
                    response_status: status,
                    cache_status,
                    method,
                    remote_addr,
                    url,
                },
            )
    }

    proptest! {
        #[test]
        fn capnp_round_trips(r in any_record(), shift in 0usize..8) {
            let bytes = encode_capnp(&r);
            prop_assert_eq!(bytes.len() % 8, 0);
            let words = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
            prop_assert_eq!(words, single_segment_words(&r), "one segment, no slack");
            // Kafka payloads start at any address.
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(&bytes);
            prop_assert_eq!(decode_capnp(&shifted[shift..]).unwrap(), r);
        }

        #[test]
        fn capnp_rejects_every_truncation(r in any_record(), cut in any::<prop::sample::Index>()) {
            let bytes = encode_capnp(&r);
            let cut = cut.index(bytes.len());
            prop_assert!(decode_capnp(&bytes[..cut]).is_err(), "cut at {}", cut);
        }
    }
}
