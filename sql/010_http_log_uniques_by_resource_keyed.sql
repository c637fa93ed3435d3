-- One resource's unique clients over long ranges, read from few rows (issue 20, "p99 <= 50 ms").
--
-- Migration 009 keeps a resource's states per minute keyed by resource (a 30-day series merges
-- 43,200 minute states) and per day keyed by day (the top-10 table, which reads every resource of
-- a day). Neither answers "this resource over 7 or 30 days" from few rows. These two tables hold
-- the same states per hour and per day keyed by (resource_id, ts), with small granules so that
-- one resource's days are a few granules, not the 8,192-row default that mostly holds other
-- resources. They also serve the top-10 table's second step: the states of the busiest
-- resources (chosen from the sums of http_log_totals_by_resource_1h) read by key.
--
-- New tables with their own views, not changes to 009's (a changed view breaks the dedup of a
-- batch retried across the upgrade, see 009). Exact under retried inserts like every rollup: a
-- dedup window on each target, the loader's deduplicate_blocks_in_dependent_materialized_views,
-- and `requests` is a plain sum so that `verify` proves each insert was seen once.
CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_resource_1h
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
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_resource_1h_mv
TO ${database}.http_log_uniques_by_resource_1h
AS SELECT
    toStartOfHour(timestamp) AS ts,
    resource_id,
    toUInt64(count()) AS requests,
    uniqState(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, resource_id;

CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_by_resource_keyed_1d
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
SETTINGS non_replicated_deduplication_window = 10000, index_granularity = 256;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_by_resource_keyed_1d_mv
TO ${database}.http_log_uniques_by_resource_keyed_1d
AS SELECT
    toStartOfDay(timestamp) AS ts,
    resource_id,
    toUInt64(count()) AS requests,
    uniqState(remote_addr) AS clients
FROM ${database}.http_log
GROUP BY ts, resource_id;

-- Run with the definer's rights, like every view (007): the loader's user may only INSERT into
-- http_log.
ALTER TABLE ${database}.http_log_uniques_by_resource_1h_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
ALTER TABLE ${database}.http_log_uniques_by_resource_keyed_1d_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
