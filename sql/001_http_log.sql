-- Raw anonymized access log, one row per Kafka record of http_log_anon.
-- source_partition/source_offset identify the record in the input topic `http_log`, so `verify`
-- can prove exactly-once by offset. The dedup window makes a retried insert (same
-- insert_deduplication_token, or same bytes without a token) a no-op.
CREATE TABLE IF NOT EXISTS ${database}.http_log
(
    timestamp           DateTime CODEC(Delta, ZSTD(1)),
    resource_id         UInt64,
    bytes_sent          UInt64 CODEC(ZSTD(1)),
    request_time_milli  UInt64 CODEC(ZSTD(1)),
    response_status     UInt16,
    cache_status        LowCardinality(String),
    method              LowCardinality(String),
    remote_addr         String CODEC(ZSTD(1)),
    url                 String CODEC(ZSTD(1)),
    source_partition    Int32,
    source_offset       Int64
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(timestamp)
ORDER BY (resource_id, response_status, cache_status, timestamp)
${raw_ttl_clause}
SETTINGS non_replicated_deduplication_window = 10000;
