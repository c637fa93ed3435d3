-- Codecs chosen by measurement (docs/BENCHMARKS.md, "http_log: ORDER BY and codecs"): the two
-- source-position columns were stored with the default LZ4 and took 6.9 of 18.8 B/row. They are
-- read only by audits, so a heavier codec costs dashboards nothing; Delta suits offsets, which
-- rise within each (resource, status, cache) run. Saves ~4.2 B/row (22%). Applies to new parts;
-- existing parts convert when merged. The ORDER BY of 001 measured as good as the alternatives.
ALTER TABLE ${database}.http_log
    MODIFY COLUMN source_partition Int32 CODEC(ZSTD(1)),
    MODIFY COLUMN source_offset Int64 CODEC(Delta, ZSTD(1));
