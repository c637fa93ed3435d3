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
use edgelog::config::ProducerSettings;
use edgelog::loader::body::encode_body_at;
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
    println!("stage two body (Native, rows ordered by resource/url/client) per zstd level, 1,000,000-byte body:");
    println!("| zstd level | rows per body | B/row | × uncompressed RowBinary (95 B/row) | encode ms per body |");
    println!("|---:|---:|---:|---:|---:|");
    for level in [1, 3, 6, 9, 12, 15, 19] {
        // Rows that fit one body at this level, by bisection.
        let fits = |k: usize| {
            encode_body_at(&records[..k].iter().collect::<Vec<_>>(), level).len() <= 1_000_000
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
        let body = encode_body_at(&refs, level);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let per_row = body.len() as f64 / lo as f64;
        println!(
            "| {level} | {lo} | {per_row:.1} | {:.1}× | {ms:.0} |",
            95.0 / per_row
        );
    }
    println!(
        "(MessagePack on the topic: {:.1} B/row; the loader uses level {})",
        msgpack_bytes as f64 / n as f64,
        edgelog::loader::body::ZSTD_LEVEL
    );
}
