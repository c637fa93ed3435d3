"""Static checks of the Docker deployment files (steps 1-6 of docker/check.sh, which documents
them): run by check.sh as `python3 docker/check_static.py TMPDIR [DEFAULTS.toml]` from the
repository root. Writes one env file per edgelog service into TMPDIR for check.sh's binary check.

DEFAULTS.toml is what the built `edgelog config` prints with an empty environment: the settings'
defaults as the real loader has them. Whether each EDGELOG_* variable is a key of the right type is
not checked here: step 7 loads every service's environment with that same binary, which refuses
unknown keys and bad values."""
import base64, glob, hashlib, ipaddress, json, os, re, sys, tomllib, xml.etree.ElementTree as ET
from urllib.parse import urlsplit

import yaml

TMP = sys.argv[1]
DEFAULTS = None
if len(sys.argv) > 2:
    with open(sys.argv[2], "rb") as f:
        DEFAULTS = tomllib.load(f)
problems, warnings = [], []


def problem(msg):
    problems.append(msg)


def check(cond, msg):
    if not cond:
        problem(msg)
    return cond


def load_yaml(path):
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except Exception as e:  # noqa: BLE001 - report any parse error
        problem(f"{path}: does not parse as YAML: {e}")
        return None
    check(isinstance(data, dict), f"{path}: top level is not a mapping")
    return data if isinstance(data, dict) else None


def read(path):
    with open(path) as f:
        return f.read()


# ---------------------------------------------------------------- 1. parse everything
compose = load_yaml("docker-compose.yml") or {}
prom_cfg = load_yaml("docker/prometheus/prometheus.yml") or {}
prov_files = sorted(glob.glob("docker/grafana/provisioning/*/*.y*ml"))
check(prov_files, "no Grafana provisioning files under docker/grafana/provisioning/")
prov = {p: load_yaml(p) or {} for p in prov_files}
dash_files = sorted(glob.glob("docker/grafana/dashboards/*.json"))
dashboards = {}
for p in dash_files:
    try:
        dashboards[p] = json.loads(read(p))
    except Exception as e:  # noqa: BLE001
        problem(f"{p}: invalid JSON: {e}")
for want in ("edgelog-traffic.json", "edgelog-pipeline.json"):
    check(f"docker/grafana/dashboards/{want}" in dash_files, f"dashboard {want} is missing")
try:
    users_xml = ET.parse("docker/clickhouse/users.xml").getroot()
except Exception as e:  # noqa: BLE001
    problem(f"docker/clickhouse/users.xml: not well-formed XML: {e}")
    users_xml = ET.Element("clickhouse")

services = compose.get("services") or {}
check(isinstance(services, dict) and services, "docker-compose.yml: no services")

# ---------------------------------------------------------------- the project's own facts
cargo = read("Cargo.toml")
bins = re.findall(r'\[\[bin\]\]\s*\nname\s*=\s*"([^"]+)"', cargo)
check(sorted(bins) == ["anonymizer", "edgelog", "loader", "producer"],
      f"Cargo.toml [[bin]] names are {bins}, expected producer/anonymizer/loader/edgelog")



def default_of(section, key):
    """The built binary's default of `section.key`, or None without a binary (that check is then
    skipped, as step 7 is)."""
    return (DEFAULTS or {}).get(section, {}).get(key)


def valid_socket_addr(v):
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([0-9.]+):(\d+)", v)
    if not m:
        return False
    ip, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return 0 < int(port) < 65536


# ---------------------------------------------------------------- 3. compose structure
REQUIRED = ["kafka", "clickhouse", "ch-proxy", "setup", "producer", "anonymizer", "loader",
            "prometheus", "grafana"]
for s in REQUIRED:
    check(s in services, f"docker-compose.yml: service {s!r} is missing")
EDGELOG_SERVICES = {"setup": "edgelog", "verify": "edgelog", "producer": "producer", "anonymizer": "anonymizer",
                    "loader": "loader"}
HOST_PORTS = {"kafka": 9092, "clickhouse": 8123, "ch-proxy": 8124, "producer": 9101,
              "anonymizer": 9102, "loader": 9103, "verify": 9104, "prometheus": 9090, "grafana": 3000}


def env_of(svc):
    env = (services.get(svc) or {}).get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): ("" if v is None else str(v)) for k, v in env.items()}


def published(svc):
    """[(host_ip, host_port, container_port)] of a service's short-syntax ports."""
    out = []
    for p in (services.get(svc) or {}).get("ports") or []:
        parts = str(p).split("/")[0].split(":")
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), int(parts[2])))
        elif len(parts) == 2:
            out.append(("0.0.0.0", int(parts[0]), int(parts[1])))
        else:
            problem(f"docker-compose.yml: {svc}: port {p!r} publishes no fixed host port")
    return out


seen_host_ports = {}
for name, svc in services.items():
    svc = svc or {}
    image = str(svc.get("image", ""))
    if name in EDGELOG_SERVICES:
        check(image == "edgelog:local", f"{name}: image should be edgelog:local, is {image!r}")
        build = svc.get("build") or {}
        check(isinstance(build, dict) and build.get("context") == "."
              and build.get("dockerfile") == "docker/Dockerfile",
              f"{name}: build must be context '.' + dockerfile docker/Dockerfile")
    else:
        check(re.fullmatch(r"[\w./-]+:[\w.-]+", image) is not None and not image.endswith(":latest"),
              f"{name}: image {image!r} is not pinned to a tag")
    for host_ip, host_port, _ in published(name):
        check(host_ip == "127.0.0.1",
              f"{name}: host port {host_port} is published on {host_ip}, not 127.0.0.1")
        check(host_port not in seen_host_ports,
              f"host port {host_port} published by {name} and {seen_host_ports.get(host_port)}")
        seen_host_ports[host_port] = name
for svc, port in HOST_PORTS.items():
    check(port in [h for _, h, _ in published(svc)],
          f"{svc}: host port {port} (the local stack's) is not published")
extra = set(seen_host_ports) - set(HOST_PORTS.values())
check(not extra, f"unexpected host ports published: {sorted(extra)}")


def depends(svc):
    d = (services.get(svc) or {}).get("depends_on") or {}
    if isinstance(d, list):
        return {k: "service_started" for k in d}
    return {k: (v or {}).get("condition", "service_started") for k, v in d.items()}


for dep in ("kafka", "clickhouse"):
    check(depends("setup").get(dep) == "service_healthy",
          f"setup must depend on {dep} with condition service_healthy")
    check((services.get(dep) or {}).get("healthcheck", {}).get("test"),
          f"{dep}: no healthcheck (setup waits for it)")
check(depends("ch-proxy").get("clickhouse") == "service_healthy",
      "ch-proxy must wait for clickhouse (nginx resolves the upstream at start)")
for stage, binary in EDGELOG_SERVICES.items():
    svc = services.get(stage) or {}
    cmd = svc.get("command")
    cmd = cmd.split() if isinstance(cmd, str) else (cmd or [])
    check(cmd[:1] == [binary] and binary in bins,
          f"{stage}: command should run the {binary!r} binary, is {cmd}")
    if stage == "setup":
        check(cmd == ["edgelog", "setup"], f"setup: command should be edgelog setup, is {cmd}")
        check(str(svc.get("restart", "no")) == "no", "setup: must not restart (it runs once)")
        continue
    check(depends(stage).get("setup") == "service_completed_successfully",
          f"{stage}: must depend on setup with condition service_completed_successfully")
    check(svc.get("restart") == "unless-stopped", f"{stage}: restart should be unless-stopped")

# Kafka: KRaft single node with what transactions need.
kenv = env_of("kafka")
KAFKA_WANT = {
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
}
for k, v in KAFKA_WANT.items():
    check(kenv.get(k) == v, f"kafka: {k} should be {v!r}, is {kenv.get(k)!r}")
for k in ("KAFKA_NODE_ID", "KAFKA_LISTENERS", "KAFKA_ADVERTISED_LISTENERS",
          "KAFKA_CONTROLLER_LISTENER_NAMES", "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
          "KAFKA_CONTROLLER_QUORUM_VOTERS"):
    check(kenv.get(k), f"kafka: {k} is not set")
if kenv.get("CLUSTER_ID"):
    cid = kenv["CLUSTER_ID"]
    try:
        ok = len(base64.urlsafe_b64decode(cid + "=" * (-len(cid) % 4))) == 16 and len(cid) == 22
    except Exception:  # noqa: BLE001
        ok = False
    check(ok, f"kafka: CLUSTER_ID {cid!r} is not a base64url-encoded 16-byte UUID")
listeners = dict(re.findall(r"(\w+)://([^,]*)", kenv.get("KAFKA_LISTENERS", "")))
advertised = dict(re.findall(r"(\w+)://([^,]*)", kenv.get("KAFKA_ADVERTISED_LISTENERS", "")))
proto_map = dict(x.split(":") for x in kenv.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "").split(",") if ":" in x)
for lname in listeners:
    check(lname in proto_map, f"kafka: listener {lname} has no security protocol mapping")
for lname in advertised:
    check(lname in listeners, f"kafka: advertised listener {lname} is not in KAFKA_LISTENERS")
for _, host_port, container_port in published("kafka"):
    names = [n for n, a in listeners.items() if a.rsplit(":", 1)[-1] == str(container_port)]
    check(names and advertised.get(names[0]) in (f"localhost:{host_port}", f"127.0.0.1:{host_port}"),
          f"kafka: host port {host_port} -> {container_port} must be a listener advertised as "
          f"localhost:{host_port}")

# ---------------------------------------------------------------- 2. EDGELOG_* variables
users = {u.tag: u for u in users_xml.findall("./users/*")}


def user_hash(name):
    u = users.get(name)
    h = u.findtext("password_sha256_hex") if u is not None else None
    return (h or "").strip().lower()


for name, u in users.items():
    h = u.findtext("password_sha256_hex")
    if h is not None:
        check(re.fullmatch(r"[0-9a-f]{64}", h.strip().lower()) is not None,
              f"users.xml: {name}: password_sha256_hex is not 64 hex digits")

service_hosts = set(services)
env_files = {}
for svc_name, svc in services.items():
    env = env_of(svc_name)
    edgelog_env = {k: v for k, v in env.items() if k.startswith("EDGELOG_")}
    if svc_name in EDGELOG_SERVICES:
        env_files[svc_name] = edgelog_env
    else:
        check(not edgelog_env, f"{svc_name}: EDGELOG_* variables on a non-edgelog service")
    if svc_name not in EDGELOG_SERVICES:
        continue
    # Addresses must point at the right services.
    brokers = env.get("EDGELOG_KAFKA__BROKERS", "")
    in_network = sorted(a for a in advertised.values() if a.split(":")[0] in service_hosts)
    check(brokers and all(b in in_network for b in brokers.split(",")),
          f"{svc_name}: EDGELOG_KAFKA__BROKERS={brokers!r} is not one of Kafka's advertised "
          f"in-network listeners {in_network}")
    for var, want_svc in (("EDGELOG_CLICKHOUSE__URL", "ch-proxy"),
                          ("EDGELOG_CLICKHOUSE__ADMIN_URL", "clickhouse")):
        url = env.get(var)
        if not check(url, f"{svc_name}: {var} is not set"):
            continue
        u = urlsplit(url)
        check(u.scheme in ("http", "https") and "@" not in u.netloc,
              f"{svc_name}: {var}={url!r}: http(s) URL without credentials expected")
        container_ports = {c for _, _, c in published(want_svc)}
        check(u.hostname == want_svc and u.port in container_ports,
              f"{svc_name}: {var}={url!r} should point at {want_svc} on one of {sorted(container_ports)}")
    section = {"setup": None, "verify": None, "producer": "PRODUCER", "anonymizer": "ANONYMIZER",
               "loader": "LOADER"}[svc_name]
    if section:
        listen = env.get(f"EDGELOG_{section}__METRICS_LISTEN", "")
        if check(listen, f"{svc_name}: EDGELOG_{section}__METRICS_LISTEN is not set"):
            port = int(listen.rsplit(":", 1)[1]) if valid_socket_addr(listen) else None
            check(listen.startswith("0.0.0.0:"),
                  f"{svc_name}: metrics must listen on 0.0.0.0 inside the container, not {listen}")
            check(port == HOST_PORTS[svc_name] and port in [c for _, _, c in published(svc_name)],
                  f"{svc_name}: metrics port {port} is not published as {HOST_PORTS[svc_name]}")
    check(env.get("EDGELOG_LOG__FORMAT") == "json", f"{svc_name}: EDGELOG_LOG__FORMAT should be json")
    for k, v in {"EDGELOG_PRODUCER__RATE": "200"}.items():
        if svc_name == "producer":
            check(env.get(k) == v, f"producer: {k} should be {v}")

# The loader authenticates as clickhouse.user with clickhouse.password; users.xml must agree.
lenv = env_of("loader")
loader_user = lenv.get("EDGELOG_CLICKHOUSE__USER") or default_of("clickhouse", "user")
loader_pw = lenv.get("EDGELOG_CLICKHOUSE__PASSWORD", "")
if loader_user is None:
    warnings.append("no edgelog binary: the loader's default clickhouse.user is unknown, so its "
                    "users.xml entry was not checked")
else:
    check(loader_user in users, f"users.xml: the loader's user {loader_user!r} is not defined")
    check(loader_pw and hashlib.sha256(loader_pw.encode()).hexdigest() == user_hash(loader_user),
          f"users.xml: password_sha256_hex of {loader_user} does not match the loader's "
          "EDGELOG_CLICKHOUSE__PASSWORD")
# No password-less ClickHouse user: every user of users.xml has a password hash, "default" is not
# configured there (the image's entrypoint removes it when it creates the administrator from the
# secret file), and the operator's credentials in the edgelog services match users.xml.
for name, u in users.items():
    check(u.findtext("password_sha256_hex"), f"users.xml: {name} has no password_sha256_hex")
check("default" not in users,
      "users.xml: user default must not be configured (the entrypoint removes it)")
chenv = env_of("clickhouse")
check(chenv.get("CLICKHOUSE_SKIP_USER_SETUP") is None,
      "clickhouse: CLICKHOUSE_SKIP_USER_SETUP would leave the password-less default user")
check(chenv.get("CLICKHOUSE_USER") not in (None, "", "default")
      and chenv.get("CLICKHOUSE_PASSWORD_FILE", "").startswith("/run/secrets/")
      and "CLICKHOUSE_PASSWORD" not in chenv,
      "clickhouse: the administrator must be CLICKHOUSE_USER (not default) with "
      "CLICKHOUSE_PASSWORD_FILE from a compose secret")
secret = chenv.get("CLICKHOUSE_PASSWORD_FILE", "").rsplit("/", 1)[-1]
top_secrets = compose.get("secrets") or {}
check(secret in top_secrets and os.path.isfile(str((top_secrets.get(secret) or {}).get("file", ""))),
      f"clickhouse: secret {secret!r} is not defined in the compose file with an existing file")
check(secret in ((services.get("clickhouse") or {}).get("secrets") or []),
      f"clickhouse: the service does not mount secret {secret!r}")
for svc_name in EDGELOG_SERVICES:
    senv = env_of(svc_name)
    admin_user = senv.get("EDGELOG_CLICKHOUSE__ADMIN_USER") or default_of("clickhouse", "admin_user")
    if admin_user is None:
        warnings.append(f"no edgelog binary: {svc_name}'s default clickhouse.admin_user is unknown, "
                        "so its users.xml entry was not checked")
        continue
    admin_pw = senv.get("EDGELOG_CLICKHOUSE__ADMIN_PASSWORD", "")
    check(admin_user in users and admin_pw
          and hashlib.sha256(admin_pw.encode()).hexdigest() == user_hash(admin_user),
          f"{svc_name}: clickhouse.admin_user {admin_user!r} and its password must match users.xml")
ch_vols = [str(v) for v in (services.get("clickhouse") or {}).get("volumes") or []]
check(any(v.startswith("./docker/clickhouse/users.xml:/etc/clickhouse-server/users.d/") for v in ch_vols),
      "clickhouse: docker/clickhouse/users.xml is not mounted into users.d/")

# ---------------------------------------------------------------- 4. proxy
nginx_conf = read("docker/nginx/ch-proxy.conf")
directives = "\n".join(l.split("#", 1)[0] for l in nginx_conf.splitlines())
check(re.search(r"^\s*limit_req_zone \$binary_remote_addr zone=ch-limit:10m rate=1r/m;", directives, re.M),
      "ch-proxy.conf: the original `limit_req_zone $binary_remote_addr zone=ch-limit:10m rate=1r/m;` is missing")
check(re.findall(r"^\s*limit_req\s+([^;]*);", directives, re.M) == ["zone=ch-limit"],
      "ch-proxy.conf: exactly one `limit_req zone=ch-limit;` without burst/nodelay expected")
for forbidden in ("burst", "nodelay", "client_max_body_size", "limit_req_status", "proxy_read_timeout"):
    check(forbidden not in directives, f"ch-proxy.conf: {forbidden!r} is not in the original proxy")
listen = re.findall(r"^\s*listen\s+(\d+)\s*;", directives, re.M)
check([int(p) for p in listen] == [c for _, _, c in published("ch-proxy")],
      f"ch-proxy.conf: listen {listen} does not match the published port of ch-proxy")
upstream = re.findall(r"proxy_pass\s+http://([\w.-]+):(\d+)\s*;", directives)
check(len(upstream) == 1 and upstream[0][0] == "clickhouse"
      and int(upstream[0][1]) in [c for _, _, c in published("clickhouse")],
      f"ch-proxy.conf: proxy_pass should be http://clickhouse:8123, is {upstream}")
proxy_vols = [str(v) for v in (services.get("ch-proxy") or {}).get("volumes") or []]
check("./docker/nginx/ch-proxy.conf:/etc/nginx/conf.d/default.conf:ro" in proxy_vols,
      "ch-proxy: the config must replace /etc/nginx/conf.d/default.conf")

# ---------------------------------------------------------------- Prometheus
targets = {}
for job in prom_cfg.get("scrape_configs") or []:
    for sc in job.get("static_configs") or []:
        for t in sc.get("targets") or []:
            host, _, port = str(t).rpartition(":")
            targets[host] = int(port)
for stage in ("producer", "anonymizer", "loader", "verify"):
    check(targets.get(stage) == HOST_PORTS[stage],
          f"prometheus.yml: no target {stage}:{HOST_PORTS[stage]} (found {targets})")
for host in targets:
    check(host in services, f"prometheus.yml: target host {host!r} is not a compose service")
prom_vols = [str(v) for v in (services.get("prometheus") or {}).get("volumes") or []]
rust_src = "\n".join(read(p) for p in glob.glob("shared/**/*.rs", recursive=True) + glob.glob("stages/*.rs"))
# The continuous audit listens where Prometheus scrapes it; its alert rules are mounted and parse.
vcmd = (services.get("verify") or {}).get("command") or []
vlisten = vcmd[vcmd.index("--listen") + 1] if "--listen" in vcmd[:-1] else ""
check(vlisten == f"0.0.0.0:{HOST_PORTS['verify']}",
      f"verify: --listen should be 0.0.0.0:{HOST_PORTS['verify']}, is {vlisten!r}")
for rule_file in prom_cfg.get("rule_files") or []:
    rules = load_yaml(f"docker/prometheus/{rule_file}") or {}
    check(f"./docker/prometheus/{rule_file}:/etc/prometheus/{rule_file}:ro" in prom_vols,
          f"prometheus: docker/prometheus/{rule_file} is not mounted")
    for group in rules.get("groups") or []:
        for rule in group.get("rules") or []:
            check(rule.get("alert") and rule.get("expr"), f"{rule_file}: a rule without alert or expr")
            for metric in re.findall(r"\bedgelog_\w+", str(rule.get("expr"))):
                check(f'"{metric}"' in rust_src, f"{rule_file}: {metric} is emitted by no Rust source")
check("./docker/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom_vols,
      "prometheus: docker/prometheus/prometheus.yml is not mounted")

# ---------------------------------------------------------------- Grafana provisioning
genv = env_of("grafana")
check("grafana-clickhouse-datasource" in genv.get("GF_INSTALL_PLUGINS", ""),
      "grafana: GF_INSTALL_PLUGINS must install grafana-clickhouse-datasource")
gvols = {}
for v in (services.get("grafana") or {}).get("volumes") or []:
    src, dst = str(v).split(":")[:2]
    gvols[dst] = src
check(gvols.get("/etc/grafana/provisioning") == "./docker/grafana/provisioning",
      "grafana: ./docker/grafana/provisioning is not mounted at /etc/grafana/provisioning")
ds_uids = {}
dash_paths = []
for path, doc in prov.items():
    check(doc.get("apiVersion") == 1, f"{path}: apiVersion: 1 expected")
    for ds in doc.get("datasources") or []:
        check(ds.get("uid") and ds.get("type"), f"{path}: data source without uid/type")
        ds_uids[ds.get("uid")] = ds
    for p in doc.get("providers") or []:
        dash_paths.append((p.get("options") or {}).get("path"))
check(len(dash_paths) == 1 and gvols.get(dash_paths[0]) == "./docker/grafana/dashboards",
      f"grafana: the dashboards provider path {dash_paths} is not where docker/grafana/dashboards is mounted")
home = genv.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
if home and dash_paths:
    check(os.path.dirname(home) == dash_paths[0] and os.path.exists(
          os.path.join("docker/grafana/dashboards", os.path.basename(home))),
          f"grafana: home dashboard {home} does not exist")
types = {ds.get("type"): ds for ds in ds_uids.values()}
chds = types.get("grafana-clickhouse-datasource")
if check(chds and "prometheus" in types, "provisioning: a Prometheus and a ClickHouse data source are needed"):
    jd = chds.get("jsonData") or {}
    check(jd.get("host") == "clickhouse" and int(jd.get("port", 0)) in [c for _, _, c in published("clickhouse")]
          and jd.get("protocol") == "http",
          "ClickHouse data source must use clickhouse:8123 over http: directly, NOT ch-proxy "
          "(every request through the proxy spends a 1/min budget)")
    gu = jd.get("username", "default")
    gpw = (chds.get("secureJsonData") or {}).get("password", "")
    check(gu in users, f"ClickHouse data source user {gu!r} is not in users.xml")
    if gu != "default":
        check(hashlib.sha256(str(gpw).encode()).hexdigest() == user_hash(gu),
              f"ClickHouse data source password does not match users.xml for {gu}")
    check(jd.get("defaultDatabase") == "edgelog", "ClickHouse data source: defaultDatabase edgelog")
    check(types["prometheus"].get("url") == "http://prometheus:9090",
          "Prometheus data source url should be http://prometheus:9090")

# ---------------------------------------------------------------- 5. dashboards
sql_text = "\n".join(read(p) for p in sorted(glob.glob("sql/*.sql")))
m = re.search(r"CREATE TABLE IF NOT EXISTS \$\{database\}\.http_log_totals\s*\((.*?)\n\)", sql_text, re.S)
totals_cols = set(re.findall(r"^\s*(\w+)\s+\S", m.group(1), re.M)) if m else set()
check({"ts", "resource_id", "response_status", "cache_status", "remote_addr", "requests",
       "bytes_sent", "request_time_milli"} <= totals_cols,
      f"sql/: http_log_totals columns {sorted(totals_cols)} lack what the traffic dashboard reads")

REQUIRED_METRICS = [
    "edgelog_producer_sent_total", "edgelog_anonymizer_records_in_total",
    "edgelog_anonymizer_records_out_total", "edgelog_anonymizer_dead_letter_total",
    "edgelog_dead_letters_total",
    "edgelog_anonymizer_transactions_committed_total",
    "edgelog_anonymizer_transactions_aborted_total", "edgelog_loader_rows_inserted_total",
    "edgelog_loader_requests_total", "edgelog_loader_lag",
]
# The unique-client tables of sql/011, whose states are uniqCombined(17), not uniq.
UNIQ_COMBINED_TABLES = {"http_log_uniques_6h", "http_log_uniques_1d", "http_log_uniques_by_status_6h",
                        "http_log_uniques_by_status_1d", "http_log_uniques_by_resource_combined_1d"}
BUILTIN_VARS = {"__timeFilter", "__timeInterval", "__interval", "__rate_interval", "__range",
                "__interval_ms", "__interval_s", "__all", "__field", "__timeFilter_ms", "__fromTime", "__toTime"}
dash_uids = set()
for path, d in dashboards.items():
    uid = d.get("uid")
    check(uid and uid not in dash_uids, f"{path}: missing or duplicate dashboard uid")
    dash_uids.add(uid)
    panels = d.get("panels") or []
    check(panels, f"{path}: no panels")
    ids = [p.get("id") for p in panels]
    check(len(ids) == len(set(ids)) and None not in ids, f"{path}: panel ids missing or not unique")
    var_names = {v.get("name") for v in (d.get("templating") or {}).get("list") or []}
    for v in (d.get("templating") or {}).get("list") or []:
        if v.get("datasource"):
            check(v["datasource"].get("uid") in ds_uids,
                  f"{path}: variable {v.get('name')}: unknown data source uid")
    exprs = []
    for p in panels:
        check(p.get("gridPos") and p.get("type") and p.get("title"), f"{path}: panel {p.get('id')} incomplete")
        for t in p.get("targets") or []:
            ds = t.get("datasource") or p.get("datasource") or {}
            if not check(ds.get("uid") in ds_uids,
                         f"{path}: panel {p.get('title')!r}: data source uid {ds.get('uid')!r} is not provisioned"):
                continue
            dtype = ds_uids[ds["uid"]].get("type")
            text = t.get("rawSql") or t.get("expr") or ""
            check(text, f"{path}: panel {p.get('title')!r}: empty query")
            for ref in re.findall(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", text):
                name = ref[0] or ref[1]
                check(name in var_names or name in BUILTIN_VARS,
                      f"{path}: panel {p.get('title')!r}: variable ${name} is not defined")
            if dtype == "grafana-clickhouse-datasource":
                check(t.get("editorType") == "sql" and t.get("format") in (0, 1),
                      f"{path}: panel {p.get('title')!r}: editorType sql and format 0/1 expected")
                check(re.search(r"edgelog\.http_log_(totals|uniques)", text)
                      and not re.search(r"edgelog\.http_log\b(?!_)", text),
                      f"{path}: panel {p.get('title')!r}: must read edgelog.http_log_totals or _uniques "
                      "(never the raw table)")
                # Distinct counts merge, never add up: each state with its own -Merge function.
                uniques = set(re.findall(r"edgelog\.(http_log_uniques\w*)", text))
                check(not uniques - UNIQ_COMBINED_TABLES or "uniqMerge(" in text,
                      f"{path}: panel {p.get('title')!r}: uniq states must be merged with uniqMerge()")
                check(not uniques & UNIQ_COMBINED_TABLES or "uniqCombinedMerge(17)(" in text,
                      f"{path}: panel {p.get('title')!r}: sql/011's states must be merged with "
                      "uniqCombinedMerge(17)()")
                check("$__timeFilter(ts)" in text and "sum(" in text,
                      f"{path}: panel {p.get('title')!r}: needs $__timeFilter(ts) and sum() (the table "
                      "holds partial sums until merged)")
                if t.get("format") == 0:
                    check("$__timeInterval(ts)" in text and re.search(r"ORDER BY time\s*$", text),
                          f"{path}: panel {p.get('title')!r}: time series need $__timeInterval(ts) AS time, ORDER BY time")
            elif dtype == "prometheus":
                exprs.append(text)
    if uid == "edgelog-pipeline":
        joined = "\n".join(exprs)
        for metric in REQUIRED_METRICS:
            check(re.search(r"\b%s\b" % metric, joined), f"{path}: no panel for {metric}")
        check("outcome" in joined, f"{path}: loader requests are not split by outcome")
        for metric in sorted(set(re.findall(r"\bedgelog_\w+", joined))):
            base = re.sub(r"_(total|sum|count|bucket)$", "", metric)  # summaries and histograms
            if not re.search(r'"(%s|%s)"' % (re.escape(metric), re.escape(base)), rust_src):
                warnings.append(f"{path}: metric {metric} is not emitted by any Rust source yet")

# ---------------------------------------------------------------- 6. Dockerfile
dockerfile = read("docker/Dockerfile")
froms = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
check(len(froms) >= 2, "Dockerfile: multi-stage build expected")
for f in froms:
    check(re.fullmatch(r"[\w./-]+:[\w.-]+", f) is not None and not f.endswith(":latest"),
          f"Dockerfile: base image {f} is not pinned")
check(froms[:1] == ["rust:1.95-bookworm"] and froms[-1:] == ["debian:bookworm-slim"],
      f"Dockerfile: expected rust:1.95-bookworm -> debian:bookworm-slim, got {froms}")
check(re.search(r"apt-get install[^\n]*(\\\n[^\n]*)*capnproto", dockerfile),
      "Dockerfile: the build stage must install capnproto (build.rs runs capnp)")
check("cargo build --release --locked --bins" in dockerfile,
      "Dockerfile: `cargo build --release --locked --bins` expected")
runtime = dockerfile.split("FROM debian:bookworm-slim", 1)[-1]
for pkg in ("ca-certificates", "libssl3", "zlib1g"):
    check(pkg in runtime, f"Dockerfile: the runtime stage must install {pkg}")
for b in bins:
    check(re.search(r"COPY --from=build[^\n]*\b%s\b" % b, runtime),
          f"Dockerfile: binary {b} is not copied into the runtime image")
users_lines = re.findall(r"^USER\s+(\S+)", runtime, re.M)
check(users_lines and users_lines[-1].split(":")[0] not in ("root", "0"),
      "Dockerfile: the runtime image must run as a non-root USER")
ignore = [l.strip().rstrip("/") for l in read(".dockerignore").splitlines()
          if l.strip() and not l.startswith("#")]
for needed in ("target", ".git"):
    check(needed in ignore, f".dockerignore: {needed}/ should be excluded")
build_stage = dockerfile.split("FROM debian:bookworm-slim", 1)[0]
for srcs in re.findall(r"^COPY\s+(?!--from)(.+)$", build_stage, re.M):
    for src in srcs.split()[:-1]:
        check(os.path.exists(src), f"Dockerfile: COPY source {src} does not exist")
        check(src.rstrip("/") not in ignore, f"Dockerfile: COPY source {src} is excluded by .dockerignore")
# Cargo checks every target declared in Cargo.toml (and build.rs) exists, even for --bins.
import tomllib
manifest = tomllib.loads(cargo)
declared = [manifest.get("package", {}).get("build", "build.rs")]
if "lib" in manifest:
    declared.append(manifest["lib"].get("path", "src/lib.rs"))
for kind, default_dir in (("bin", "src/bin"), ("bench", "benches"), ("test", "tests"),
                          ("example", "examples")):
    for target in manifest.get(kind, []):
        declared.append(target.get("path", f"{default_dir}/{target['name']}.rs"))
copied = []
for srcs in re.findall(r"^COPY\s+(?!--from)(.+)$", build_stage, re.M):
    copied += [x.rstrip("/") for x in srcs.split()[:-1]]
for path in declared:
    check(path in copied or path.split("/")[0] in copied,
          f"Dockerfile: {path} (declared in Cargo.toml) is not copied into the build stage")
for inc in re.findall(r'include_str!\("\.\./([^"]+)"\)', rust_src):
    top = inc.split("/")[0]
    check(re.search(r"^COPY\s+(?!--from)[^\n]*\b%s\b" % re.escape(top), build_stage, re.M),
          f"Dockerfile: {inc} is compiled into the binaries but {top}/ is not copied")

# ---------------------------------------------------------------- report
for name, env in env_files.items():
    with open(os.path.join(TMP, f"{name}.env"), "w") as f:
        for k, v in sorted(env.items()):
            f.write(f"{k}={v}\n")
for w in warnings:
    print(f"docker/check: WARNING: {w}", file=sys.stderr)
for p in problems:
    print(f"docker/check: PROBLEM: {p}", file=sys.stderr)
if problems:
    print(f"docker/check: {len(problems)} problem(s)", file=sys.stderr)
    sys.exit(1)
print(f"docker/check: static checks ok ({len(services)} services, {len(dashboards)} dashboards, "
      f"{sum(len(e) for e in env_files.values())} EDGELOG_* settings)", file=sys.stderr)
