//! The insert body: ClickHouse Native format (column by column), zstd-compressed.
//!
//! Column-wise layout puts similar bytes together and rows are ordered by (resource, url, client)
//! so compression finds long repeats; row order inside one insert is free because MergeTree sorts
//! anyway. The encoding is a pure function of the set of records: a rebuilt batch gives the same
//! bytes, which is what makes a retry deduplicate even without a token (block-hash dedup).

use std::io::Write;

use crate::anon_record::AnonRecord;

/// `(name, Native type)` of the columns sent, in order. Low-cardinality columns are sent as
/// `String`; ClickHouse converts on insert.
pub const COLUMNS: [(&str, &str); 11] = [
    ("timestamp", "DateTime"),
    ("resource_id", "UInt64"),
    ("bytes_sent", "UInt64"),
    ("request_time_milli", "UInt64"),
    ("response_status", "UInt16"),
    ("cache_status", "String"),
    ("method", "String"),
    ("remote_addr", "String"),
    ("url", "String"),
    ("source_partition", "Int32"),
    ("source_offset", "Int64"),
];

/// zstd level of request bodies. Fixed: the bytes of a rebuilt batch must not change.
pub const ZSTD_LEVEL: i32 = 3;

/// Sorts records into the canonical order of a body.
pub fn canonical_order(records: &mut [&AnonRecord]) {
    records.sort_by(|a, b| {
        (
            a.resource_id,
            &a.url,
            &a.remote_addr,
            a.source_partition,
            a.source_offset,
        )
            .cmp(&(
                b.resource_id,
                &b.url,
                &b.remote_addr,
                b.source_partition,
                b.source_offset,
            ))
    });
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// One Native block holding `records` in canonical order (uncompressed).
pub fn encode_native(records: &[&AnonRecord]) -> Vec<u8> {
    let mut rows: Vec<&AnonRecord> = records.to_vec();
    canonical_order(&mut rows);
    let text_bytes: usize = rows
        .iter()
        .map(|r| r.url.len() + r.remote_addr.len() + 16)
        .sum();
    let mut out = Vec::with_capacity(64 + rows.len() * 40 + text_bytes);
    varint(&mut out, COLUMNS.len() as u64);
    varint(&mut out, rows.len() as u64);
    for (name, ty) in COLUMNS {
        string(&mut out, name);
        string(&mut out, ty);
        for r in &rows {
            match name {
                "timestamp" => {
                    let secs = u32::try_from(r.timestamp_epoch_milli / 1000).unwrap_or(u32::MAX);
                    out.extend_from_slice(&secs.to_le_bytes());
                }
                "resource_id" => out.extend_from_slice(&r.resource_id.to_le_bytes()),
                "bytes_sent" => out.extend_from_slice(&r.bytes_sent.to_le_bytes()),
                "request_time_milli" => out.extend_from_slice(&r.request_time_milli.to_le_bytes()),
                "response_status" => out.extend_from_slice(&r.response_status.to_le_bytes()),
                "cache_status" => string(&mut out, &r.cache_status),
                "method" => string(&mut out, &r.method),
                "remote_addr" => string(&mut out, &r.remote_addr),
                "url" => string(&mut out, &r.url),
                "source_partition" => out.extend_from_slice(&r.source_partition.to_le_bytes()),
                "source_offset" => out.extend_from_slice(&r.source_offset.to_le_bytes()),
                other => unreachable!("column {other} has no encoder"),
            }
        }
    }
    out
}

/// The request body for `records`: Native, zstd at [`ZSTD_LEVEL`] (`Content-Encoding: zstd`).
pub fn encode_body(records: &[&AnonRecord]) -> Vec<u8> {
    encode_body_at(records, ZSTD_LEVEL)
}

/// [`encode_body`] at another zstd level (benchmarks compare levels with it).
pub fn encode_body_at(records: &[&AnonRecord], level: i32) -> Vec<u8> {
    let native = encode_native(records);
    let mut encoder = zstd::Encoder::new(Vec::with_capacity(native.len() / 4), level)
        .expect("zstd encoder with a valid level");
    // Single-threaded, no checksum/dictionary: output depends only on input and level.
    encoder
        .write_all(&native)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(p: i32, o: i64, resource: u64, url: &str) -> AnonRecord {
        AnonRecord {
            version: 1,
            timestamp_epoch_milli: 1_700_000_000_999,
            resource_id: resource,
            bytes_sent: 10,
            request_time_milli: 2,
            response_status: 200,
            cache_status: "HIT".into(),
            method: "GET".into(),
            remote_addr: "1.2.3.X".into(),
            url: url.into(),
            source_partition: p,
            source_offset: o,
        }
    }

    #[test]
    fn body_is_independent_of_input_order() {
        let a = rec(0, 1, 5, "/a");
        let b = rec(1, 7, 2, "/b");
        let c = rec(0, 2, 5, "/a");
        assert_eq!(encode_body(&[&a, &b, &c]), encode_body(&[&c, &a, &b]));
        assert_ne!(encode_body(&[&a, &b]), encode_body(&[&a, &c]));
    }

    #[test]
    fn native_layout() {
        let a = rec(0, 1, 5, "/a");
        let n = encode_native(&[&a]);
        assert_eq!(&n[..2], &[11, 1], "11 columns, 1 row");
        assert_eq!(&n[2..12], b"\x09timestamp", "first column name");
        assert_eq!(&n[12..21], b"\x08DateTime");
        assert_eq!(
            &n[21..25],
            &1_700_000_000u32.to_le_bytes(),
            "seconds, millis dropped"
        );
        let decompressed = zstd::decode_all(&encode_body(&[&a])[..]).unwrap();
        assert_eq!(decompressed, n);
    }

    #[test]
    fn varints() {
        for (v, bytes) in [
            (0u64, vec![0u8]),
            (127, vec![127]),
            (128, vec![0x80, 1]),
            (300, vec![0xac, 2]),
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out, bytes, "{v}");
        }
    }
}
