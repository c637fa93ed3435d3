#!/usr/bin/env python3
"""Applies sql/ migration files to a scratch database, as `edgelog setup` renders them with the
TTLs off (bench and measurement scripts; `edgelog setup` itself is the real thing).

    scripts/apply-migrations.py DATABASE CLICKHOUSE_URL FILE...
"""
import sys
import urllib.request

db, url, files = sys.argv[1], sys.argv[2], sys.argv[3:]
for f in files:
    sql = open(f).read().replace("${database}", db)
    sql = sql.replace("${raw_ttl_clause}", "").replace("${totals_ttl_clause}", "")
    stmt = []
    for line in sql.splitlines():  # as shared/setup.rs `statements`
        if line.strip().startswith("--"):
            continue
        stmt.append(line)
        if line.rstrip().endswith(";"):
            text = "\n".join(stmt).strip().rstrip(";")
            if text:
                urllib.request.urlopen(urllib.request.Request(url, data=text.encode())).read()
            stmt = []
