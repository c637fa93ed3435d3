//! CPU cost of `anonymizer.url_query`: stage one's whole per-record decision
//! (`anon_record::process`: decode, URL policy, validate, anonymize, encode, size check) under
//! each policy, on the producer's records as they are (no query) and with a typical tracking
//! query appended. Single core, in-process, no Kafka.
//!
//!   cargo bench --bench url_query [-- RECORDS]
//!
//! Output: this thread's on-CPU ns per record (best and median of 7 rounds) per policy and URL
//! kind. On-CPU time (`/proc/thread-self/schedstat`), not wall time: the cores are shared, and
//! time spent descheduled is not the policy's cost.

use std::hint::black_box;

use edgelog::anon_record::{process, Outcome, StageOne};
use edgelog::config::{ProducerSettings, Settings};
use edgelog::record::encode_capnp;
use edgelog::synth::TrafficModel;
use edgelog::url_query::{AllowList, UrlQuery};
use edgelog::validate::Policy;

const NOW: u64 = 1_700_000_000_000;

/// Nanoseconds this thread has run on a CPU (the first field of its schedstat).
fn thread_cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat")
        .expect("Linux with /proc/thread-self/schedstat");
    stat.split_whitespace().next().unwrap().parse().unwrap()
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let mut model = TrafficModel::new(&ProducerSettings::default());
    let records: Vec<_> = (0..n)
        .map(|i| model.next_record(NOW - 1000 + (i % 1000) as u64))
        .collect();
    let plain: Vec<Vec<u8>> = records.iter().map(encode_capnp).collect();
    // What analytics and login links put in a query: a campaign, an e-mail, a page, a session.
    let with_query: Vec<Vec<u8>> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            r.url = format!(
                "{}?utm_source=newsletter&email=user{i}%40example.com&page={}&session={:032x}",
                r.url,
                i % 10,
                (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
            );
            encode_capnp(&r)
        })
        .collect();
    let avg_url = |v: &[Vec<u8>]| {
        v.iter()
            .map(|p| edgelog::record::decode_capnp(p).unwrap().url.len())
            .sum::<usize>() as f64
            / n as f64
    };
    println!(
        "stage one's decision per record by anonymizer.url_query, {n} producer records \
         (URLs {:.0} B without a query, {:.0} B with one):",
        avg_url(&plain),
        avg_url(&with_query)
    );
    println!("| url_query | URLs | whole decision, best CPU ns/record | median | policy alone, best CPU ns/URL | URLs changed |");
    println!("|---|---|---:|---:|---:|---:|");
    let policies = [
        UrlQuery::Keep,
        UrlQuery::DropValues,
        UrlQuery::AllowList(AllowList::new(["page", "utm_source"])),
    ];
    for (kind, inputs) in [("no query", &plain), ("with query", &with_query)] {
        let urls: Vec<String> = inputs
            .iter()
            .map(|p| edgelog::record::decode_capnp(p).unwrap().url)
            .collect();
        let stages: Vec<StageOne> = policies
            .iter()
            .map(|url_query| StageOne {
                ipv6_prefix_bits: 48,
                policy: Policy::from_settings(&Settings::default()),
                url_query: url_query.clone(),
                max_message_bytes: 1_000_000,
            })
            .collect();
        // Rounds outside, policies inside: on shared cores the load drifts, and each policy
        // should see the same drift.
        let mut whole = vec![Vec::new(); policies.len()];
        let mut alone = vec![Vec::new(); policies.len()];
        let mut changed = vec![0usize; policies.len()];
        for _ in 0..7 {
            for (k, stage) in stages.iter().enumerate() {
                changed[k] = 0;
                let started = thread_cpu_ns();
                for (i, payload) in inputs.iter().enumerate() {
                    match black_box(process(black_box(payload), 0, i as i64, stage, NOW)) {
                        Outcome::Record { url_redacted, .. } => {
                            changed[k] += usize::from(url_redacted)
                        }
                        Outcome::DeadLetter { reason, error } => panic!("{reason}: {error}"),
                    }
                }
                whole[k].push((thread_cpu_ns() - started) as f64 / n as f64);
                let started = thread_cpu_ns();
                for url in &urls {
                    black_box(stage.url_query.apply(black_box(url)));
                }
                alone[k].push((thread_cpu_ns() - started) as f64 / n as f64);
            }
        }
        for (k, url_query) in policies.iter().enumerate() {
            whole[k].sort_by(f64::total_cmp);
            alone[k].sort_by(f64::total_cmp);
            println!(
                "| {} | {kind} | {:.0} | {:.0} | {:.0} | {} |",
                url_query.label(),
                whole[k][0],
                whole[k][3],
                alone[k][0],
                changed[k]
            );
        }
    }
}
