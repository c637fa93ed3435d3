-- What `edgelog verify` has already proven, so a re-run audits only what is new (docs/
-- ARCHITECTURE.md, "The audit").
--
-- verify_audited: one row per clean, settled offset bucket of a source partition: every input
-- record of [first_offset, end_offset) is in http_log exactly once or dead-lettered, and none is
-- in flight. `rows` and `fingerprint` (sum of cityHash64(source_offset), wrapping) are what
-- http_log held for it; a later run recomputes both (one scan of two columns, grouped per bucket)
-- and audits the bucket again if either changed (a late duplicate, a deleted row, or both). Replacing on
-- (topic, partition, first_offset): re-recording a bucket keeps the newest row.
CREATE TABLE IF NOT EXISTS ${database}.verify_audited
(
    topic               String,
    source_partition    Int32,
    first_offset        Int64,
    end_offset          Int64,
    input_records       UInt64,
    dead_lettered       UInt64,
    rows                UInt64,
    fingerprint         UInt64,
    audited_at          DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(audited_at)
ORDER BY (topic, source_partition, first_offset);

-- verify_days_audited: one row per closed UTC day whose rollups equal a recount of http_log,
-- with the raw count and bytes seen then; a day is checked again when those change.
CREATE TABLE IF NOT EXISTS ${database}.verify_days_audited
(
    day                 Date,
    raw_rows            UInt64,
    raw_bytes           UInt64,
    audited_at          DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree(audited_at)
ORDER BY day;

-- The audit reads http_log one offset bucket of one partition at a time. http_log is ordered by
-- resource, so without this index every bucket would read the whole table. A loader batch is a
-- run of offsets, so fresh parts skip well; merged parts of one day span that day's offsets, so a
-- bucket reads the days its offsets were written on. Parts written before this migration get
-- the index when they are merged.
ALTER TABLE ${database}.http_log
    ADD INDEX IF NOT EXISTS source_offset_minmax source_offset TYPE minmax GRANULARITY 1;
