"""The ceiling, side by side in one run with wrk: the fastest aiohttp hello-world we can write
(``helloworld_app.py --kind lowlevel``: the low-level ``web.Server``, uvloop, ``gc.freeze``, exactly
the node's hot-path setup), the routed ``web.Application`` hello-world beside it, our node's
``POST /v1/limits/check`` and its ``POST /v1/skills/{skill}/invoke`` with a zero-latency skill.

Every server under test is pinned to cpu 0 and wrk to cpu 1 (the node's 2 gossip peers, which are
light, run on cpu 1 too); every server is on uvloop.  All servers are up at once (idle ones cost only
their gossip) and the configurations are interleaved round-robin, so drift on a shared machine hits
them alike.  The figure is ``check / hello lowlevel GET`` **per round** (each pair measured seconds
apart) and the median over the rounds; every round is kept in the results file.  Goal: >= 0.80.
Beside it, ``check / hello lowlevel POST``: the check against the hello-world answering the very same
POST requests (body read and discarded).  The hello-world's POST row says how much of the GET figure
aiohttp's body handling alone takes; this ratio says what the node's own work costs on top of it.

Usage: .venv/bin/python benchmarks/bench_ceiling.py [--quick] [--duration S] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plotly.graph_objects as go
import psutil

from benchmarks._plots import fig_json, write_png
from benchmarks._procs import (
    PYTHON,
    REPO,
    Cluster,
    Procs,
    free_port,
    install_signal_handlers,
    run_wrk,
    table,
    wait_ready,
    workdir,
    write_cluster,
    write_results,
)
from benchmarks._targets import target
from benchmarks.bench_node import write_lua
from edge_server.config import SkillConfig

SERVER_CPU = {0}
LOAD_CPU = {1}
GOAL_RATIO = 0.80
CONFIGS = ("hello lowlevel GET", "hello lowlevel POST", "hello routed GET", "check", "invoke")
BASELINE = "hello lowlevel GET"

INVOKE_LUA = """-- invoke: POST /v1/skills/rating/invoke as tenant "bench" (zero-latency skill)
local req
init = function(args)
  req = wrk.format("POST", "/v1/skills/rating/invoke",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer key-bench"}, '{"input":{"q":1}}')
end
request = function() return req end
"""


def start_hello(procs: Procs, kind: str) -> tuple[str, psutil.Process]:
    port = free_port()
    child = procs.start(f"hello-{kind}", [PYTHON, str(REPO / "benchmarks" / "helloworld_app.py"), "--port", str(port),
                                          "--kind", kind], cpus=SERVER_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, child)
    return url, psutil.Process(child.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 round")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 6)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 4)")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    duration = args.duration or (1 if args.quick else 6)
    repeats = args.repeats or (1 if args.quick else 4)
    if len(psutil.Process().cpu_affinity()) < 2:
        print("needs 2 cpus (servers on one, wrk on the other)", file=sys.stderr)
        return 2
    folder = workdir("ceiling")
    check_lua = write_lua(folder, "check", "allow-", 1000)
    post_lua = write_lua(folder, "hello_post", "allow-", 1000)
    invoke_lua = folder / "invoke.lua"
    invoke_lua.write_text(INVOKE_LUA)
    wrk_opts = {"threads": 1, "connections": args.connections, "cpus": LOAD_CPU}
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    with Procs(folder) as procs:
        path, nodes = write_cluster(folder, ["eu", "us", "ap"], limits=[("*", 1e9, 1e9)],
                                    skill=SkillConfig(name="rating", median_ms=0, p99_ms=0))
        cluster = Cluster(path, nodes, procs)
        cluster.start_all({nodes[0].id: SERVER_CPU, nodes[1].id: LOAD_CPU, nodes[2].id: LOAD_CPU})
        node_proc = psutil.Process(cluster.children[nodes[0].id].pid)
        low_url, low_proc = start_hello(procs, "lowlevel")
        routed_url, routed_proc = start_hello(procs, "routed")
        targets = {
            "hello lowlevel GET": (low_url + "/", None, low_proc),
            "hello lowlevel POST": (low_url + "/v1/limits/check", post_lua, low_proc),
            "hello routed GET": (routed_url + "/", None, routed_proc),
            "check": (nodes[0].url + "/v1/limits/check", check_lua, node_proc),
            "invoke": (nodes[0].url + "/v1/skills/rating/invoke", invoke_lua, node_proc),
        }
        for url, script, _ in targets.values():  # warm-up: every key exists, every code path ran
            run_wrk(url, duration_s=1, script=script, **wrk_opts)
        for rep in range(repeats):
            for name in CONFIGS:
                url, script, proc = targets[name]
                c0 = proc.cpu_times()
                res = run_wrk(url, duration_s=duration, script=script, **wrk_opts)
                c1 = proc.cpu_times()
                cpu = 100 * ((c1.user + c1.system) - (c0.user + c0.system)) / duration
                runs[name].append(res.as_dict() | {"repeat": rep + 1, "server_cpu_percent": round(cpu, 1)})
                print(f"  round {rep + 1}/{repeats} {name:20s} {res.requests_per_s:>9,.0f} req/s  p50 {res.p50_ms:.2f} "
                      f"p99 {res.p99_ms:.2f} ms  non-2xx {res.non_2xx}  cpu {cpu:.0f}%", flush=True)

    summary: dict[str, dict] = {}
    for name, rows in runs.items():
        summary[name] = {
            "requests_per_s": round(statistics.median(r["requests_per_s"] for r in rows)),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rows), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in rows), 3),
            "non_2xx": sum(r["non_2xx"] for r in rows),
            "server_cpu_percent": statistics.median(r["server_cpu_percent"] for r in rows),
        }
    per_round = {name: [round(r["requests_per_s"] / max(1.0, b["requests_per_s"]), 3)
                        for r, b in zip(runs[name], runs[BASELINE], strict=True)] for name in CONFIGS}
    for name in CONFIGS:
        summary[name]["ratio_vs_hello_lowlevel_per_round"] = per_round[name]
        summary[name]["ratio_vs_hello_lowlevel"] = round(statistics.median(per_round[name]), 3)
    ratio = summary["check"]["ratio_vs_hello_lowlevel"]
    # The same POST requests on the hello-world: what aiohttp's own body handling leaves of the GET
    # figure, so the part of the gap that is the node's own work can be read off one round.
    per_round_post = [round(c["requests_per_s"] / max(1.0, p["requests_per_s"]), 3)
                      for c, p in zip(runs["check"], runs["hello lowlevel POST"], strict=True)]
    ratio_post = round(statistics.median(per_round_post), 3)
    rows = [[n, f"{s['requests_per_s']:,}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}",
             f"{s['server_cpu_percent']:.0f}%", f"{s['ratio_vs_hello_lowlevel']:.0%}",
             " ".join(f"{r:.2f}" for r in s["ratio_vs_hello_lowlevel_per_round"])] for n, s in summary.items()]
    print(f"\nceiling, wrk -t1 -c{args.connections} -d{duration}s on cpu 1, servers on cpu 0 (uvloop), "
          f"{repeats} interleaved rounds")
    print(table(rows, ["config", "req/s", "p50 ms", "p99 ms", "server cpu", "vs hello lowlevel", "rounds"]))
    if not args.quick:
        print(f"check / hello lowlevel GET: {ratio:.2f} (goal >= {GOAL_RATIO:.2f}): "
              f"{'met' if ratio >= GOAL_RATIO else 'MISSED'}")
        print(f"check / hello lowlevel POST (the same requests): {ratio_post:.2f}")

    fig = go.Figure()
    fig.add_bar(x=list(CONFIGS), y=[summary[c]["requests_per_s"] for c in CONFIGS],
                marker_color=["#9ca3af", "#9ca3af", "#d1d5db", "#2563eb", "#60a5fa"],
                text=[f"{summary[c]['ratio_vs_hello_lowlevel']:.0%} · p99 {summary[c]['p99_ms']:.1f} ms"
                      for c in CONFIGS],
                textposition="outside")
    fig.update_layout(title="Ceiling on one core: fastest hello-world, routed hello-world, check, invoke (0 ms skill)",
                      yaxis_title="requests / s (wrk)", template="plotly_white")
    png = write_png(fig, "ceiling", args.quick)
    figures = {"goal_check_vs_hello_lowlevel": GOAL_RATIO, "check_vs_hello_lowlevel": ratio,
               "check_vs_hello_lowlevel_per_round": per_round["check"], "check_vs_hello_lowlevel_post": ratio_post,
               "check_vs_hello_lowlevel_post_per_round": per_round_post, "summary": summary, "runs": runs}
    params = {"wrk": f"taskset -c 1 wrk -t1 -c{args.connections} -d{duration}s --latency --timeout 5s [-s script] URL",
              "duration_s": duration, "repeats": repeats, "server_cpus": sorted(SERVER_CPU),
              "load_cpus": sorted(LOAD_CPU), "skill": "simulated, median_ms 0, p99_ms 0",
              "loop": "uvloop (all servers)",
              "hello": {"lowlevel": "benchmarks/helloworld_app.py --kind lowlevel",
                        "routed": "benchmarks/helloworld_app.py --kind routed"},
              "check_keys": 1000, "peers_per_node": 2, "gossip_interval_ms": 20}
    targets = [target("check / hello lowlevel GET (median of per-round ratios)", ratio, ">=", GOAL_RATIO)]
    path = write_results("bench_ceiling", figures, quick=args.quick, started=started, targets=targets,
                         extra={"parameters": params, "charts": {"ceiling": fig_json(fig)}, "png": {"ceiling": png}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
