#!/usr/bin/env bash
# Rows, compressed bytes and bytes per row of every table of a database (active parts), the
# figures `shared/capacity.rs` keeps per table.
#
#   scripts/uniques-sizes.sh DATABASE [CLICKHOUSE_URL]
set -euo pipefail
db=${1:?database}
url=${2:-http://127.0.0.1:8123/}
curl -sS --fail-with-body "$url" --data-binary "
  SELECT table, sum(rows) AS n_rows, count() AS parts,
         formatReadableSize(sum(data_compressed_bytes)) AS compressed,
         round(sum(data_compressed_bytes) / greatest(sum(rows), 1), 2) AS bytes_per_row
  FROM system.parts WHERE database = '$db' AND active
  GROUP BY table ORDER BY table FORMAT PrettyCompactMonoBlock"
