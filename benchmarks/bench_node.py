"""One node's POST /v1/limits/check against a bare aiohttp hello-world, side by side, with wrk.

Both servers run on uvloop, pinned to cpu 0 (the hello-world is ``helloworld_app.py --kind lowlevel``, the
fastest one: the same low-level server and gc.freeze as the node); wrk (and the node's 2 gossip peers, which are light)
run on cpu 1.  The node under test gossips to its 2 peers at the default interval (20 ms) the whole
time.  Configurations, each run ``--repeats`` times (default 5 x 8 s), interleaved round-robin so that drift
on a shared machine hits all of them alike; the figure is the median (the ratio of each round is
printed and kept too, to show the spread):

* ``hello GET``     -- wrk's default GET / on the hello-world app (the issue's baseline);
* ``hello POST``    -- the same POST requests as the check runs, on the hello-world app;
* ``check allowed`` -- POST /v1/limits/check over 1,000 keys whose limit is far above the load, so
                       (nearly) every request is allowed, audited (group commit) and gossiped;
* ``check denied``  -- the same over 1,000 keys limited to 1 token/s each, so most are denied.

Usage: .venv/bin/python benchmarks/bench_node.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from benchmarks._procs import (
    PYTHON,
    REPO,
    Cluster,
    Procs,
    free_port,
    http_json,
    http_text,
    install_signal_handlers,
    metric_value,
    run_wrk,
    table,
    wait_ready,
    workdir,
    write_cluster,
    write_results,
)
from benchmarks._targets import target

TARGET_RATIO = 0.80  # the goal against the fastest hello-world (helloworld_app.py --kind lowlevel)
SERVER_CPU = {0}
LOAD_CPU = {1}

LUA = """-- %(name)s: POST %(path)s with {"key": "%(prefix)s<0..%(last)d>"}, keys drawn uniformly
local reqs = {}
local n = %(n)d
init = function(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
  for i = 1, n do
    local body = '{"key":"%(prefix)s' .. (i - 1) .. '"}'
    reqs[i] = wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"}, body)
  end
end
request = function()
  return reqs[math.random(n)]
end
"""


def write_lua(folder: Path, name: str, prefix: str, n: int, path: str = "/v1/limits/check") -> Path:
    script = folder / f"{name}.lua"
    script.write_text(LUA % {"name": name, "path": path, "prefix": prefix, "n": n, "last": n - 1})
    return script


def node_counters(url: str) -> dict[str, float]:
    text = http_text(url + "/metrics")
    return {
        "allowed": metric_value(text, "edge_decisions_total", {"decision": "allowed"}),
        "denied": metric_value(text, "edge_decisions_total", {"decision": "denied"}),
        "gossip_sent_ok": metric_value(text, "edge_gossip_messages_total", {"direction": "sent", "outcome": "ok"}),
        "gossip_recv_ok": metric_value(text, "edge_gossip_messages_total", {"direction": "received", "outcome": "ok"}),
        "gossip_bytes_sent": metric_value(text, "edge_gossip_bytes_total", {"direction": "sent"}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 repeat")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 5)")
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    duration = args.duration or (3 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 5)
    if len(psutil.Process().cpu_affinity()) < 2:
        print("needs 2 cpus (server on one, wrk on the other)", file=sys.stderr)
        return 2

    folder = workdir("node")
    limits = [("allow-*", 1e9, 1e9), ("deny-*", 1.0, 1.0), ("*", 100.0, 100.0)]
    cluster_path, nodes = write_cluster(folder, ["eu", "us", "ap"], limits=limits)
    scripts = {
        "hello POST": write_lua(folder, "hello_post", "allow-", args.keys),
        "check allowed": write_lua(folder, "check_allowed", "allow-", args.keys),
        "check denied": write_lua(folder, "check_denied", "deny-", args.keys),
    }
    hello_port = free_port()
    node = nodes[0]
    wrk_opts = {"threads": args.threads, "connections": args.connections, "cpus": LOAD_CPU}
    runs: dict[str, list[dict]] = {name: [] for name in ("hello GET", "hello POST", "check allowed", "check denied")}

    with Procs(folder) as procs:
        cluster = Cluster(cluster_path, nodes, procs)
        cluster.start_all({node.id: SERVER_CPU, nodes[1].id: LOAD_CPU, nodes[2].id: LOAD_CPU})
        hello = procs.start(
            "hello",
            [PYTHON, str(REPO / "benchmarks" / "helloworld_app.py"), "--port", str(hello_port)],
            cpus=SERVER_CPU,
        )
        hello_url = f"http://127.0.0.1:{hello_port}"
        wait_ready(hello_url, hello)
        node_proc = psutil.Process(cluster.children[node.id].pid)
        hello_proc = psutil.Process(hello.pid)
        # Let the node see both peers live before loading it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, st = http_json(node.url + "/v1/state?keys=none")
            if isinstance(st, dict) and len(st.get("live_peers", [])) == 2:
                break
            time.sleep(0.1)
        live_peers = st.get("live_peers") if isinstance(st, dict) else None

        targets = {
            "hello GET": (hello_url + "/", None, hello_proc),
            "hello POST": (hello_url + "/v1/limits/check", scripts["hello POST"], hello_proc),
            "check allowed": (node.url + "/v1/limits/check", scripts["check allowed"], node_proc),
            "check denied": (node.url + "/v1/limits/check", scripts["check denied"], node_proc),
        }
        # Warm-up: every key exists on the node, every code path ran once.
        for url, script, _ in targets.values():
            run_wrk(url, duration_s=2 if not args.quick else 1, script=script, **wrk_opts)

        for rep in range(repeats):
            for name, (url, script, proc) in targets.items():
                before = node_counters(node.url)
                cpu_before = proc.cpu_times()
                res = run_wrk(url, duration_s=duration, script=script, **wrk_opts)
                cpu_after = proc.cpu_times()
                after = node_counters(node.url)
                delta = {k: after[k] - before[k] for k in after}
                cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
                row = res.as_dict() | {"repeat": rep + 1, "server_cpu_percent": round(100 * cpu_s / duration, 1)}
                if name.startswith("check"):
                    decided = delta["allowed"] + delta["denied"]
                    row |= {
                        "allowed_fraction": round(delta["allowed"] / decided, 4) if decided else None,
                        "gossip_rounds_sent_per_s": round(delta["gossip_sent_ok"] / duration, 1),
                        "gossip_kb_sent_per_s": round(delta["gossip_bytes_sent"] / duration / 1024, 1),
                    }
                runs[name].append(row)
                print(
                    f"  run {rep + 1}/{repeats} {name:14s} {res.requests_per_s:>10,.0f} req/s  "
                    f"p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms  cpu {row['server_cpu_percent']}%"
                    + (
                        f"  allowed {row['allowed_fraction']:.1%}  gossip {row['gossip_rounds_sent_per_s']}/s"
                        if name.startswith("check")
                        else ""
                    ),
                    flush=True,
                )
        node_rss_mb = round(node_proc.memory_info().rss / 2**20, 1)
        _, st = http_json(node.url + "/v1/state?keys=none")
        live_peers_end = st.get("live_peers") if isinstance(st, dict) else None

    def med(name: str, field: str) -> float:
        return statistics.median(r[field] for r in runs[name])

    summary = {}
    for name in runs:
        summary[name] = {
            "requests_per_s": round(med(name, "requests_per_s")),
            "p50_ms": round(med(name, "p50_ms"), 3),
            "p99_ms": round(med(name, "p99_ms"), 3),
            "server_cpu_percent": med(name, "server_cpu_percent"),
        }
        if name.startswith("check"):
            summary[name]["allowed_fraction"] = med(name, "allowed_fraction")
            summary[name]["gossip_rounds_sent_per_s"] = med(name, "gossip_rounds_sent_per_s")
    base = summary["hello GET"]["requests_per_s"]
    base_post = summary["hello POST"]["requests_per_s"]
    for name in ("check allowed", "check denied"):
        summary[name]["ratio_vs_hello_get"] = round(summary[name]["requests_per_s"] / base, 3)
        summary[name]["ratio_vs_hello_post"] = round(summary[name]["requests_per_s"] / base_post, 3)
        # The same ratio within each round (runs a few seconds apart): its spread is the noise of
        # this shared machine, which the medians above smooth out.
        per_round = [c["requests_per_s"] / h["requests_per_s"] for c, h in zip(runs[name], runs["hello GET"],
                                                                               strict=True)]
        summary[name]["ratio_vs_hello_get_per_round"] = [round(r, 3) for r in per_round]

    wrk_cmd = f"taskset -c 1 wrk -t{args.threads} -c{args.connections} -d{duration}s --latency --timeout 5s"
    print(
        f"\none node vs hello-world; {wrk_cmd} [-s script.lua] URL; server on cpu 0; "
        f"median of {repeats} interleaved runs"
    )
    rows = []
    for name, s in summary.items():
        rows.append(
            [
                name,
                f"{s['requests_per_s']:,}",
                f"{s['p50_ms']:.2f}",
                f"{s['p99_ms']:.2f}",
                f"{s['server_cpu_percent']:.0f}%",
                f"{s['allowed_fraction']:.1%}" if "allowed_fraction" in s else "-",
                f"{s['ratio_vs_hello_get']:.0%}" if "ratio_vs_hello_get" in s else "-",
                f"{s['ratio_vs_hello_post']:.0%}" if "ratio_vs_hello_post" in s else "-",
            ]
        )
    print(
        table(rows, ["config", "req/s", "p50 ms", "p99 ms", "server cpu", "allowed", "vs hello GET", "vs hello POST"])
    )
    for name in ("check allowed", "check denied"):
        spread = summary[name]["ratio_vs_hello_get_per_round"]
        print(f"{name} / hello GET, round by round: " + ", ".join(f"{r:.0%}" for r in spread))
    ok_allowed = summary["check allowed"]["ratio_vs_hello_get"] >= TARGET_RATIO
    ok_denied = summary["check denied"]["ratio_vs_hello_get"] >= TARGET_RATIO
    # targets are reported by full runs only (benchmarks/README.md, "Targets")
    verdict = ("" if args.quick else f"target check/hello >= {TARGET_RATIO:.0%}: allowed "
               f"{'PASS' if ok_allowed else 'MISS'}, denied {'PASS' if ok_denied else 'MISS'}; ")
    print(
        f"\n{verdict}node gossiping to {live_peers_end} "
        f"(~{summary['check allowed']['gossip_rounds_sent_per_s']:.0f} rounds/s sent under load); "
        f"node RSS {node_rss_mb} MB"
    )

    figures = {
        "target_ratio": TARGET_RATIO,
        "pass_allowed": ok_allowed,
        "pass_denied": ok_denied,
        "summary": summary,
        "runs": runs,
    }
    params = {
        "wrk": wrk_cmd,
        "threads": args.threads,
        "connections": args.connections,
        "duration_s": duration,
        "repeats": repeats,
        "keys": args.keys,
        "gossip_interval_ms": 20,
        "peers": 2,
        "live_peers_before": live_peers,
        "live_peers_after": live_peers_end,
        "server_cpus": sorted(SERVER_CPU),
        "load_cpus": sorted(LOAD_CPU),
        "limits": {"allow-*": "rate 1e9/s, burst 1e9", "deny-*": "rate 1/s, burst 1"},
        "node_rss_mb_end": node_rss_mb,
    }
    targets = [target(f"{name} / hello GET (median of rounds)", summary[name]["ratio_vs_hello_get"], ">=",
                      TARGET_RATIO) for name in ("check allowed", "check denied")]
    path = write_results("bench_node", figures, quick=args.quick, started=started, targets=targets,
                         extra={"parameters": params})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
