-- Unique clients per 6 hours and per day for all traffic and each status/cache pair, and per
-- day for each resource, so that a series over 7 or 30 days merges a few dozen states
-- (issue 20, "p99 <= 50 ms").
--
-- Migration 009 keeps the first two per minute and per hour. The cost of a series is merging
-- states, not reading rows: a 30-day series of hourly states merges 720 states of ~25,000
-- clients each, which took 360-620 ms at 100M raw rows. The dashboard's unique-client series now
-- asks for about 30 points: a day's range reads hours, a week's 6-hour buckets, a month's days
-- (docs/BENCHMARKS.md, "Unique clients at 100M rows").
--
-- These tables keep uniqCombined(17) states, not 009's uniq. Past a few thousand distinct
-- clients such a state is a fixed 2^17-register HyperLogLog (80 KiB), and merging those is
-- cheaper than rebuilding uniq's sets of up to 65,536 hashes. All traffic over 30 days (30 daily
-- states) took 35 ms against 67 ms; over 7 days (28 six-hour states) 30 ms against 54 ms
-- (medians, scripts/uniques-designs.sh). Their error on that data was at most 0.14% (days) and
-- 0.40% (6 hours). The top 10 resources stay on 010's uniq states: uniqCombined(17) did not
-- bring them near the goal either (465 ms against 529 over 30 days with 100 candidates).
--
-- Rows of up to 80 KiB: small granules, so that a range reads its own states and not those of
-- the neighbouring keys.
--
-- New tables with their own views, like 010 (a changed view breaks the dedup of a batch retried
-- across the upgrade, see 009). Exact under retried inserts like every rollup: a dedup window on
-- each target, the loader's deduplicate_blocks_in_dependent_materialized_views, and `requests`
-- is a plain sum, so `verify` proves each insert was seen once.
CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_6h
(
    ts                  DateTime,
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniqCombined(17), String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY ts
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 8;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_6h_mv
TO ${database}.http_log_uniques_6h
AS SELECT
    toStartOfInterval(timestamp, INTERVAL 6 HOUR) AS ts,
    toUInt64(count()) AS requests,
    uniqCombinedState(17)(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_1d
(
    ts                  DateTime,
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniqCombined(17), String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY ts
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 8;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_1d_mv
TO ${database}.http_log_uniques_1d
AS SELECT
    toStartOfDay(timestamp) AS ts,
    toUInt64(count()) AS requests,
    uniqCombinedState(17)(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_status_6h
(
    ts                  DateTime,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniqCombined(17), String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 8;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_status_6h_mv
TO ${database}.http_log_uniques_by_status_6h
AS SELECT
    toStartOfInterval(timestamp, INTERVAL 6 HOUR) AS ts,
    response_status,
    cache_status,
    toUInt64(count()) AS requests,
    uniqCombinedState(17)(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, response_status, cache_status;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_status_1d
(
    ts                  DateTime,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniqCombined(17), String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 8;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_status_1d_mv
TO ${database}.http_log_uniques_by_status_1d
AS SELECT
    toStartOfDay(timestamp) AS ts,
    response_status,
    cache_status,
    toUInt64(count()) AS requests,
    uniqCombinedState(17)(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, response_status, cache_status;

-- One resource's days, keyed by resource, for a resource's month-long series. 010's daily table
-- has the same buckets, but its uniq states of a busy resource's day are sampled (past 65,536
-- clients), and those were the slowest to read. Its 256-row granules also read ~8 other
-- resources' months.
CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_resource_combined_1d
(
    ts                  DateTime,
    resource_id         UInt64,
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniqCombined(17), String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (resource_id, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 16;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_resource_combined_1d_mv
TO ${database}.http_log_uniques_by_resource_combined_1d
AS SELECT
    toStartOfDay(timestamp) AS ts,
    resource_id,
    toUInt64(count()) AS requests,
    uniqCombinedState(17)(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, resource_id;

-- Run with the definer's rights, like every view (007): the loader's user may only INSERT into
-- http_log.
ALTER TABLE ${database}.http_log_uniques_6h_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_1d_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_by_status_6h_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_by_status_1d_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_by_resource_combined_1d_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
