//! A seeded model of CDN edge traffic: the synthetic producer's records and the benchmarks' data.
//!
//! Resources, URLs per resource and clients are Zipf-distributed (a few hot objects and heavy
//! clients, a long tail). A client keeps its address across records. Status, cache status and
//! method follow fixed weights close to what the original generator emitted. A configurable share
//! of addresses is malformed and a share of messages is not Cap'n Proto at all.

use std::net::{Ipv4Addr, Ipv6Addr};

use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{LogNormal, Zipf};

use crate::config::ProducerSettings;
use crate::record::{encode_capnp, HttpLogRecord};

pub const STATUSES: [u16; 8] = [200, 301, 400, 403, 404, 500, 502, 504];
const STATUS_WEIGHTS: [u32; 8] = [820, 30, 15, 15, 80, 15, 15, 10];
pub const CACHE_STATUSES: [&str; 7] = [
    "HIT",
    "MISS",
    "STALE",
    "BYPASS",
    "REVALIDATED",
    "UPDATING",
    "SCARCE",
];
const CACHE_WEIGHTS: [u32; 7] = [620, 200, 40, 60, 40, 25, 15];
const EXTENSIONS: [&str; 10] = [
    "jpg", "png", "webp", "js", "css", "mp4", "m3u8", "ts", "html", "woff2",
];

/// Remote addresses that are neither IPv4 nor IPv6 as the standard library parses them.
pub const MALFORMED_ADDRESSES: [&str; 12] = [
    "",
    "-",
    "unknown",
    "999.1.2.3",
    "1.2.3",
    "1.2.3.4.5",
    " 10.0.0.1",
    "10.0.0.1 ",
    "01.002.03.4",
    "1.2.3.4:8080",
    "[2001:db8::1]",
    "fe80::1%eth0",
];

/// One message for the input topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Record(HttpLogRecord),
    /// Bytes that no Cap'n Proto reader accepts (exercises the dead-letter path).
    Garbage(Vec<u8>),
    /// A record that stage one dead-letters under the default policy (`crate::validate`): a
    /// field out of range or too long, text that is not UTF-8, a truncated frame.
    Hostile(Vec<u8>),
}

impl Message {
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Message::Record(r) => encode_capnp(r),
            Message::Garbage(b) | Message::Hostile(b) => b.clone(),
        }
    }
}

pub struct TrafficModel {
    rng: StdRng,
    seed: u64,
    resource: Zipf<f64>,
    url: Zipf<f64>,
    client: Zipf<f64>,
    status: WeightedIndex<u32>,
    cache: WeightedIndex<u32>,
    body_bytes: LogNormal<f64>,
    request_time: LogNormal<f64>,
    ipv6_share: f64,
    malformed_share: f64,
    garbage_share: f64,
    hostile_share: f64,
}

/// How many kinds of hostile record [`TrafficModel`] mixes in (see `hostile`).
pub const HOSTILE_KINDS: usize = 9;

impl TrafficModel {
    /// Builds the model; settings are assumed validated (`Settings::validated`).
    pub fn new(p: &ProducerSettings) -> TrafficModel {
        TrafficModel {
            rng: StdRng::seed_from_u64(p.seed),
            seed: p.seed,
            resource: Zipf::new(p.resources as f64, p.resource_zipf_exponent).expect("validated"),
            url: Zipf::new(p.urls_per_resource as f64, 1.0).expect("validated"),
            client: Zipf::new(p.clients as f64, p.client_zipf_exponent).expect("validated"),
            status: WeightedIndex::new(STATUS_WEIGHTS).expect("static weights"),
            cache: WeightedIndex::new(CACHE_WEIGHTS).expect("static weights"),
            // median ~8 KiB, long tail into megabytes
            body_bytes: LogNormal::new(9.0, 1.8).expect("static parameters"),
            // median ~20 ms
            request_time: LogNormal::new(3.0, 1.1).expect("static parameters"),
            ipv6_share: p.ipv6_share,
            malformed_share: p.malformed_ip_share,
            garbage_share: p.garbage_share,
            hostile_share: p.hostile_share,
        }
    }

    /// The next message, stamped with `now_ms`.
    pub fn next_message(&mut self, now_ms: u64) -> Message {
        if self.garbage_share > 0.0 && self.rng.random_bool(self.garbage_share) {
            return Message::Garbage(self.garbage());
        }
        if self.hostile_share > 0.0 && self.rng.random_bool(self.hostile_share) {
            let kind = self.rng.random_range(0..HOSTILE_KINDS);
            let base = self.next_record(now_ms);
            return Message::Hostile(hostile(kind, base, now_ms));
        }
        Message::Record(self.next_record(now_ms))
    }

    pub fn next_record(&mut self, now_ms: u64) -> HttpLogRecord {
        let resource_id = self.resource.sample(&mut self.rng) as u64;
        let url_rank = self.url.sample(&mut self.rng) as u64;
        let client = self.client.sample(&mut self.rng) as u64;
        let method = if self.rng.random_bool(0.93) {
            "GET"
        } else {
            "HEAD"
        };
        let response_status = STATUSES[self.status.sample(&mut self.rng)];
        let cache_status = CACHE_STATUSES[self.cache.sample(&mut self.rng)];
        let bytes_sent = if method == "HEAD" || response_status >= 300 {
            self.rng.random_range(150..600)
        } else {
            (self.body_bytes.sample(&mut self.rng) as u64).clamp(200, 2_000_000_000)
        };
        let request_time_milli = (self.request_time.sample(&mut self.rng) as u64).min(120_000);
        let remote_addr =
            if self.malformed_share > 0.0 && self.rng.random_bool(self.malformed_share) {
                MALFORMED_ADDRESSES[self.rng.random_range(0..MALFORMED_ADDRESSES.len())].to_string()
            } else {
                self.client_address(client)
            };
        HttpLogRecord {
            timestamp_epoch_milli: now_ms,
            resource_id,
            bytes_sent,
            request_time_milli,
            response_status,
            cache_status: cache_status.to_string(),
            method: method.to_string(),
            remote_addr,
            url: url_for(resource_id, url_rank),
        }
    }

    /// A client's address is a function of its rank, so heavy clients recur with one address.
    fn client_address(&self, client: u64) -> String {
        let h = splitmix64(client ^ self.seed.rotate_left(17));
        if (h >> 11) as f64 / (1u64 << 53) as f64 >= self.ipv6_share {
            // public-looking IPv4: first octet 1..=223, skipping 10 and 127
            let mut first = 1 + (h % 223) as u8;
            if first == 10 || first == 127 {
                first += 1;
            }
            Ipv4Addr::new(first, (h >> 8) as u8, (h >> 16) as u8, (h >> 24) as u8).to_string()
        } else {
            let h2 = splitmix64(h);
            let net = 0x2001_0000_0000_0000u128 << 64;
            let bits = net | ((h as u128) << 48 >> 16) | (h2 as u128 & 0xffff_ffff_ffff);
            let addr = Ipv6Addr::from(bits);
            addr.to_string()
        }
    }

    fn garbage(&mut self) -> Vec<u8> {
        // Starts with bytes whose segment table no reader accepts, then noise.
        let mut bytes = b"garbage:".to_vec();
        let len = self.rng.random_range(0..48);
        bytes.extend((0..len).map(|_| self.rng.random::<u8>()));
        bytes
    }
}

/// `base` made hostile in way `kind` (0..[`HOSTILE_KINDS`]). Values sit well past the policy's
/// bounds, so the verdict does not depend on the anonymizer's clock.
pub fn hostile(kind: usize, base: HttpLogRecord, now_ms: u64) -> Vec<u8> {
    const DAY: u64 = 86_400_000;
    let r = match kind {
        0 => HttpLogRecord {
            timestamp_epoch_milli: u64::MAX,
            ..base
        },
        1 => HttpLogRecord {
            timestamp_epoch_milli: now_ms + 400 * DAY,
            ..base
        },
        2 => HttpLogRecord {
            timestamp_epoch_milli: now_ms.saturating_sub(400 * DAY),
            ..base
        },
        3 => HttpLogRecord {
            response_status: 1000,
            ..base
        },
        4 => HttpLogRecord {
            bytes_sent: u64::MAX,
            ..base
        },
        5 => HttpLogRecord {
            url: format!("{}?{}", base.url, "q".repeat(9000)),
            ..base
        },
        6 => HttpLogRecord {
            method: "M".repeat(100),
            ..base
        },
        7 => {
            // A URL whose bytes are then overwritten with bytes that are not UTF-8.
            let marker = "\u{1}not-utf8\u{1}";
            let mut bytes = encode_capnp(&HttpLogRecord {
                url: marker.into(),
                ..base
            });
            if let Some(at) = bytes
                .windows(marker.len())
                .position(|w| w == marker.as_bytes())
            {
                bytes[at..at + marker.len()].fill(0xff);
            }
            return bytes;
        }
        _ => {
            let bytes = encode_capnp(&base);
            return bytes[..bytes.len() - 8].to_vec();
        }
    };
    encode_capnp(&r)
}

fn url_for(resource_id: u64, rank: u64) -> String {
    let ext = EXTENSIONS
        [(splitmix64(resource_id.wrapping_mul(31) ^ rank) % EXTENSIONS.len() as u64) as usize];
    format!("/r{resource_id}/assets/{rank}.{ext}")
}

/// A small, good integer hash (Steele et al.), used to derive stable per-client attributes.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decode_capnp;
    use std::collections::HashMap;
    use std::net::IpAddr;

    fn model(f: impl FnOnce(&mut ProducerSettings)) -> TrafficModel {
        let mut p = ProducerSettings::default();
        f(&mut p);
        TrafficModel::new(&p)
    }

    #[test]
    fn same_seed_same_records() {
        let mut a = model(|_| {});
        let mut b = model(|_| {});
        for _ in 0..1000 {
            assert_eq!(a.next_message(5), b.next_message(5));
        }
        let mut c = model(|p| p.seed = 2);
        let differs = (0..100).any(|_| a.next_message(5) != c.next_message(5));
        assert!(differs);
    }

    #[test]
    fn distributions_look_like_cdn_traffic() {
        let mut m = model(|p| {
            p.ipv6_share = 0.1;
            p.malformed_ip_share = 0.02;
        });
        let n = 50_000;
        let mut status = HashMap::new();
        let mut v4 = 0;
        let mut v6 = 0;
        let mut bad = 0;
        let mut top_resource = 0;
        for _ in 0..n {
            let r = m.next_record(0);
            *status.entry(r.response_status).or_insert(0) += 1;
            assert!(CACHE_STATUSES.contains(&r.cache_status.as_str()));
            assert!(r.method == "GET" || r.method == "HEAD");
            assert!(r.url.starts_with(&format!("/r{}/", r.resource_id)));
            match r.remote_addr.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => v4 += 1,
                Ok(IpAddr::V6(_)) => v6 += 1,
                Err(_) => bad += 1,
            }
            if r.resource_id == 1 {
                top_resource += 1;
            }
        }
        assert!(status[&200] > n * 7 / 10, "skewed to 200: {status:?}");
        assert!(
            STATUSES.iter().all(|s| status.contains_key(s)),
            "{status:?}"
        );
        assert!(v6 > n / 20 && v6 < n / 5, "ipv6 share ~10%: {v6}");
        assert!(bad > n / 100 && bad < n / 25, "malformed ~2%: {bad}");
        assert!(v4 > n * 3 / 4);
        assert!(
            top_resource > n / 20,
            "Zipf: the top resource is hot: {top_resource}"
        );
    }

    #[test]
    fn malformed_addresses_really_are() {
        for a in MALFORMED_ADDRESSES {
            assert!(a.parse::<IpAddr>().is_err(), "{a:?} parses");
        }
    }

    #[test]
    fn garbage_never_decodes_and_records_always_do() {
        let mut m = model(|p| p.garbage_share = 0.3);
        let (mut garbage, mut records) = (0, 0);
        for _ in 0..5000 {
            let msg = m.next_message(1);
            let decoded = decode_capnp(&msg.to_bytes());
            match msg {
                Message::Garbage(_) => {
                    garbage += 1;
                    assert!(decoded.is_err());
                }
                Message::Record(r) => {
                    records += 1;
                    assert_eq!(decoded.unwrap(), r);
                }
                Message::Hostile(_) => unreachable!("hostile_share is 0"),
            }
        }
        assert!(garbage > 1000 && records > 3000, "{garbage} {records}");
    }

    /// Every hostile kind is dead-lettered by stage one's decision under the default settings,
    /// and the plain records beside them are not.
    #[test]
    fn hostile_records_are_dead_lettered_and_plain_ones_are_not() {
        use crate::anon_record::{process, Outcome, StageOne};
        let now = 1_780_000_000_000;
        let stage = StageOne {
            ipv6_prefix_bits: 48,
            policy: crate::validate::Policy::from_settings(&crate::config::Settings::default()),
            url_query: Default::default(),
            max_message_bytes: 1_000_000,
        };
        let mut m = model(|p| {
            p.hostile_share = 0.3;
            p.malformed_ip_share = 0.0;
        });
        let mut kinds = std::collections::BTreeSet::new();
        for kind in 0..HOSTILE_KINDS {
            let bytes = hostile(kind, m.next_record(now), now);
            match process(&bytes, 0, 0, &stage, now) {
                Outcome::DeadLetter { reason, .. } => kinds.insert(reason),
                o => panic!("kind {kind}: {o:?}"),
            };
        }
        assert!(kinds.len() >= 6, "{kinds:?}");
        let (mut hostile_n, mut plain) = (0, 0);
        for _ in 0..3000 {
            let msg = m.next_message(now);
            let dead = matches!(
                process(&msg.to_bytes(), 0, 0, &stage, now),
                Outcome::DeadLetter { .. }
            );
            match msg {
                Message::Hostile(_) => {
                    hostile_n += 1;
                    assert!(dead);
                }
                Message::Record(_) => {
                    plain += 1;
                    assert!(!dead);
                }
                Message::Garbage(_) => unreachable!(),
            }
        }
        assert!(hostile_n > 600 && plain > 1500, "{hostile_n} {plain}");
    }
}
