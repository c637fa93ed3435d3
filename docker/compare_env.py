"""Compares a service's EDGELOG_* environment with what `edgelog config` printed for it:
`python3 docker/compare_env.py ENVFILE TOMLFILE SERVICE` (called by docker/check.sh for each
compose service and by scripts/check-helm.sh for each rendered container)."""
import re, sys, tomllib

# humantime's units (the settings' duration syntax), in seconds.
UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "secs": 1, "second": 1,
         "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
         "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600, "d": 86400,
         "day": 86400, "days": 86400, "w": 604800, "week": 604800, "weeks": 604800}


def seconds(text):
    """A humantime duration ("65s", "1m 5s", "7days") in seconds, or None."""
    parts = re.findall(r"(\d+)\s*([a-z]+)", text)
    if not parts or re.sub(r"[\d\sa-z]", "", text) or any(u not in UNITS for _, u in parts):
        return None
    return sum(int(n) * UNITS[u] for n, u in parts)


env = dict(l.rstrip("\n").split("=", 1) for l in open(sys.argv[1]) if "=" in l)
cfg = tomllib.load(open(sys.argv[2], "rb"))
bad = []
for var, want in env.items():
    node = cfg
    for part in var[len("EDGELOG_"):].lower().split("__"):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None or node == "***":
        continue  # unset optional, or a redacted secret
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        same = float(node) == float(want)
    else:
        # A duration prints in humantime's own form: "65s" reads back as "1m 5s".
        same = str(node) == want or (seconds(str(node)) is not None and seconds(str(node)) == seconds(want))
    if not same:
        bad.append(f"{var}={want!r} but the effective value is {node!r}")
for b in bad:
    print(f"PROBLEM: {sys.argv[3]}: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
