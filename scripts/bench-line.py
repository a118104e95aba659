#!/usr/bin/env python3
"""One line of figures from a loadtest --json report (scripts/bench.sh).

    bench-line.py NAME REPORT.json            the run's line
    bench-line.py --median NAME A.json ...    the medians of the runs
"""
import json
import statistics
import sys


def figures(path):
    try:
        with open(path) as f:
            lines = [l for l in f.read().splitlines() if l.startswith("{")]
        d = json.loads(lines[-1])
    except (OSError, IndexError, ValueError):
        return None
    srv = d.get("server", {})
    lat = d.get("latency_ms", {})
    out = {
        "delivered/s": d.get("deliveries_per_sec", 0.0),
        "msgs/s": d.get("msgs_per_sec", 0.0),
        "logins/s": d.get("login_per_sec", 0.0),
        "p50 ms": lat.get("p50", 0.0),
        "p99 ms": lat.get("p99", 0.0),
        "server us/msg": srv.get("cpu_us_per_msg", 0.0),
        "loadtest us/msg": d.get("loadtest_cpu_us_per_msg", 0.0),
        "B/conn": srv.get("rss_bytes_per_conn", 0.0),
        "lost": d.get("lost", 0),
        "dup": d.get("duplicated", 0),
        "ooo": d.get("out_of_order", 0),
        "errors": sum(d.get("errors", {}).values()),
    }
    b = d.get("baseline")
    if b:
        out["nats delivered/s"] = b.get("deliveries_per_sec", 0.0)
        out["ratio"] = out["delivered/s"] / max(out["nats delivered/s"], 1e-9)
        out["nats p50 ms"] = b.get("latency_ms", {}).get("p50", 0.0)
        out["nats p99 ms"] = b.get("latency_ms", {}).get("p99", 0.0)
    return out


def show(name, f):
    parts = []
    for k, v in f.items():
        if isinstance(v, float):
            v = f"{v:,.3f}" if v < 10 else f"{v:,.0f}"
        parts.append(f"{k} {v}")
    print(f"{name}: " + ", ".join(parts), flush=True)


def main():
    args = sys.argv[1:]
    if args and args[0] == "--median":
        name, paths = args[1], args[2:]
        runs = [r for r in (figures(p) for p in paths) if r]
        if not runs:
            print(f"{name}: no report")
            return
        keys = runs[0].keys()
        med = {k: statistics.median(r.get(k, 0) for r in runs) for k in keys}
        # lost/duplicated/out-of-order/errors: the worst run, not the median.
        for k in ("lost", "dup", "ooo", "errors"):
            med[k] = max(r.get(k, 0) for r in runs)
        show(f"{name} MEDIAN of {len(runs)}", med)
    else:
        name, path = args
        f = figures(path)
        if f is None:
            print(f"{name}: the run failed (see {path[:-5]}.err)")
        else:
            show(name, f)


main()
