-- Distinct clients ("unique clients") per bucket, kept as long as the totals (the raw rows that
-- could answer it expire after raw_ttl_days). A client is an anonymized address (`a.b.c.X`, or
-- the first 48 bits of an IPv6 address), so the figure counts distinct IPv4 /24s and IPv6 /48s,
-- not people: a NAT or a whole office is one client, two neighbours on one /24 are one too.
--
-- Each row holds a mergeable `uniq` state (ClickHouse's adaptive-sampling distinct count):
-- merging the states of the minutes of an hour, or of the resources of a site, gives the distinct
-- count of the union, never a sum of counts. Chosen by measurement (docs/BENCHMARKS.md, "Unique
-- clients", scripts/uniques-error.sh): a state keeps every hash up to 65,536 values (exact in
-- the 100 busiest buckets of every table at 38.6 records/s) and samples beyond (0.1-0.2% off
-- over whole days); ~4 B per distinct client, 13.5 B a per-minute resource row. The 12-bit HLL
-- sketches missed 1% at p99, uniqCombined(17) met it at twice the size.
--
-- New tables with their own views, not columns on the rollups of 003: changing an existing view
-- broke the dedup of a batch retried across the upgrade (its first attempt had gone through the
-- old view). `requests` is a plain sum: a double-counted retry cannot show in a distinct count,
-- so `verify` proves these tables saw every insert once by their request sums.
--
-- Which table answers what: a resource's series -> http_log_uniques_by_resource (minutes, keyed
-- by resource); top resources by clients -> http_log_uniques_by_resource_1d (whole days, keyed by
-- day); status/cache series -> http_log_uniques_by_status (+ _1h for hourly buckets); all traffic
-- -> http_log_uniques (+ _1h).
--
-- Exact under retried inserts like 002: every target has its own dedup window and the loader
-- inserts with deduplicate_blocks_in_dependent_materialized_views = 1 and squashed view blocks.
CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_resource
(
    ts                  DateTime,
    resource_id         UInt64,
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (resource_id, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_resource_mv
TO ${database}.http_log_uniques_by_resource
AS SELECT
    toStartOfMinute(timestamp) AS ts,
    resource_id,
    toUInt64(count()) AS requests,
    uniqState(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, resource_id;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_resource_1d
(
    ts                  DateTime,
    resource_id         UInt64,
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, resource_id)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_resource_1d_mv
TO ${database}.http_log_uniques_by_resource_1d
AS SELECT
    toStartOfDay(timestamp) AS ts,
    resource_id,
    toUInt64(count()) AS requests,
    uniqState(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, resource_id;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_status
(
    ts                  DateTime,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_status_mv
TO ${database}.http_log_uniques_by_status
AS SELECT
    toStartOfMinute(timestamp) AS ts,
    response_status,
    cache_status,
    toUInt64(count()) AS requests,
    uniqState(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, response_status, cache_status;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_status_1h
(
    ts                  DateTime,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_status_1h_mv
TO ${database}.http_log_uniques_by_status_1h
AS SELECT
    toStartOfHour(timestamp) AS ts,
    response_status,
    cache_status,
    toUInt64(count()) AS requests,
    uniqState(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, response_status, cache_status;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques
(
    ts                  DateTime,
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY ts
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_mv
TO ${database}.http_log_uniques
AS SELECT
    toStartOfMinute(timestamp) AS ts,
    toUInt64(count()) AS requests,
    uniqState(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_1h
(
    ts                  DateTime,
    requests            SimpleAggregateFunction(sum, UInt64),
    clients             AggregateFunction(uniq, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY ts
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_1h_mv
TO ${database}.http_log_uniques_1h
AS SELECT
    toStartOfHour(timestamp) AS ts,
    toUInt64(count()) AS requests,
    uniqState(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts;

-- Run with the definer's rights, like every view (007): the loader's user may only INSERT into
-- http_log.
ALTER TABLE ${database}.http_log_uniques_by_resource_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_by_resource_1d_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_by_status_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_by_status_1h_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_1h_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
