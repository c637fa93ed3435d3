-- Rollups without one or both of the high-cardinality dimensions, so every Grafana filter
-- combination reads a table whose ORDER BY starts with what it filters on. Measured (docs/
-- BENCHMARKS.md, "Query time of the totals table"): on http_log_totals alone, a query without a
-- resource filter scans the whole month, and per-minute rows with the client IP barely aggregate
-- (IPs are nearly unique per minute), so that table is almost as large as the raw one.
--
-- Which table answers a query: resource and IP filtered -> http_log_totals; resource, no IP ->
-- http_log_totals_by_resource; IP, no resource -> http_log_totals_by_ip; neither ->
-- http_log_totals_by_status. Top-N IPs: http_log_totals_by_ip (or http_log_totals with a resource
-- filter); top-N resources: http_log_totals_by_resource (or http_log_totals with an IP filter).
-- Charts whose buckets are whole hours over whole hours (7 d, 30 d) read the `_1h` twins of the
-- two IP-less rollups: a 30-day chart of the busiest resource reads ~60x fewer rows there.
--
-- Exact under retried inserts like 002: every target has its own dedup window and the loader
-- inserts with deduplicate_blocks_in_dependent_materialized_views = 1.
CREATE TABLE IF NOT EXISTS ${database}.http_log_totals_by_resource
(
    ts                  DateTime,
    resource_id         UInt64,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    bytes_sent          SimpleAggregateFunction(sum, UInt64),
    request_time_milli  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (resource_id, response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_totals_by_resource_mv
TO ${database}.http_log_totals_by_resource
AS SELECT
    toStartOfMinute(timestamp) AS ts,
    resource_id,
    response_status,
    cache_status,
    toUInt64(count()) AS requests,
    sum(bytes_sent) AS bytes_sent,
    sum(request_time_milli) AS request_time_milli
FROM ${database}.http_log
GROUP BY ts, resource_id, response_status, cache_status;

CREATE TABLE IF NOT EXISTS ${database}.http_log_totals_by_ip
(
    ts                  DateTime,
    remote_addr         String,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    bytes_sent          SimpleAggregateFunction(sum, UInt64),
    request_time_milli  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (remote_addr, response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_totals_by_ip_mv
TO ${database}.http_log_totals_by_ip
AS SELECT
    toStartOfMinute(timestamp) AS ts,
    remote_addr,
    response_status,
    cache_status,
    toUInt64(count()) AS requests,
    sum(bytes_sent) AS bytes_sent,
    sum(request_time_milli) AS request_time_milli
FROM ${database}.http_log
GROUP BY ts, remote_addr, response_status, cache_status;

CREATE TABLE IF NOT EXISTS ${database}.http_log_totals_by_status
(
    ts                  DateTime,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    bytes_sent          SimpleAggregateFunction(sum, UInt64),
    request_time_milli  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_totals_by_status_mv
TO ${database}.http_log_totals_by_status
AS SELECT
    toStartOfMinute(timestamp) AS ts,
    response_status,
    cache_status,
    toUInt64(count()) AS requests,
    sum(bytes_sent) AS bytes_sent,
    sum(request_time_milli) AS request_time_milli
FROM ${database}.http_log
GROUP BY ts, response_status, cache_status;

CREATE TABLE IF NOT EXISTS ${database}.http_log_totals_by_resource_1h
(
    ts                  DateTime,
    resource_id         UInt64,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    bytes_sent          SimpleAggregateFunction(sum, UInt64),
    request_time_milli  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (resource_id, response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_totals_by_resource_1h_mv
TO ${database}.http_log_totals_by_resource_1h
AS SELECT
    toStartOfHour(timestamp) AS ts,
    resource_id, response_status, cache_status,
    toUInt64(count()) AS requests,
    sum(bytes_sent) AS bytes_sent,
    sum(request_time_milli) AS request_time_milli
FROM ${database}.http_log
GROUP BY ts, resource_id, response_status, cache_status;

CREATE TABLE IF NOT EXISTS ${database}.http_log_totals_by_status_1h
(
    ts                  DateTime,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    requests            SimpleAggregateFunction(sum, UInt64),
    bytes_sent          SimpleAggregateFunction(sum, UInt64),
    request_time_milli  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (response_status, cache_status, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_totals_by_status_1h_mv
TO ${database}.http_log_totals_by_status_1h
AS SELECT
    toStartOfHour(timestamp) AS ts,
    response_status, cache_status,
    toUInt64(count()) AS requests,
    sum(bytes_sent) AS bytes_sent,
    sum(request_time_milli) AS request_time_milli
FROM ${database}.http_log
GROUP BY ts, response_status, cache_status;
