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
use edgelog::loader::body::encode_body;
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
    // Rows that fit one 1,000,000-byte body (the loader's default limit), by bisection.
    let fits = |k: usize| encode_body(&records[..k].iter().collect::<Vec<_>>()).len() <= 1_000_000;
    let (mut lo, mut hi) = (1usize, records.len().min(400_000));
    if fits(hi) {
        lo = hi;
    }
    while hi - lo > 100 {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid
        } else {
            hi = mid
        }
    }
    let refs: Vec<&AnonRecord> = records[..lo].iter().collect();
    let started = Instant::now();
    let body = encode_body(&refs);
    let encode_ns = started.elapsed().as_nanos() as f64 / lo as f64;
    println!(
        "stage two body (Native + zstd level {}):",
        edgelog::loader::body::ZSTD_LEVEL
    );
    println!(
        "  {lo} rows per 1 MB body ({:.1} B/row; MessagePack on the topic: {:.1} B/row); encode {:.0} ns/row",
        body.len() as f64 / lo as f64,
        msgpack_bytes as f64 / n as f64,
        encode_ns
    );
}
