#!/usr/bin/env python3
"""Run the real ClickHouse HTTP (and native TCP) server that ships inside the chdb-core wheel.

chdb-core's `_chdb.query()` runs clickhouse-local's LocalServer, which (ClickHouse >= 26.6) can
`SYSTEM START LISTEN HTTP|TCP`. clickhouse-local reads ./config.xml from the working directory,
which sets the listen address, ports and users file. The listeners live as long as the query
runs, so the last statement sleeps until the process is killed.

Usage: clickhouse_server.py --data DIR [--host 127.0.0.1] [--http-port 8123] [--tcp-port 9000]
                            [--users-xml FILE] [--max-server-memory-gib N]
                            [--extra-config FILE] [--display-name NAME]
"""
import argparse
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True, help="MergeTree data directory (persistent)")
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--http-port", type=int, default=8123)
ap.add_argument("--tcp-port", type=int, default=9000, help="0 = no native TCP listener")
ap.add_argument("--users-xml", default="", help="users, passwords, profiles")
ap.add_argument("--max-server-memory-gib", type=float, default=0, help="0 = ClickHouse default")
ap.add_argument(
    "--extra-config", default="", help="XML elements added inside <clickhouse> (e.g. remote_servers)"
)
ap.add_argument("--display-name", default="edgelog-local")
a = ap.parse_args()
extra = open(a.extra_config).read() if a.extra_config else ""

data = os.path.abspath(a.data)
run = os.path.join(data, "_run")
os.makedirs(run, exist_ok=True)
users = f"<users_config>{os.path.abspath(a.users_xml)}</users_config>" if a.users_xml else ""
memory = (
    f"<max_server_memory_usage>{int(a.max_server_memory_gib * 2**30)}</max_server_memory_usage>"
    if a.max_server_memory_gib
    else ""
)
with open(os.path.join(run, "config.xml"), "w") as f:
    f.write(
        f"""<clickhouse>
  <listen_host>{a.host}</listen_host>
  <http_port>{a.http_port}</http_port>
  <tcp_port>{a.tcp_port}</tcp_port>
  <display_name>{a.display_name}</display_name>
  {users}
  {memory}
  {extra}
</clickhouse>
"""
    )
os.chdir(run)  # clickhouse-local picks up ./config.xml

import chdb._chdb as _chdb  # noqa: E402  (the chdb-core wheel; pandas/pyarrow are not needed)

listen = "SYSTEM START LISTEN HTTP; " + ("SYSTEM START LISTEN TCP; " if a.tcp_port else "")
hold = (
    "SELECT count() /* edgelog_clickhouse_hold */ FROM system.numbers WHERE sleepEachRow(1) = 0 "
    "SETTINGS max_block_size = 1, max_execution_time = 0"
)
print(f"ClickHouse (chdb-core) pid={os.getpid()} http://{a.host}:{a.http_port}/ data={data}", flush=True)
result = _chdb.query(listen + hold, "TabSeparated", path=data)
if result.has_error():
    print("server query ended with error:", result.error_message(), file=sys.stderr, flush=True)
    sys.exit(1)
print("holder query ended; exiting", flush=True)
