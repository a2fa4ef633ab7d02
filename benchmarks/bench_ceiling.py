"""The ceiling, side by side in one run with wrk: a bare aiohttp hello-world vs our node's
POST /v1/limits/check vs our node's POST /v1/skills/{skill}/invoke with a zero-latency simulated skill,
each on the default asyncio loop and on uvloop.

Every server under test is pinned to cpu 0 and wrk to cpu 1 (as bench_node.py).  Both loops' servers
run at once (idle ones cost only their gossip) so the six configurations are interleaved round-robin
and drift on a shared machine hits them alike; the figure is the median of ``--repeats`` runs.  The
node is put on the asyncio loop with ``EDGE_LOOP=asyncio`` (uvloop is the default).  Each node gossips
to 2 peers (on cpu 1) at the default 20 ms, as in production.

Usage: .venv/bin/python benchmarks/bench_ceiling.py [--quick]
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
from benchmarks.bench_node import write_lua

SERVER_CPU = {0}
LOAD_CPU = {1}
LOOPS = ("asyncio", "uvloop")
TARGETS = ("hello", "check", "invoke")

INVOKE_LUA = """-- invoke: POST /v1/skills/rating/invoke as tenant "bench" (zero-latency skill)
local req
init = function(args)
  req = wrk.format("POST", "/v1/skills/rating/invoke",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer key-bench"}, '{"input":{"q":1}}')
end
request = function() return req end
"""


def zero_latency(path: Path) -> None:
    """The benchmark cluster file with an instant skill (median 0, p99 0)."""
    text = path.read_text().replace("median_ms = 1\n", "median_ms = 0\n").replace("p99_ms = 2\n", "p99_ms = 0\n")
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 repeat")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 6)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 2)")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    duration = args.duration or (1 if args.quick else 6)
    repeats = args.repeats or (1 if args.quick else 2)
    if len(psutil.Process().cpu_affinity()) < 2:
        print("needs 2 cpus (servers on one, wrk on the other)", file=sys.stderr)
        return 2
    folder = workdir("ceiling")
    check_lua = write_lua(folder, "check", "allow-", 1000)
    invoke_lua = folder / "invoke.lua"
    invoke_lua.write_text(INVOKE_LUA)
    wrk_opts = {"threads": 1, "connections": args.connections, "cpus": LOAD_CPU}
    runs: dict[str, list[dict]] = {f"{t} {lp}": [] for lp in LOOPS for t in TARGETS}
    with Procs(folder) as procs:
        targets: dict[str, tuple[str, Path | None, psutil.Process]] = {}
        for lp in LOOPS:
            sub = folder / lp
            sub.mkdir()
            path, nodes = write_cluster(sub, ["eu", "us", "ap"], limits=[("*", 1e9, 1e9)])
            zero_latency(path)
            cluster = Cluster(path, nodes, procs)
            for n in nodes[1:]:
                cluster.start(n.id, cpus=LOAD_CPU, wait=False)
            node = nodes[0]
            child = procs.start(
                f"node-{lp}",
                [PYTHON, "-m", "edge_server", "--cluster", str(path), "--node", node.id, "--log-level", "WARNING",
                 "--drain-ms", "0"],
                cpus=SERVER_CPU, env={"EDGE_LOOP": lp},
            )
            cluster.children[node.id] = child
            for n in nodes:
                wait_ready(n.url, cluster.children[n.id])
            hello_port = free_port()
            hello = procs.start(
                f"hello-{lp}",
                [PYTHON, str(REPO / "benchmarks" / "helloworld_app.py"), "--port", str(hello_port), "--loop", lp],
                cpus=SERVER_CPU,
            )
            hello_url = f"http://127.0.0.1:{hello_port}"
            wait_ready(hello_url, hello)
            targets[f"hello {lp}"] = (hello_url + "/", None, psutil.Process(hello.pid))
            targets[f"check {lp}"] = (node.url + "/v1/limits/check", check_lua, psutil.Process(child.pid))
            targets[f"invoke {lp}"] = (node.url + "/v1/skills/rating/invoke", invoke_lua, psutil.Process(child.pid))
        order = [f"{t} {lp}" for t in TARGETS for lp in LOOPS]
        for name in order:  # warm-up: every key exists, every code path ran
            url, script, _ = targets[name]
            run_wrk(url, duration_s=1, script=script, **wrk_opts)
        for rep in range(repeats):
            for name in order:
                url, script, proc = targets[name]
                c0 = proc.cpu_times()
                res = run_wrk(url, duration_s=duration, script=script, **wrk_opts)
                c1 = proc.cpu_times()
                cpu = 100 * ((c1.user + c1.system) - (c0.user + c0.system)) / duration
                row = res.as_dict() | {"repeat": rep + 1, "server_cpu_percent": round(cpu, 1)}
                runs[name].append(row)
                print(f"  run {rep + 1}/{repeats} {name:16s} {res.requests_per_s:>9,.0f} req/s  p50 {res.p50_ms:.2f} "
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
    for lp in LOOPS:
        base = summary[f"hello {lp}"]["requests_per_s"] or 1
        for t in ("check", "invoke"):
            summary[f"{t} {lp}"]["ratio_vs_hello_same_loop"] = round(summary[f"{t} {lp}"]["requests_per_s"] / base, 3)
    gain = {t: round(summary[f"{t} uvloop"]["requests_per_s"] / max(1, summary[f"{t} asyncio"]["requests_per_s"]), 3)
            for t in TARGETS}
    uvloop_helps = all(g > 1.03 for g in gain.values())
    rows = [[n, f"{s['requests_per_s']:,}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}",
             f"{s['server_cpu_percent']:.0f}%",
             f"{s['ratio_vs_hello_same_loop']:.0%}" if "ratio_vs_hello_same_loop" in s else "-"]
            for n, s in summary.items()]
    print(f"\nceiling, wrk -t1 -c{args.connections} -d{duration}s on cpu 1, servers on cpu 0, median of {repeats}")
    print(table(rows, ["config", "req/s", "p50 ms", "p99 ms", "server cpu", "vs hello (same loop)"]))
    print("uvloop / asyncio: " + ", ".join(f"{t} x{g:.2f}" for t, g in gain.items())
          + f" -> uvloop {'helps' if uvloop_helps else 'does not clearly help'} (it is the default)")

    fig = go.Figure()
    for lp, color in zip(LOOPS, ("#9ca3af", "#2563eb"), strict=True):
        fig.add_bar(name=lp, x=list(TARGETS), y=[summary[f"{t} {lp}"]["requests_per_s"] for t in TARGETS],
                    marker_color=color,
                    text=[f"p99 {summary[f'{t} {lp}']['p99_ms']:.1f} ms" for t in TARGETS], textposition="outside")
    fig.update_layout(title="Ceiling on one core: hello-world vs /v1/limits/check vs invoke (zero-latency skill)",
                      yaxis_title="requests / s (wrk)", barmode="group", template="plotly_white")
    png = write_png(fig, "ceiling", args.quick)
    figures = {"summary": summary, "uvloop_gain": gain, "uvloop_helps": uvloop_helps, "runs": runs}
    params = {"wrk": f"taskset -c 1 wrk -t1 -c{args.connections} -d{duration}s --latency --timeout 5s",
              "duration_s": duration, "repeats": repeats, "server_cpus": sorted(SERVER_CPU),
              "load_cpus": sorted(LOAD_CPU), "skill": "simulated, median_ms 0, p99_ms 0",
              "node_loop_env": "EDGE_LOOP=asyncio|uvloop", "peers_per_node": 2, "gossip_interval_ms": 20}
    path = write_results("bench_ceiling", figures, quick=args.quick, started=started,
                         extra={"parameters": params, "charts": {"ceiling": fig_json(fig)}, "png": {"ceiling": png}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
