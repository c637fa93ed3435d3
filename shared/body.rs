//! The insert body: ClickHouse Native format (column by column), xz-compressed (or zstd, or gzip
//! for servers that take neither).
//!
//! Column-wise layout puts similar bytes together and rows are ordered by (resource, url, client)
//! so compression finds long repeats; row order inside one insert is free because MergeTree sorts
//! anyway. The encoding is a pure function of the set of records: a rebuilt batch gives the same
//! bytes, which is what makes a retry deduplicate even without a token (block-hash dedup).

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::anon_record::AnonRecord;

/// How request bodies are compressed (`loader.body_compression`). Fixed per deployment: a rebuilt
/// batch must have the same bytes as the first attempt for token-less dedup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyCompression {
    /// xz (LZMA2) at [`XZ_PRESET`]: the most rows per body, about 9% more than zstd for about the
    /// same CPU per row (docs/BENCHMARKS.md).
    #[default]
    Xz,
    /// zstd at [`ZSTD_LEVEL`].
    Zstd,
    /// gzip at level 9, for servers that decode only gzip and deflate request bodies (ClickHouse
    /// 22.1, the original image). Fewer rows per body.
    Gzip,
}

impl BodyCompression {
    /// Every compression the loader offers (tests go through all of them).
    pub const ALL: [BodyCompression; 3] = [
        BodyCompression::Xz,
        BodyCompression::Zstd,
        BodyCompression::Gzip,
    ];

    /// The `Content-Encoding` header value ClickHouse decodes the body by.
    pub fn content_encoding(self) -> &'static str {
        match self {
            BodyCompression::Xz => "xz",
            BodyCompression::Zstd => "zstd",
            BodyCompression::Gzip => "gzip",
        }
    }

    /// Final body size over the planning size (zstd at [`PLANNING_ZSTD_LEVEL`]) before any
    /// batch taught better; measured on the producer's traffic, rounded up so that a first body
    /// rarely needs shrinking (which re-encodes it).
    pub fn initial_planning_ratio(self) -> f64 {
        match self {
            BodyCompression::Xz => 0.78,
            BodyCompression::Zstd => 0.85,
            BodyCompression::Gzip => 1.05,
        }
    }
}

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

/// zstd level of request bodies: the level that fits the most rows under the proxy's 1 MiB
/// for about 2 s of CPU per 64 s slot (docs/BENCHMARKS.md). Fixed, like [`XZ_PRESET`], so that a
/// rebuilt batch has the same bytes as its first attempt.
pub const ZSTD_LEVEL: i32 = 19;

/// xz preset of request bodies: xz's own default. Higher presets only enlarge the dictionary,
/// and a body's input (~8 MB) already fits preset 6's; the "extreme" variants came out larger
/// on the producer's records.
pub const XZ_PRESET: u32 = 6;

/// The cheap level batch planning sizes candidates with (scaled by a learned ratio).
pub const PLANNING_ZSTD_LEVEL: i32 = 3;

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

/// The request body for `records`: Native, compressed as `compression` says (xz at
/// [`XZ_PRESET`], zstd at [`ZSTD_LEVEL`] or gzip at level 9).
pub fn encode_body(records: &[&AnonRecord], compression: BodyCompression) -> Vec<u8> {
    match compression {
        BodyCompression::Xz => {
            // Single-threaded liblzma, bundled (one version everywhere): the output depends only
            // on the input.
            let mut xz = liblzma::write::XzEncoder::new(Vec::new(), XZ_PRESET);
            xz.write_all(&encode_native(records))
                .expect("writing to a Vec cannot fail");
            xz.finish().expect("writing to a Vec cannot fail")
        }
        BodyCompression::Zstd => encode_body_at(records, ZSTD_LEVEL),
        BodyCompression::Gzip => {
            // flate2's gzip header carries no timestamp or file name (mtime 0): the output
            // depends only on the input.
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            gz.write_all(&encode_native(records))
                .expect("writing to a Vec cannot fail");
            gz.finish().expect("writing to a Vec cannot fail")
        }
    }
}

/// [`encode_body`] at another zstd level (benchmarks compare levels with it).
pub fn encode_body_at(records: &[&AnonRecord], level: i32) -> Vec<u8> {
    let native = encode_native(records);
    // One-shot: zstd knows the input size and sizes its tables to it (a streaming encoder at
    // level 19 allocates for the largest input, which made small bodies slow). Single-threaded,
    // no dictionary: the output depends only on the input and the level.
    zstd::bulk::compress(&native, level).expect("zstd with a valid level")
}

// The request that carries a body: statement, pinned settings and token, all in the URL.

/// Settings pinned on every insert. A retried batch must be cut into the same blocks as the first
/// attempt (dedup works per block), so block sizes are fixed here, never left to server defaults.
/// Every one of them exists in ClickHouse 22.1 (an unknown setting fails the request). The Native
/// String -> LowCardinality conversion the body relies on is on by default on every version.
pub const INSERT_SETTINGS: [(&str, &str); 12] = [
    ("async_insert", "0"),
    // Cluster mode (`http_log` a Distributed table): the answer comes after every shard has
    // written its rows, each under the request's dedup token, so a 200 means the whole batch
    // landed and a retry after a failure deduplicates on each shard (docs/ARCHITECTURE.md,
    // "Cluster mode"). No effect on a MergeTree table. (`distributed_foreground_insert` since
    // 23.x; this older name is what 22.1 knows, and is kept as its alias.)
    ("insert_distributed_sync", "1"),
    ("insert_deduplicate", "1"),
    ("deduplicate_blocks_in_dependent_materialized_views", "1"),
    ("max_insert_block_size", "1048576"),
    ("min_insert_block_size_rows", "0"),
    ("min_insert_block_size_bytes", "0"),
    // A view's output blocks are deduplicated by their position in the view's output
    // (`<token>_<n>`), so a retry is exact only if every view cuts its GROUP BY output exactly as
    // the first attempt did. Two-level aggregation cuts it into 256 bucket blocks, and whether a
    // GROUP BY goes two-level depended on the server's statistics of earlier queries (any
    // database's): measured on 26.9, a batch re-sent after an unrelated large insert was cut into
    // 256 blocks where the first attempt had one, and 255 of them landed again (docs/
    // LIMITATIONS.md, "Rollups and retried inserts"). Single-level aggregation with a fixed block
    // size cuts the same groups into the same number of blocks every time, and a few blocks per
    // view keep the dedup windows long.
    ("group_by_two_level_threshold", "0"),
    ("group_by_two_level_threshold_bytes", "0"),
    ("max_block_size", "65409"),
    // Without these, the view's output reached its table as up to ~256 small blocks per insert,
    // each taking a slot of the target's dedup window: a retry was then caught only within ~39
    // inserts (measured, docs/BENCHMARKS.md).
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
        // The views' output is cut the same way on every attempt (single-level GROUP BY).
        assert_eq!(get("group_by_two_level_threshold"), Some("0"));
        assert_eq!(get("group_by_two_level_threshold_bytes"), Some("0"));
        assert_eq!(get("max_block_size"), Some("65409"));
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
        assert_eq!(
            encode_body(&[&a, &b, &c], BodyCompression::Zstd),
            encode_body(&[&c, &a, &b], BodyCompression::Zstd)
        );
        assert_ne!(
            encode_body(&[&a, &b], BodyCompression::Zstd),
            encode_body(&[&a, &c], BodyCompression::Zstd)
        );
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
        let decompressed =
            zstd::decode_all(&encode_body(&[&a], BodyCompression::Zstd)[..]).unwrap();
        assert_eq!(decompressed, n);
    }

    #[test]
    fn gzip_body_is_the_native_block() {
        let a = rec(0, 1, 5, "/a");
        let gz = encode_body(&[&a], BodyCompression::Gzip);
        assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "no timestamp in the header");
        let mut native = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut native)
            .unwrap();
        assert_eq!(native, encode_native(&[&a]));
    }

    #[test]
    fn xz_body_is_the_native_block() {
        let a = rec(0, 1, 5, "/a");
        let xz = encode_body(&[&a], BodyCompression::Xz);
        assert_eq!(&xz[..6], b"\xfd7zXZ\0", "xz magic");
        let mut native = Vec::new();
        std::io::Read::read_to_end(&mut liblzma::read::XzDecoder::new(&xz[..]), &mut native)
            .unwrap();
        assert_eq!(native, encode_native(&[&a]));
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

/// Property tests: a test-only Native decoder reads every body back to the records it was made of.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq)]
    enum Column {
        DateTime(Vec<u32>),
        UInt64(Vec<u64>),
        UInt16(Vec<u16>),
        Int32(Vec<i32>),
        Int64(Vec<i64>),
        String(Vec<String>),
    }

    /// One decoded Native block: `(name, type, values)` per column.
    type Block = Vec<(String, String, Column)>;

    struct Reader<'a>(&'a [u8]);

    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            if self.0.len() < n {
                return Err(format!("{n} bytes wanted, {} left", self.0.len()));
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
            Ok(self.take(N)?.try_into().expect("took N"))
        }
        /// LEB128, as ClickHouse's `readVarUInt` (at most 10 bytes).
        fn varint(&mut self) -> Result<u64, String> {
            let mut v = 0u64;
            for i in 0..10 {
                let b = self.take(1)?[0];
                v |= u64::from(b & 0x7f) << (7 * i);
                if b & 0x80 == 0 {
                    return Ok(v);
                }
            }
            Err("varint longer than 10 bytes".into())
        }
        fn string(&mut self) -> Result<String, String> {
            let n = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
            String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
        }
    }

    /// Decompresses a body and decodes its one Native block, for the types the loader sends.
    fn decode_body(body: &[u8]) -> Result<Block, String> {
        let native = zstd::decode_all(body).map_err(|e| e.to_string())?;
        let mut r = Reader(&native);
        let columns = r.varint()?;
        let rows = usize::try_from(r.varint()?).map_err(|e| e.to_string())?;
        let mut block = Vec::new();
        for _ in 0..columns {
            let name = r.string()?;
            let ty = r.string()?;
            let values = match ty.as_str() {
                "DateTime" => Column::DateTime(
                    (0..rows)
                        .map(|_| r.array().map(u32::from_le_bytes))
                        .collect::<Result<_, _>>()?,
                ),
                "UInt64" => Column::UInt64(
                    (0..rows)
                        .map(|_| r.array().map(u64::from_le_bytes))
                        .collect::<Result<_, _>>()?,
                ),
                "UInt16" => Column::UInt16(
                    (0..rows)
                        .map(|_| r.array().map(u16::from_le_bytes))
                        .collect::<Result<_, _>>()?,
                ),
                "Int32" => Column::Int32(
                    (0..rows)
                        .map(|_| r.array().map(i32::from_le_bytes))
                        .collect::<Result<_, _>>()?,
                ),
                "Int64" => Column::Int64(
                    (0..rows)
                        .map(|_| r.array().map(i64::from_le_bytes))
                        .collect::<Result<_, _>>()?,
                ),
                "String" => {
                    Column::String((0..rows).map(|_| r.string()).collect::<Result<_, _>>()?)
                }
                other => return Err(format!("column {name}: type {other} not decoded here")),
            };
            block.push((name, ty, values));
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the block", r.0.len()));
        }
        Ok(block)
    }

    /// The block's rows turned back into records (`version` is not sent; timestamps are seconds).
    fn rows(block: &Block) -> Vec<AnonRecord> {
        let col = |name: &str| {
            &block
                .iter()
                .find(|c| c.0 == name)
                .expect("column present")
                .2
        };
        let n = match col("url") {
            Column::String(v) => v.len(),
            other => panic!("url is {other:?}"),
        };
        (0..n)
            .map(|i| {
                let u64_at = |name| match col(name) {
                    Column::UInt64(v) => v[i],
                    other => panic!("{name} is {other:?}"),
                };
                let str_at = |name| match col(name) {
                    Column::String(v) => v[i].clone(),
                    other => panic!("{name} is {other:?}"),
                };
                AnonRecord {
                    version: 1,
                    timestamp_epoch_milli: match col("timestamp") {
                        Column::DateTime(v) => u64::from(v[i]) * 1000,
                        other => panic!("timestamp is {other:?}"),
                    },
                    resource_id: u64_at("resource_id"),
                    bytes_sent: u64_at("bytes_sent"),
                    request_time_milli: u64_at("request_time_milli"),
                    response_status: match col("response_status") {
                        Column::UInt16(v) => v[i],
                        other => panic!("response_status is {other:?}"),
                    },
                    cache_status: str_at("cache_status"),
                    method: str_at("method"),
                    remote_addr: str_at("remote_addr"),
                    url: str_at("url"),
                    source_partition: match col("source_partition") {
                        Column::Int32(v) => v[i],
                        other => panic!("source_partition is {other:?}"),
                    },
                    source_offset: match col("source_offset") {
                        Column::Int64(v) => v[i],
                        other => panic!("source_offset is {other:?}"),
                    },
                }
            })
            .collect()
    }

    /// What a record looks like after the trip: DateTime holds whole seconds, saturated at the
    /// type's end (2106) rather than wrapped.
    fn as_sent(r: &AnonRecord) -> AnonRecord {
        let secs = (r.timestamp_epoch_milli / 1000).min(u64::from(u32::MAX));
        AnonRecord {
            timestamp_epoch_milli: secs * 1000,
            ..r.clone()
        }
    }

    fn any_record() -> impl Strategy<Value = AnonRecord> {
        (
            (
                any::<u64>(),
                0u64..4,
                any::<u64>(),
                any::<u64>(),
                any::<u16>(),
            ),
            (
                "HIT|MISS|STALE|",
                "GET|HEAD|",
                ".{0,12}",
                prop_oneof!["/[a-z]{0,3}", ".{0,200}"],
            ),
            (0i32..3, any::<i64>()),
        )
            .prop_map(
                |((ts, resource, bytes, millis, status), (cache, method, addr, url), (p, o))| {
                    AnonRecord {
                        version: 1,
                        timestamp_epoch_milli: ts,
                        resource_id: resource,
                        bytes_sent: bytes,
                        request_time_milli: millis,
                        response_status: status,
                        cache_status: cache,
                        method,
                        remote_addr: addr,
                        url,
                        source_partition: p,
                        source_offset: o,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn native_body_decodes_to_the_records(
            records in prop::collection::vec(any_record(), 0..40),
            level in -5i32..=9,
        ) {
            let refs: Vec<&AnonRecord> = records.iter().collect();
            let block = decode_body(&encode_body_at(&refs, level)).map_err(TestCaseError::fail)?;
            let header: Vec<(&str, &str)> = block.iter().map(|c| (c.0.as_str(), c.1.as_str())).collect();
            prop_assert_eq!(header, COLUMNS.to_vec());
            let decoded = rows(&block);
            prop_assert_eq!(decoded.len(), records.len());
            // Rows come in canonical order; as a multiset they are the input.
            let mut expected: Vec<AnonRecord> = records.iter().map(as_sent).collect();
            let mut order: Vec<&AnonRecord> = expected.iter().collect();
            canonical_order(&mut order);
            let key = |r: &AnonRecord| (r.resource_id, r.url.clone(), r.remote_addr.clone(), r.source_partition, r.source_offset);
            prop_assert_eq!(
                decoded.iter().map(key).collect::<Vec<_>>(),
                order.iter().map(|r| key(r)).collect::<Vec<_>>()
            );
            let mut got = decoded;
            let sort = |v: &mut Vec<AnonRecord>| v.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
            sort(&mut got);
            sort(&mut expected);
            prop_assert_eq!(got, expected);
        }

        #[test]
        fn body_depends_only_on_the_set_of_records(
            records in prop::collection::vec(any_record(), 1..30),
            seed in any::<u64>(),
        ) {
            // Within a batch (partition, offset) is unique, which makes the canonical order total.
            let records: Vec<AnonRecord> = records
                .into_iter()
                .enumerate()
                .map(|(i, r)| AnonRecord { source_offset: i as i64, ..r })
                .collect();
            let refs: Vec<&AnonRecord> = records.iter().collect();
            let mut shuffled = refs.clone();
            // A deterministic shuffle from the seed (proptest shrinks the seed, not the order).
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            for c in BodyCompression::ALL {
                prop_assert_eq!(encode_body(&refs, c), encode_body(&shuffled, c));
            }
        }
    }
}
