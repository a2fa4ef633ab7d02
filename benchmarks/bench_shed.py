"""What one quick 503 costs: CPU of the router (and of a node) per shed request.

Past capacity almost every request is a shed: at 10x the capacity nine in ten.  Whatever a shed costs
in CPU is taken from the requests that are served on the same machine, so goodput at 10x can hold only
if a shed is far cheaper than a served request.  This measures it on its own:

* one region, one node with a slow skill (median 3 s) and an admission limit of 4 (``server`` or
  ``router`` table: ``max_inflight = 4``, ``queue_max = 0``, adaptive limit off), so after the first 4
  requests every request is shed at once (``queue_full``);
* ``wrk -t1 -c64`` sends ``POST /v1/skills/rating/invoke`` (keep-alive) for ``--duration`` seconds,
  pinned to cpu 1; the process under test is pinned to cpu 0;
* CPU of the process under test (user + system, ``/proc/PID/stat`` through psutil) over the wrk run,
  divided by the requests wrk completed: microseconds of CPU per shed.

Targets: ``router``, the router's gate (the node behind it holds the 4 slots' requests); ``node``, the
node's own gate (requests straight to the node).  Rounds alternate between the targets.

Usage: .venv/bin/python benchmarks/bench_shed.py [--quick] [--duration S] [--rounds N]
Writes ``benchmarks/results/shed[-quick].json``.
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
    Cluster,
    Procs,
    cpu_seconds,
    free_port,
    install_signal_handlers,
    run_wrk,
    table,
    wait_ready,
    workdir,
    write_cluster,
    write_results,
)
from benchmarks.bench_ceiling import INVOKE_LUA
from edge_server.config import SkillConfig

SERVER_CPU = {0}
LOAD_CPU = {1}
GATE = "max_inflight = 4\nqueue_max = 0\nlag_target_ms = 0.0\n"


def measure(url: str, pid: int, script: Path, duration: int) -> dict[str, float]:
    """One wrk run against ``url``; CPU µs of ``pid`` per completed request."""
    proc = psutil.Process(pid)
    before = cpu_seconds([proc])
    res = run_wrk(url, threads=1, connections=64, duration_s=duration, script=script, cpus=LOAD_CPU)
    used = cpu_seconds([proc]) - before
    return {"requests": res.requests, "non_2xx": res.non_2xx, "req_per_s": res.requests_per_s,
            "p99_ms": res.p99_ms, "cpu_s": round(used, 3),
            "cpu_us_per_request": round(1e6 * used / res.requests, 1) if res.requests else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 5; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per target (default 3; quick 1)")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    duration = args.duration or (2 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    folder = workdir("shed")
    path, nodes = write_cluster(folder, ["eu"], limits=[("*", 1e9, 1e9)],
                                skill=SkillConfig(name="rating", kind="simulated", median_ms=3000, p99_ms=4000))
    text = path.read_text()
    # the node's and the router's gates: 4 slots, no queue, no adaptive limit
    text = text.replace("[server]\n", "[server]\n" + GATE, 1) if "[server]\n" in text else text + "\n[server]\n" + GATE
    path.write_text(text + f"\n[router]\n{GATE}")
    script = folder / "invoke.lua"
    script.write_text(INVOKE_LUA.replace('"Authorization"] = "Bearer key-bench"}',
                                         '"Authorization"] = "Bearer key-bench", ["X-Client-Region"] = "eu"}'))
    runs: dict[str, list[dict[str, float]]] = {"router": [], "node": []}
    with Procs(folder) as procs:
        cluster = Cluster(path, nodes, procs)
        node = cluster.start(nodes[0].id, cpus=SERVER_CPU)
        router_port = free_port()
        router = procs.start("router", [PYTHON, "-m", "edge_server", "router", "--cluster", str(path), "--port",
                                        str(router_port), "--log-level", "WARNING"], cpus=SERVER_CPU)
        router_url = f"http://127.0.0.1:{router_port}"
        wait_ready(router_url, router, path="/healthz")
        invoke = "/v1/skills/rating/invoke"
        targets = {"router": (router_url + invoke, router.pid), "node": (nodes[0].url + invoke, node.pid)}
        for url, pid in targets.values():  # warm-up: fills the 4 slots, opens the connections
            measure(url, pid, script, 1)
        for r in range(rounds):
            for name, (url, pid) in targets.items():
                row = measure(url, pid, script, duration)
                runs[name].append(row)
                print(f"round {r + 1} {name}: {row}", flush=True)
    figures = {}
    for name, rows in runs.items():
        figures[name] = {"cpu_us_per_shed_median": statistics.median(x["cpu_us_per_request"] for x in rows),
                         "shed_share": round(sum(x["non_2xx"] for x in rows) / max(1, sum(x["requests"] for x in rows)),
                                             4),
                         "req_per_s_median": statistics.median(x["req_per_s"] for x in rows), "rounds": rows}
    print(table([[n, f["cpu_us_per_shed_median"], f["req_per_s_median"], f["shed_share"]] for n, f in figures.items()],
                ["process", "CPU µs per shed (median)", "sheds/s on one core", "share shed"]))
    out = write_results("shed", figures, quick=args.quick, started=started,
                        extra={"parameters": {"duration_s": duration, "rounds": rounds, "wrk": "-t1 -c64, cpu 1",
                                              "server_cpu": 0, "gate": GATE.strip().splitlines()}})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
