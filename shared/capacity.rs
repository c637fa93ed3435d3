//! Expected disk use per table for an incoming rate and a retention, a pure function.
//!
//! Model, per table: `disk = rows × bytes_per_row`, rows = raw records in the retention × the
//! table's rollup ratio (rows kept per raw row). For `http_log` the ratio is 1. For a rollup it is
//! the number of distinct (bucket, dimensions) combinations per raw row, which depends on how many
//! raw rows share a bucket: n = rate × bucket seconds. At a low rate nearly every record is its own
//! combination (ratio ≈ 1); at a high rate the combinations saturate and the ratio falls.
//!
//! Assumptions (say them with every estimate):
//! - The traffic looks like the producer's default model (`synth`): 10,000 resources (Zipf 1.1),
//!   100,000 clients (Zipf 1.05, anonymized to /24 or /48), 8 statuses, 7 cache statuses. The
//!   ratios below were measured on data drawn from that model; more distinct clients or resources
//!   mean more rollup rows at the same rate.
//! - The rate is steady (no daily cycle); a peaky rate aggregates better at peaks, worse off-peak.
//! - Bytes per row are those measured at 100M raw rows (the larger of "merges settled" and
//!   "OPTIMIZE FINAL"); compressed size per row changes a little with the rollup ratio. Merges need free space on top (up to the size of the
//!   largest partition being merged), and `system` logs are not counted.
//!
//! Where the constants come from (`docs/BENCHMARKS.md`, "Disk space"):
//! `cargo bench --bench queries -- --rows 100000000 --reuse --cardinality` prints the ratio table
//! (rows per raw row by raw rows per bucket, per dimension set) and bytes per row per table.

/// A set of rollup dimensions and its measured ratio curve: (n = raw rows per bucket, rollup rows
/// per raw row), n ascending.
pub struct Dimensions {
    pub name: &'static str,
    pub curve: &'static [(f64, f64)],
}

// Measured on 3 days of the 100M-row dataset (38.6 records/s): grouping by longer buckets stands
// in for higher rates, keeping every 10th/100th record for lower ones (`--cardinality`).
pub const RESOURCE_STATUS_CACHE_IP: Dimensions = Dimensions {
    name: "resource, status, cache, ip",
    curve: &[
        (23.0, 0.9979),
        (231.0, 0.9843),
        (2_315.0, 0.9350),
        (23_148.0, 0.8416),
        (138_889.0, 0.7418),
        (833_333.0, 0.6241),
        (3_333_333.0, 0.5257),
        (10_000_000.0, 0.4923),
    ],
};
pub const IP_STATUS_CACHE: Dimensions = Dimensions {
    name: "ip, status, cache",
    curve: &[
        (23.0, 0.9552),
        (231.0, 0.8234),
        (2_315.0, 0.6442),
        (23_148.0, 0.4585),
        (138_889.0, 0.3231),
        (833_333.0, 0.2009),
        (3_333_333.0, 0.1217),
        (10_000_000.0, 0.1005),
    ],
};
pub const RESOURCE_STATUS_CACHE: Dimensions = Dimensions {
    name: "resource, status, cache",
    curve: &[
        (23.0, 0.9177),
        (231.0, 0.7373),
        (2_315.0, 0.5176),
        (23_148.0, 0.3137),
        (138_889.0, 0.1817),
        (833_333.0, 0.0856),
        (3_333_333.0, 0.0420),
        (10_000_000.0, 0.0327),
    ],
};
/// Saturates at the 56 status × cache combinations (measured 55.6 per bucket at n = 23,148): past
/// that the curve is 56/n, which the last segment's slope of -1 continues.
pub const STATUS_CACHE: Dimensions = Dimensions {
    name: "status, cache",
    curve: &[
        (23.0, 0.3395),
        (231.0, 0.1014),
        (2_315.0, 0.0200),
        (23_148.0, 0.0024),
        (138_889.0, 56.0 / 138_889.0),
    ],
};

/// Resource alone (the unique-client rollups of migration 009), measured on the 3-day, 10M-record
/// dataset at 38.6 records/s (docs/BENCHMARKS.md, "Unique clients"): longer buckets for higher
/// rates, every 10th/100th record for lower ones. Saturates at the model's 10,000 resources.
pub const RESOURCE: Dimensions = Dimensions {
    name: "resource",
    curve: &[
        (23.1, 0.7957),
        (231.5, 0.5466),
        (2_315.0, 0.3311),
        (23_148.0, 0.1582),
        (138_889.0, 0.0592),
        (833_333.0, 0.0120),
        (3_333_333.0, 0.0030),
    ],
};

/// No dimension: one row per bucket (the overall unique-client rollups of migration 009).
pub const NONE: Dimensions = Dimensions {
    name: "none",
    curve: &[(1.0, 1.0), (10_000_000.0, 1.0 / 10_000_000.0)],
};

/// The top-N summaries of migration 005: one row per bucket and filter combination, 56 status ×
/// cache pairs plus 8 "any cache", 7 "any status" and 1 "any" row, whatever the rate. Past a few
/// records per combination the rows stop growing (slope -1: 72 per bucket), and so do their
/// bytes: a summary keeps at most 300 counters.
pub const TOP_SUMMARIES: Dimensions = Dimensions {
    name: "status or any, cache or any",
    curve: &[
        (1_000.0, 72.0 / 1_000.0),
        (10_000_000.0, 72.0 / 10_000_000.0),
    ],
};

/// One table of the schema: its rollup (none for the raw table), bucket and measured size.
pub struct Table {
    pub name: &'static str,
    /// `None` for the raw table (one row per record); otherwise dimensions and bucket seconds.
    pub rollup: Option<(&'static Dimensions, u32)>,
    /// Compressed bytes per row (`system.parts`, 100M raw rows at 38.6 records/s).
    pub bytes_per_row: f64,
}

pub const TABLES: [Table; 23] = [
    // With the codecs of migration 004, after OPTIMIZE FINAL rewrote all 100M rows (18.96 B/row
    // with the codecs of 001 once merges settled). For the rollups: the larger of "merges
    // settled" and "OPTIMIZE FINAL" (docs/BENCHMARKS.md, "Disk space").
    Table {
        name: "http_log",
        rollup: None,
        bytes_per_row: 14.65,
    },
    Table {
        name: "http_log_totals",
        rollup: Some((&RESOURCE_STATUS_CACHE_IP, 60)),
        bytes_per_row: 9.12,
    },
    Table {
        name: "http_log_totals_by_ip",
        rollup: Some((&IP_STATUS_CACHE, 60)),
        bytes_per_row: 8.71,
    },
    Table {
        name: "http_log_totals_by_resource",
        rollup: Some((&RESOURCE_STATUS_CACHE, 60)),
        bytes_per_row: 8.48,
    },
    Table {
        name: "http_log_totals_by_resource_1h",
        rollup: Some((&RESOURCE_STATUS_CACHE, 3600)),
        bytes_per_row: 10.59,
    },
    Table {
        name: "http_log_totals_by_status",
        rollup: Some((&STATUS_CACHE, 60)),
        bytes_per_row: 13.11,
    },
    Table {
        name: "http_log_totals_by_status_1h",
        rollup: Some((&STATUS_CACHE, 3600)),
        bytes_per_row: 11.87,
    },
    // Full summaries (138,889 records per hour here), after merges settled (docs/BENCHMARKS.md,
    // "Top-N panels"); fewer records per hour make smaller rows, so at low rates an upper bound.
    Table {
        name: "http_log_top_1h",
        rollup: Some((&TOP_SUMMARIES, 3600)),
        bytes_per_row: 3099.0,
    },
    Table {
        name: "http_log_top_1d",
        rollup: Some((&TOP_SUMMARIES, 86_400)),
        bytes_per_row: 6600.0,
    },
    // Migration 006, merges settled (4.88 after OPTIMIZE FINAL; docs/BENCHMARKS.md, "Top-N panels").
    Table {
        name: "http_log_totals_by_ip_resource_1d",
        rollup: Some((&RESOURCE_STATUS_CACHE_IP, 86_400)),
        bytes_per_row: 6.69,
    },
    // Migration 009, unique-client states, merges settled at 38.6 records/s (docs/BENCHMARKS.md,
    // "Unique clients"). A state takes ~4 B per distinct client of its bucket (up to 256 KiB), so
    // these grow with the rate where the others do not: at higher rates an underestimate.
    Table {
        name: "http_log_uniques_by_resource",
        rollup: Some((&RESOURCE, 60)),
        bytes_per_row: 13.47,
    },
    Table {
        name: "http_log_uniques_by_resource_1d",
        rollup: Some((&RESOURCE, 86_400)),
        // One row per resource-day, as 010's keyed copy of these states (554 B at 100M rows over
        // 30 days, "Unique clients at 100M rows"); the 3-day run's 243 B were of unmerged days.
        bytes_per_row: 554.0,
    },
    Table {
        name: "http_log_uniques_by_status",
        rollup: Some((&STATUS_CACHE, 60)),
        bytes_per_row: 125.0,
    },
    Table {
        name: "http_log_uniques_by_status_1h",
        rollup: Some((&STATUS_CACHE, 3600)),
        bytes_per_row: 3031.0,
    },
    Table {
        name: "http_log_uniques",
        rollup: Some((&NONE, 60)),
        bytes_per_row: 4340.0,
    },
    Table {
        name: "http_log_uniques_1h",
        rollup: Some((&NONE, 3600)),
        bytes_per_row: 97_903.0,
    },
    // Migration 010, the same states per resource per hour and per day keyed by resource: 100M
    // synthetic rows of the producer's model over 30 days (scripts/uniques-load.sh), merges
    // settled, one row per key already (scripts/uniques-sizes.sh; docs/BENCHMARKS.md, "Unique
    // clients"). Like the other states, these grow with the rate.
    Table {
        name: "http_log_uniques_by_resource_1h",
        rollup: Some((&RESOURCE, 3600)),
        bytes_per_row: 46.0,
    },
    Table {
        name: "http_log_uniques_by_resource_keyed_1d",
        rollup: Some((&RESOURCE, 86_400)),
        bytes_per_row: 552.0,
    },
    // Migration 011, uniqCombined(17) states, the same 100M rows, merges settled: past a few
    // thousand clients a state is a fixed 80 KiB HyperLogLog, so the busy buckets' rows stop
    // growing with the rate; those of rare pairs and resources still do.
    Table {
        name: "http_log_uniques_6h",
        rollup: Some((&NONE, 21_600)),
        bytes_per_row: 69_298.0,
    },
    Table {
        name: "http_log_uniques_1d",
        rollup: Some((&NONE, 86_400)),
        bytes_per_row: 79_890.0,
    },
    Table {
        name: "http_log_uniques_by_status_6h",
        rollup: Some((&STATUS_CACHE, 21_600)),
        bytes_per_row: 10_847.0,
    },
    Table {
        name: "http_log_uniques_by_status_1d",
        rollup: Some((&STATUS_CACHE, 86_400)),
        bytes_per_row: 19_954.0,
    },
    Table {
        name: "http_log_uniques_by_resource_combined_1d",
        rollup: Some((&RESOURCE, 86_400)),
        bytes_per_row: 650.0,
    },
];

/// Rollup rows per raw row at `n` raw rows per bucket: log-log interpolation of the measured
/// curve; beyond its ends the end segments' slopes continue, and the result stays in
/// `[1/n, 1]` (a bucket holds at least one row and at most one per record).
pub fn rollup_ratio(d: &Dimensions, n: f64) -> f64 {
    let c = d.curve;
    let n = n.max(1.0);
    let ratio = if c.len() == 1 {
        c[0].1
    } else {
        let i = c
            .windows(2)
            .position(|w| n <= w[1].0)
            .unwrap_or(c.len() - 2);
        let ((x0, y0), (x1, y1)) = (c[i], c[i + 1]);
        let slope = (y1.ln() - y0.ln()) / (x1.ln() - x0.ln());
        (y0.ln() + slope * (n.ln() - x0.ln())).exp()
    };
    ratio.clamp(1.0 / n, 1.0)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub table: &'static str,
    pub rows: f64,
    pub rows_per_raw_row: f64,
    pub bytes: f64,
}

/// Expected rows and bytes of every table for `rate` records/s kept `raw_retention_s` seconds in
/// `http_log` and `retention_s` seconds in the rollups.
pub fn estimate(rate: f64, retention_s: f64, raw_retention_s: f64) -> Vec<Estimate> {
    TABLES
        .iter()
        .map(|t| {
            let (ratio, keep) = match t.rollup {
                None => (1.0, raw_retention_s),
                Some((d, bucket)) => (rollup_ratio(d, rate * f64::from(bucket)), retention_s),
            };
            let rows = rate * keep * ratio;
            Estimate {
                table: t.name,
                rows,
                rows_per_raw_row: ratio,
                bytes: rows * t.bytes_per_row,
            }
        })
        .collect()
}

/// Parses a retention like `30d`, `12h`, `90m`, `3600s`, `2w` or `1y` (365 days) into seconds.
pub fn parse_retention(s: &str) -> Result<f64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{s:?}: give a unit (s, m, h, d, w, y)"))?;
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a number before the unit"))?;
    let unit_s = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "w" => 7.0 * 86_400.0,
        "y" => 365.0 * 86_400.0,
        other => return Err(format!("{s:?}: unknown unit {other:?} (s, m, h, d, w, y)")),
    };
    Ok(num * unit_s)
}

/// Bytes in binary units for people: `1.5 GiB`.
pub fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURVE: Dimensions = Dimensions {
        name: "test",
        curve: &[(10.0, 0.9), (1000.0, 0.09)],
    };

    #[test]
    fn interpolates_in_log_log_and_stays_in_bounds() {
        assert!((rollup_ratio(&CURVE, 10.0) - 0.9).abs() < 1e-9);
        assert!((rollup_ratio(&CURVE, 1000.0) - 0.09).abs() < 1e-9);
        // Halfway in log n is the geometric mean.
        assert!((rollup_ratio(&CURVE, 100.0) - (0.9f64 * 0.09).sqrt()).abs() < 1e-9);
        // Extrapolation keeps the slope but never above 1 row per record or below 1 per bucket.
        assert_eq!(rollup_ratio(&CURVE, 1.0), 1.0);
        let far = 1e9;
        assert!(rollup_ratio(&CURVE, far) >= 1.0 / far);
    }

    #[test]
    fn the_measured_curves_fall_with_the_rate() {
        for t in &TABLES {
            if let Some((d, bucket)) = t.rollup {
                let mut last = 1.0;
                for rate in [0.1, 1.0, 10.0, 100.0, 1000.0, 10_000.0] {
                    let r = rollup_ratio(d, rate * f64::from(bucket));
                    assert!(r <= last + 1e-12, "{} at {rate}/s: {r} > {last}", t.name);
                    assert!(r > 0.0 && r <= 1.0);
                    last = r;
                }
            }
        }
    }

    #[test]
    fn reproduces_the_measurement() {
        // 100M rows over 30 days: 38.58 records/s; measured rows per raw row at that rate.
        let rate = 1e8 / (30.0 * 86_400.0);
        let e = estimate(rate, 30.0 * 86_400.0, 30.0 * 86_400.0);
        let get = |t: &str| e.iter().find(|e| e.table == t).unwrap().rows_per_raw_row;
        for (t, measured) in [
            ("http_log_totals", 0.935),
            ("http_log_totals_by_ip", 0.644),
            ("http_log_totals_by_resource", 0.518),
            ("http_log_totals_by_resource_1h", 0.182),
            ("http_log_totals_by_status", 0.020),
            ("http_log_uniques_by_resource", 0.331),
        ] {
            assert!(
                (get(t) - measured).abs() / measured < 0.02,
                "{t}: {}",
                get(t)
            );
        }
    }

    #[test]
    fn top_summaries_keep_72_rows_an_hour_at_any_real_rate() {
        for rate in [10.0, 38.6, 1000.0, 100_000.0] {
            let e = estimate(rate, 30.0 * 86_400.0, 30.0 * 86_400.0);
            let top = e.iter().find(|e| e.table == "http_log_top_1h").unwrap();
            assert!(
                (top.rows - 72.0 * 24.0 * 30.0).abs() < 1.0,
                "{rate}/s: {}",
                top.rows
            );
        }
    }

    #[test]
    fn raw_table_is_rate_times_retention_times_bytes_per_row() {
        let e = estimate(100.0, 400.0 * 86_400.0, 30.0 * 86_400.0);
        let raw = e.iter().find(|e| e.table == "http_log").unwrap();
        assert_eq!(raw.rows, 100.0 * 30.0 * 86_400.0);
        assert_eq!(raw.bytes, raw.rows * TABLES[0].bytes_per_row);
        assert_eq!(e.len(), TABLES.len());
    }

    #[test]
    fn retentions_parse() {
        assert_eq!(parse_retention("30d"), Ok(30.0 * 86_400.0));
        assert_eq!(parse_retention("12h"), Ok(43_200.0));
        assert_eq!(parse_retention("1.5h"), Ok(5400.0));
        assert_eq!(parse_retention("2w"), Ok(14.0 * 86_400.0));
        assert_eq!(parse_retention("1y"), Ok(365.0 * 86_400.0));
        assert!(parse_retention("30").is_err());
        assert!(parse_retention("d").is_err());
        assert!(parse_retention("30x").is_err());
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512.0), "512.0 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }
}
