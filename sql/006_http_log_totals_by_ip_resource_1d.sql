-- "Top 10 resources of one client" over days to months. Measured (docs/BENCHMARKS.md, "Top-N
-- panels"): http_log_totals, the only rollup with both IP and resource, is keyed by resource, so
-- an IP filter reads every row of the window (~94M at 30 days): p99 223-818 ms beyond 1 h. The
-- top-N summaries of 005 cannot answer it (one summary per client would not fit in memory, see
-- there).
--
-- This table keeps exact daily sums per (client, resource, status, cache status), keyed by client
-- first: a panel reads one client's rows of the window's days, ~45,000 a day for the busiest
-- client (10% of all requests), a few granules for most. Measured: 10-33 ms at 1-30 days for the
-- busiest clients. The cost is ~0.53 rows per raw row at 100M records a month (a pair seldom
-- repeats within a day) but 4.9-6.7 B a row, a sixth to a quarter of http_log's bytes over the
-- same days.
--
-- Buckets are whole UTC days: a panel reads the days its window touches, so its start is rounded
-- down to midnight (an hourly twin would cost ~0.74 rows per raw row, raw rows read at the edges
-- ~90 ms). A window that ends now includes today's bucket as far as it is loaded.
--
-- Exact under retried inserts like 002: own dedup window, and the loader inserts with
-- deduplicate_blocks_in_dependent_materialized_views = 1.
CREATE TABLE IF NOT EXISTS ${database}.http_log_totals_by_ip_resource_1d
(
    ts                  DateTime,
    remote_addr         String,
    resource_id         UInt64,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    bytes_sent          SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (remote_addr, ts, resource_id, response_status, cache_status)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_totals_by_ip_resource_1d_mv
TO ${database}.http_log_totals_by_ip_resource_1d
AS SELECT
    toStartOfDay(timestamp) AS ts,
    remote_addr,
    resource_id,
    response_status,
    cache_status,
    toUInt64(count()) AS requests,
    sum(bytes_sent) AS bytes_sent
FROM ${database}.http_log
GROUP BY ts, remote_addr, resource_id, response_status, cache_status;
