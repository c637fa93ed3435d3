//! CPU cost of stage one's transformation (Cap'n Proto decode + anonymize + MessagePack encode)
//! and of stage two's body encoding, on the producer's realistic records. Single core, in-process,
//! no Kafka: this is the floor under each stage's throughput.
//!
//!   cargo bench --bench transform [-- RECORDS]
//!
//! Output: ns per record (best and median of 7 rounds) and rows per 1 MB body.

use std::hint::black_box;
use std::time::Instant;

use edgelog::anon_record::{decode, transform, AnonRecord};
use edgelog::body::{canonical_order, encode_body, encode_body_at, encode_native, BodyCompression};
use edgelog::config::ProducerSettings;
use edgelog::record::encode_capnp;
use edgelog::synth::TrafficModel;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let settings = ProducerSettings::default();
    let mut model = TrafficModel::new(&settings);
    let inputs: Vec<Vec<u8>> = (0..n)
        .map(|i| encode_capnp(&model.next_record(1_700_000_000_000 + i as u64)))
        .collect();

    let mut rounds = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        for (i, payload) in inputs.iter().enumerate() {
            black_box(transform(black_box(payload), 0, i as i64, 48).unwrap());
        }
        rounds.push(started.elapsed().as_nanos() as f64 / n as f64);
    }
    rounds.sort_by(f64::total_cmp);
    println!("stage one transform (decode capnp + anonymize + encode msgpack), {n} records:");
    println!(
        "  best {:.0} ns/record, median {:.0} ns/record",
        rounds[0], rounds[3]
    );

    let records: Vec<AnonRecord> = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| decode(&transform(p, 0, i as i64, 48).unwrap().0).unwrap())
        .collect();
    let msgpack_bytes: usize = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| transform(p, 0, i as i64, 48).unwrap().0.len())
        .sum();
    // Uncompressed RowBinary, measured on the same records: the baseline of the 8x goal.
    let all: Vec<&AnonRecord> = records.iter().collect();
    let rowbinary_per_row = rowbinary(&all).len() as f64 / n as f64;
    let native_per_row = encode_native(&all).len() as f64 / n as f64;
    println!(
        "uncompressed: RowBinary {rowbinary_per_row:.1} B/row, Native {native_per_row:.1} B/row"
    );
    println!(
        "rows per 1,000,000-byte body, by format and compression level (rows in canonical order):"
    );
    println!("| format | level or preset | rows per body | B/row | × uncompressed RowBinary | encode ms per body |");
    println!("|---|---:|---:|---:|---:|---:|");
    type Encoder = fn(&[&AnonRecord], i32) -> Vec<u8>;
    let formats: [(&str, Encoder, &[i32]); 4] = [
        // loader.body_compression = "xz" (the default): preset 6.
        (
            "Native + xz",
            |r, _| encode_body(r, BodyCompression::Xz),
            &[6],
        ),
        ("Native", encode_body_at, &[1, 3, 9, 15, 19]),
        // loader.body_compression = "gzip" (servers without zstd request bodies): level 9.
        (
            "Native + gzip",
            |r, _| encode_body(r, BodyCompression::Gzip),
            &[9],
        ),
        (
            "RowBinary",
            |r, level| zstd::bulk::compress(&rowbinary(r), level).unwrap(),
            &[1, 3, 9, 15, 19],
        ),
    ];
    for (format, encode, levels) in formats {
        for &level in levels {
            // Rows that fit one body at this level, by bisection.
            let fits = |k: usize| {
                encode(&records[..k].iter().collect::<Vec<_>>(), level).len() <= 1_000_000
            };
            let (mut lo, mut hi) = (1usize, records.len());
            if fits(hi) {
                lo = hi;
            }
            while hi - lo > 200 {
                let mid = (lo + hi) / 2;
                if fits(mid) {
                    lo = mid
                } else {
                    hi = mid
                }
            }
            let refs: Vec<&AnonRecord> = records[..lo].iter().collect();
            let started = Instant::now();
            let body = encode(&refs, level);
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let per_row = body.len() as f64 / lo as f64;
            println!(
                "| {format} | {level} | {lo} | {per_row:.1} | {:.1}× | {ms:.0} |",
                rowbinary_per_row / per_row
            );
        }
    }
    println!(
        "(MessagePack on the topic: {:.1} B/row; the loader sends {:?} by default: xz preset {}, zstd level {})",
        msgpack_bytes as f64 / n as f64,
        BodyCompression::default(),
        edgelog::body::XZ_PRESET,
        edgelog::body::ZSTD_LEVEL
    );
}

/// RowBinary for the loader's columns, rows in the same canonical order as the Native body.
fn rowbinary(records: &[&AnonRecord]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        let mut n = s.len() as u64;
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(s.as_bytes());
    }
    let mut rows = records.to_vec();
    canonical_order(&mut rows);
    let mut out = Vec::new();
    for r in rows {
        out.extend_from_slice(&((r.timestamp_epoch_milli / 1000) as u32).to_le_bytes());
        out.extend_from_slice(&r.resource_id.to_le_bytes());
        out.extend_from_slice(&r.bytes_sent.to_le_bytes());
        out.extend_from_slice(&r.request_time_milli.to_le_bytes());
        out.extend_from_slice(&r.response_status.to_le_bytes());
        string(&mut out, &r.cache_status);
        string(&mut out, &r.method);
        string(&mut out, &r.remote_addr);
        string(&mut out, &r.url);
        out.extend_from_slice(&r.source_partition.to_le_bytes());
        out.extend_from_slice(&r.source_offset.to_le_bytes());
    }
    out
}
