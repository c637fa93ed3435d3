-- The top resources by unique clients over the trailing 1, 2, 7 and 30 days, computed ahead every
-- 5 minutes (issue 20, "top resources ... p99 <= 50 ms").
--
-- Ranked from states, the top 10 over 7 or 30 days stays over the goal whatever the states: each
-- candidate's count is finalized from its daily states, ~1.5-3 ms per busy resource, 171 and
-- 374 ms p99 at 100M raw rows with 100 candidates (docs/BENCHMARKS.md, "Unique clients at 100M
-- rows (migration 011)"); over a day, 31-45 ms p99, close to it. So a refreshable view finalizes
-- every resource's count over the windows Grafana's "Last 24 hours", "Last 2 days", "Last 7 days"
-- and "Last 30 days" cover, and the dashboard reads the 1,000 largest of each window instead of
-- the states when its range is one of those.
--
-- A window is what the dashboard's top-10 panel reads for a range of a day or more: the whole UTC
-- days the range touches. "Last 7 days" at time T is [toStartOfDay(T - 7 days), T], window_days
-- 7; "Last 24 hours" is window_days 1. The panel uses a window only when it starts where the
-- range does and was computed at most 10 minutes before the range's end. Otherwise (another
-- range, a resource filter, a refresh that failed or has not run yet) it merges the states as
-- before: slower, never staler.
--
-- Nothing here is traffic of record: the table is replaced whole by every refresh, from
-- migration 010's per-resource daily states, which `verify` checks and `backfill`/`replay`
-- rebuild. Late or replayed records show up at the next refresh (`replay` and `backfill` ask for
-- one when they finish). A refresh reads the whole window's states: ~2 s for 10,000 resources
-- over 30 days at 100M raw rows.
--
-- In cluster mode each node keeps its own copy, refreshed from the Distributed tables (the whole
-- cluster's states), so any node answers for all shards (shared/cluster_schema.rs).
CREATE TABLE IF NOT EXISTS ${database}.http_log_uniques_top_trailing
(
    window_days         UInt16,
    window_start        DateTime,
    computed_at         DateTime,
    resource_id         UInt64,
    unique_clients      UInt64,
    requests            UInt64
)
ENGINE = MergeTree
ORDER BY (window_start, resource_id);

-- From the states the panel merges for any other range of days (010's uniq states, keyed by
-- resource), so both routes give the same count for any resource they both rank; `now()` is the
-- refresh's start. One SELECT per window: the merged states of every resource are the memory a
-- refresh needs, and an ARRAY JOIN over the windows held all four at once (~300 against 480 MB at
-- 100M raw rows; docs/BENCHMARKS.md, "the top 10 computed ahead").
CREATE MATERIALIZED VIEW IF NOT EXISTS ${database}.http_log_uniques_top_trailing_mv
REFRESH EVERY 5 MINUTE
TO ${database}.http_log_uniques_top_trailing
AS WITH now() AS computed_at
SELECT
    window_days,
    toStartOfDay(computed_at - window_days * 86400) AS window_start,
    computed_at,
    resource_id,
    unique_clients,
    requests
FROM (
    SELECT 1 AS window_days, resource_id, uniqMerge(clients) AS unique_clients,
        toUInt64(sum(requests)) AS requests
    FROM ${database}.http_log_uniques_by_resource_keyed_1d
    WHERE ts >= toStartOfDay(computed_at - 1 * 86400) AND ts <= computed_at
    GROUP BY resource_id ORDER BY unique_clients DESC, resource_id LIMIT 1000
    UNION ALL
    SELECT 2 AS window_days, resource_id, uniqMerge(clients) AS unique_clients,
        toUInt64(sum(requests)) AS requests
    FROM ${database}.http_log_uniques_by_resource_keyed_1d
    WHERE ts >= toStartOfDay(computed_at - 2 * 86400) AND ts <= computed_at
    GROUP BY resource_id ORDER BY unique_clients DESC, resource_id LIMIT 1000
    UNION ALL
    SELECT 7 AS window_days, resource_id, uniqMerge(clients) AS unique_clients,
        toUInt64(sum(requests)) AS requests
    FROM ${database}.http_log_uniques_by_resource_keyed_1d
    WHERE ts >= toStartOfDay(computed_at - 7 * 86400) AND ts <= computed_at
    GROUP BY resource_id ORDER BY unique_clients DESC, resource_id LIMIT 1000
    UNION ALL
    SELECT 30 AS window_days, resource_id, uniqMerge(clients) AS unique_clients,
        toUInt64(sum(requests)) AS requests
    FROM ${database}.http_log_uniques_by_resource_keyed_1d
    WHERE ts >= toStartOfDay(computed_at - 30 * 86400) AND ts <= computed_at
    GROUP BY resource_id ORDER BY unique_clients DESC, resource_id LIMIT 1000
);

-- The refresh runs with its definer's rights, like every view (sql/007).
ALTER TABLE ${database}.http_log_uniques_top_trailing_mv MODIFY SQL SECURITY DEFINER DEFINER = CURRENT_USER;
