-- Top-N panels ("top 10 IPs", "top 10 resources") over windows of hours to months. Measured
-- (docs/BENCHMARKS.md, "Top-N panels"): an exact top 10 must aggregate every client or resource
-- in the window, and 30 days hold ~64M (IP, status, cache, minute) rows, so the rollups of 003
-- answered in 100-550 ms at p99. These tables keep, per hour, a Space-Saving summary
-- (ClickHouse `topK` with counts and error bounds) of the busiest clients and resources, so a
-- panel merges one summary per hour of the window instead of aggregating millions of rows.
--
-- Every row is one hour and one filter combination. 0 in response_status and '*' in
-- cache_status mean "any" (GROUPING SETS write them), so a panel without a status or cache
-- filter reads exactly one row per hour and never merges across statuses.
--
-- A summary holds 20 * 15 = 300 counters; `topK(..., 'counts')` returns (item, count, error)
-- with count an upper and count - error a lower bound. Panels rank by count - error: ClickHouse
-- merges summaries (parallel aggregation, parts, the hours of a window) by adding the smallest
-- count of one summary to every item of the other as error, also to items both hold, so only
-- the lower bound stays exact for an item that was never evicted, and the busiest ones never are
-- (measured: every checked panel equal to the exact answer). Panels read the hours the window
-- overlaps (whole hours) and take the first 10 of the merged 20.
--
-- http_log_top_1d is the same per day: a panel reads the whole days inside its window there and
-- only the hours at its two ends here, so 30 days merge ~30-76 summaries instead of 720.
--
-- A row is ~3 KiB (two full summaries), so the default granule (8192 rows, or 10 MiB) made a
-- 30-day panel deserialize ~15,000 summaries to use 720: 64 rows per granule cut it from ~160 ms
-- to ~35 ms (measured at 100M raw rows).
--
-- requests and bytes_sent are plain sums, so `verify` can prove that retried inserts did not
-- double-count here either (the "any"/"any" rows must sum to the raw table).
--
-- Exact under retried inserts like 002: every target has its own dedup window and the loader
-- inserts with deduplicate_blocks_in_dependent_materialized_views = 1.
CREATE TABLE IF NOT EXISTS ${database}.http_log_top_1h
(
    ts                  DateTime,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    bytes_sent          SimpleAggregateFunction(sum, UInt64),
    top_ips             AggregateFunction(topK(20, 15, 'counts'), String),
    top_resources       AggregateFunction(topK(20, 15, 'counts'), UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 64;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_top_1h_mv
TO ${database}.http_log_top_1h
AS SELECT
    bucket AS ts,
    if(grouping(status) = 1, toUInt16(0), status) AS response_status,
    if(grouping(cache) = 1, '*', cache) AS cache_status,
    toUInt64(count()) AS requests,
    sum(bytes) AS bytes_sent,
    topKState(20, 15, 'counts')(ip) AS top_ips,
    topKState(20, 15, 'counts')(resource) AS top_resources
FROM
(
    SELECT toStartOfHour(timestamp) AS bucket, response_status AS status, cache_status AS cache,
           remote_addr AS ip, resource_id AS resource, bytes_sent AS bytes
    FROM ${database}.http_log
)
GROUP BY GROUPING SETS ((bucket, status, cache), (bucket, status), (bucket, cache), (bucket));

-- The daily twin: the same columns, key, expiry and settings.
CREATE TABLE IF NOT EXISTS ${database}.http_log_top_1d AS ${database}.http_log_top_1h;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_top_1d_mv
TO ${database}.http_log_top_1d
AS SELECT
    bucket AS ts,
    if(grouping(status) = 1, toUInt16(0), status) AS response_status,
    if(grouping(cache) = 1, '*', cache) AS cache_status,
    toUInt64(count()) AS requests,
    sum(bytes) AS bytes_sent,
    topKState(20, 15, 'counts')(ip) AS top_ips,
    topKState(20, 15, 'counts')(resource) AS top_resources
FROM
(
    SELECT toStartOfDay(timestamp) AS bucket, response_status AS status, cache_status AS cache,
           remote_addr AS ip, resource_id AS resource, bytes_sent AS bytes
    FROM ${database}.http_log
)
GROUP BY GROUPING SETS ((bucket, status, cache), (bucket, status), (bucket, cache), (bucket));
