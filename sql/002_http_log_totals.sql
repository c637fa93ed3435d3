-- Traffic totals per minute for any combination of resource, status, cache status and client IP.
-- Grafana charts read this, never the raw table. Fed by the materialized view below; exact under
-- retried inserts because the target has its own dedup window and the loader inserts with
-- deduplicate_blocks_in_dependent_materialized_views = 1.
CREATE TABLE IF NOT EXISTS ${database}.http_log_totals
(
    ts                  DateTime,
    resource_id         UInt64,
    response_status     UInt16,
    cache_status        LowCardinality(String),
    remote_addr         String,
    requests            SimpleAggregateFunction(sum, UInt64),
    bytes_sent          SimpleAggregateFunction(sum, UInt64),
    request_time_milli  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (resource_id, response_status, cache_status, remote_addr, ts)
${totals_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_totals_mv
TO ${database}.http_log_totals
AS SELECT
    toStartOfMinute(timestamp) AS ts,
    resource_id,
    response_status,
    cache_status,
    remote_addr,
    toUInt64(count()) AS requests,
    sum(bytes_sent) AS bytes_sent,
    sum(request_time_milli) AS request_time_milli
FROM ${database}.http_log
GROUP BY ts, resource_id, response_status, cache_status, remote_addr;
