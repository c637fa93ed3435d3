"""Compares a compose service's EDGELOG_* environment with what `edgelog config` printed for it:
`python3 docker/compare_env.py ENVFILE TOMLFILE SERVICE` (called by docker/check.sh)."""
import sys, tomllib
env = dict(l.rstrip("\n").split("=", 1) for l in open(sys.argv[1]) if "=" in l)
cfg = tomllib.load(open(sys.argv[2], "rb"))
bad = []
for var, want in env.items():
    node = cfg
    for part in var[len("EDGELOG_"):].lower().split("__"):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None or node == "***":
        continue  # unset optional, or a redacted secret
    same = (float(node) == float(want)) if isinstance(node, (int, float)) and not isinstance(node, bool) else str(node) == want
    if not same:
        bad.append(f"{var}={want!r} but the effective value is {node!r}")
for b in bad:
    print(f"docker/check: PROBLEM: {sys.argv[3]}: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
