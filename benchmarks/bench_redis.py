"""Our replicated limiter vs the centralized design users run today: a token bucket in a real
redis-server driven by an atomic Lua script from the fair app (benchmarks/redis_limiter_app.py: the
low-level aiohttp server, orjson, uvloop, gc.freeze, hiredis, a pool sized to wrk's connections).

Two parts, one run, same machine (the outage comparison against a *replicated* Redis is
bench_outage.py):

1. **Throughput at the same CPU budget** with wrk (-t1 -c64 on cpu 1): on two cores the app and
   redis-server cannot each get a core while wrk has the other, so the centralized design gets what
   ours gets -- one core: the Redis app and redis-server together on cpu 0, vs our node alone on cpu 0
   (its 2 gossip peers on cpu 1, beside wrk, as in bench_node.py; their CPU is reported too).  POST
   /v1/limits/check over 1,000 keys whose limit is far above the load, rounds interleaved.  Each side's
   CPU is measured with psutil over each run (app + redis-server; node, and node + peers), and given
   as **CPU-seconds per 1,000 decisions**, a ratio that does not depend on the pinning.  Our node
   answers plain checks from their raw bytes (``server.fast_check``), the Redis app through aiohttp's
   request path; so the same node with ``fast_check = false`` runs beside them (a second 3-node
   cluster, pinned the same way), and the ratio is reported for both paths.
2. **Accuracy**: R = 100 tokens/s, B = 100, one key per design, 2x load from an open-loop asyncio
   client (every request at its intended time); admitted vs the envelope B + R·t.  The Redis app is
   one replica (replicas are stateless, Redis is the state); ours is a 3-node cluster, load split evenly.

Redis: ``redis-server --save '' --appendonly no`` on a free loopback port; the app's Redis timeout
is 250 ms (socket connect and read).

Usage: .venv/bin/python benchmarks/bench_redis.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import plotly.graph_objects as go
import psutil

from benchmarks._plots import fig_json, write_png
from benchmarks._procs import (
    PYTHON,
    REPO,
    Child,
    Cluster,
    Procs,
    cpu_seconds,
    free_port,
    http_json,
    install_signal_handlers,
    run_wrk,
    table,
    wait_ready,
    workdir,
    write_cluster,
    write_results,
)
from benchmarks._targets import target
from benchmarks.bench_accuracy import worst_interval
from benchmarks.bench_node import write_lua
from edge_server.config import load_cluster
from edge_server.config_dump import write_cluster as write_cluster_config

R = 100.0
B = 100.0
LOAD = 2 * R
REDIS = "/usr/bin/redis-server"
REDIS_TIMEOUT_MS = 250
DESIGNS = ("redis fail-open", "redis fail-closed", "ours (3 nodes)")
SERVER_CPU = {0}
LOAD_CPU = {1}
REDIS_SIDE = "redis (app + redis-server, cpu 0)"
OURS_SIDE = "ours (node, cpu 0)"
# The same node with ``server.fast_check = false``: every check through aiohttp's request path, the path
# the Redis app takes too -- so the ratio above is split into what the HTTP path buys and what the store does.
OURS_AIOHTTP_SIDE = "ours, aiohttp path (node, cpu 0)"


@dataclass
class Rec:
    intended: float
    target: str
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    allowed: bool = False
    degraded: bool = False  # fail-open admitted without asking Redis
    error: str = ""


@dataclass
class Design:
    name: str
    key: str
    urls: dict[str, str]  # target id -> check URL
    up: list[str] = field(default_factory=list)
    turn: int = 0
    records: list[Rec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.up = list(self.urls)

    def pick(self) -> str:
        self.turn += 1
        return self.up[self.turn % len(self.up)]


def start_redis(procs: Procs, port: int, name: str = "redis", cpus: set[int] | None = None,
                extra: list[str] | None = None) -> Child:
    """A redis-server on ``port`` (no persistence), pinned to ``cpus``; waits for its PONG."""
    child = procs.start(name, [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                               "no", "--protected-mode", "no", *(extra or [])], cpus=cpus)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return child
        time.sleep(0.02)
    raise TimeoutError(f"redis-server on {port} did not answer PING:\n{child.log_tail()}")


def start_app(procs: Procs, name: str, redis_port: int | None, rate: float, burst: float, fail: str, *,
              sentinel: str | None = None, pool: int = 64, cpus: set[int] | None = None) -> tuple[str, Child]:
    """The fair Redis app on a free port, on ``redis_port`` or following ``sentinel`` (HOST:PORT)."""
    port = free_port()
    where = ["--sentinel", sentinel] if sentinel else ["--redis-port", str(redis_port)]
    child = procs.start(name, [PYTHON, str(REPO / "benchmarks" / "redis_limiter_app.py"), "--port", str(port),
                               *where, "--rate", repr(rate), "--burst", repr(burst), "--pool", str(pool),
                               "--fail", fail, "--redis-timeout-ms", str(REDIS_TIMEOUT_MS)],
                        cpus=SERVER_CPU if cpus is None else cpus)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, child)
    return url, child


async def drive(designs: list[Design], duration: float, events: list[tuple[float, Any]],
                timeout_s: float = 2.0) -> float:
    """Open loop: every design gets LOAD req/s at fixed intended times; ``events`` (offset, callable)
    run in the schedule at their offsets.  Returns the wall clock of t = 0."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    tasks: set[asyncio.Task] = set()

    async def one(d: Design, rec: Rec, session: aiohttp.ClientSession, t0: float) -> None:
        rec.sent = time.monotonic() - t0
        try:
            async with session.post(d.urls[rec.target], json={"key": d.key, "cost": 1}) as resp:
                body = await resp.read()
                rec.status = resp.status
                rec.allowed = resp.status == 200 and (b'"allowed": true' in body or b'"allowed":true' in body)
                rec.degraded = b'"degraded": true' in body or b'"degraded":true' in body
                if resp.status >= 300:
                    rec.error = body[:120].decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            rec.error = type(exc).__name__
        rec.done = time.monotonic() - t0

    n = int(duration * LOAD)
    pending = sorted(events, key=lambda e: e[0])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic() + 0.05
        wall0 = time.time() + 0.05
        for i in range(n):
            offset = i / LOAD
            while pending and pending[0][0] <= offset:
                _, fn = pending.pop(0)
                res = fn()
                if asyncio.iscoroutine(res):
                    task = asyncio.create_task(res)
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            delay = t0 + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for d in designs:
                rec = Rec(offset, d.pick())
                d.records.append(rec)
                task = loop.create_task(one(d, rec, session, t0))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=10)
    return wall0


def figures_of(d: Design, duration: float, window: tuple[float, float] | None = None) -> dict[str, Any]:
    recs = d.records
    admitted_ts = [r.sent for r in recs if r.allowed]
    span = recs[-1].intended - recs[0].intended if recs else 0.0
    envelope = B + R * span
    out: dict[str, Any] = {
        "requests": len(recs), "admitted": len(admitted_ts),
        "denied": sum(1 for r in recs if not r.allowed and r.status in (200, 429)),
        "errors": sum(1 for r in recs if not r.allowed and r.status not in (200, 429)),
        "envelope_tokens": round(envelope, 1),
        "over_admission_pct": round(100 * (len(admitted_ts) - envelope) / envelope, 2),
        # tokens above B + R*(t - s) in the worst window [s, t] (0 or less: the envelope held)
        "worst_window_excess_tokens": round(worst_interval(admitted_ts, R) - B, 1),
        "admitted_without_redis": sum(1 for r in recs if r.degraded),
        "error_kinds": dict(Counter(r.error or str(r.status) for r in recs
                                    if not r.allowed and r.status not in (200, 429)).most_common(5)),
    }
    lat = sorted((r.done - r.intended) * 1000 for r in recs if r.status)
    if lat:
        out["latency_ms"] = {"p50": round(lat[len(lat) // 2], 2), "p99": round(lat[int(len(lat) * 0.99)], 2)}
    if window:
        a, b = window
        inside = [r for r in recs if a <= r.intended < b]
        adm = sum(1 for r in inside if r.allowed)
        out["fault_window_s"] = [round(a, 2), round(b, 2)]
        out["fault_window"] = {
            "admitted": adm, "limit_tokens": round(R * (b - a), 1),
            "admitted_pct_of_limit": round(100 * adm / (R * (b - a)), 1),
            "errors": sum(1 for r in inside if not r.allowed and r.status not in (200, 429)),
            "error_pct": round(100 * sum(1 for r in inside if not r.allowed and r.status not in (200, 429))
                               / max(1, len(inside)), 1),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    wrk_s = args.duration or (1 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 3)
    acc_s = 2.0 if args.quick else 15.0
    if len(psutil.Process().cpu_affinity()) < 2:
        print("needs 2 cpus", file=sys.stderr)
        return 2
    folder = workdir("redis")
    lua = write_lua(folder, "check", "allow-", 1000)
    results: dict[str, Any] = {}
    redis_port = free_port()
    with Procs(folder) as procs:
        redis_child = start_redis(procs, redis_port, cpus=SERVER_CPU)
        wrk_app, wrk_app_child = start_app(procs, "app-wrk", redis_port, 1e9, 1e9, "open", pool=64)
        open_app, _ = start_app(procs, "app-open", redis_port, R, B, "open")
        closed_app, _ = start_app(procs, "app-closed", redis_port, R, B, "closed")
        path, nodes = write_cluster(folder, ["eu", "us", "ap"], limits=[("allow-*", 1e9, 1e9), ("*", R, B)])
        cluster = Cluster(path, nodes, procs)
        cluster.start_all({nodes[0].id: SERVER_CPU, nodes[1].id: LOAD_CPU, nodes[2].id: LOAD_CPU})
        (folder / "aiohttp-path").mkdir()
        slow_path, slow_nodes = write_cluster(folder / "aiohttp-path", ["eu", "us", "ap"],
                                              limits=[("allow-*", 1e9, 1e9), ("*", R, B)])
        slow_config = load_cluster(slow_path)
        write_cluster_config(slow_path, dataclasses.replace(
            slow_config, server=dataclasses.replace(slow_config.server, fast_check=False)))
        slow_cluster = Cluster(slow_path, slow_nodes, procs)
        slow_cluster.start_all({slow_nodes[0].id: SERVER_CPU, slow_nodes[1].id: LOAD_CPU, slow_nodes[2].id: LOAD_CPU})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(len(http_json(n.url + "/v1/state?keys=none")[1].get("live_peers", [])) == 2
                   for n in (*nodes, *slow_nodes)):
                break
            time.sleep(0.05)
        _, ready = http_json(wrk_app + "/readyz")
        parser_name = ready.get("parser") if isinstance(ready, dict) else None

        # 1. throughput with wrk, the same CPU budget (one core) for both designs
        redis_procs = [psutil.Process(wrk_app_child.pid), psutil.Process(redis_child.pid)]
        node_proc = psutil.Process(cluster.children[nodes[0].id].pid)
        peer_procs = [psutil.Process(cluster.children[n.id].pid) for n in nodes[1:]]
        targets = {REDIS_SIDE: (wrk_app + "/v1/limits/check", redis_procs, []),
                   OURS_SIDE: (nodes[0].url + "/v1/limits/check", [node_proc], peer_procs),
                   OURS_AIOHTTP_SIDE: (slow_nodes[0].url + "/v1/limits/check",
                                       [psutil.Process(slow_cluster.children[slow_nodes[0].id].pid)],
                                       [psutil.Process(slow_cluster.children[n.id].pid) for n in slow_nodes[1:]])}
        wopts = {"threads": 1, "connections": 64, "cpus": LOAD_CPU, "script": lua}
        for url, _, _ in targets.values():
            run_wrk(url, duration_s=1, **wopts)
        wrk_runs: dict[str, list[dict]] = {k: [] for k in targets}
        for rep in range(repeats):
            for name, (url, sides, extra) in targets.items():
                c0, e0 = cpu_seconds(sides), cpu_seconds(extra)
                r0 = cpu_seconds(redis_procs[1:])
                res = run_wrk(url, duration_s=wrk_s, **wopts)
                c1, e1 = cpu_seconds(sides), cpu_seconds(extra)
                r1 = cpu_seconds(redis_procs[1:])
                kdec = max(1, res.requests - res.non_2xx) / 1000
                row = res.as_dict() | {
                    "round": rep + 1, "server_cpu_s": round(c1 - c0, 3),
                    "server_cpu_percent_of_one_core": round(100 * (c1 - c0) / wrk_s, 1),
                    "cpu_s_per_1000_decisions": round((c1 - c0) / kdec, 5)}
                if name == REDIS_SIDE:
                    row["redis_server_cpu_s"] = round(r1 - r0, 3)
                else:
                    row["peers_cpu_s"] = round(e1 - e0, 3)
                    row["cpu_s_per_1000_decisions_with_peers"] = round((c1 - c0 + e1 - e0) / kdec, 5)
                wrk_runs[name].append(row)
                print(f"  wrk {rep + 1}/{repeats} {name:36s} {res.requests_per_s:>9,.0f} req/s  p99 {res.p99_ms:.2f} ms"
                      f"  cpu {row['server_cpu_percent_of_one_core']:.0f}%  "
                      f"{row['cpu_s_per_1000_decisions'] * 1000:.1f} ms CPU / 1,000  non-2xx {res.non_2xx}", flush=True)

        def med(rows: list[dict], key: str) -> float:
            return statistics.median(r[key] for r in rows)

        results["throughput"] = {}
        for name, rows in wrk_runs.items():
            entry = {"requests_per_s": round(med(rows, "requests_per_s")), "p50_ms": round(med(rows, "p50_ms"), 3),
                     "p99_ms": round(med(rows, "p99_ms"), 3), "non_2xx": sum(r["non_2xx"] for r in rows),
                     "cpu_percent_of_one_core": med(rows, "server_cpu_percent_of_one_core"),
                     "cpu_s_per_1000_decisions": med(rows, "cpu_s_per_1000_decisions")}
            if name != REDIS_SIDE:
                entry["cpu_s_per_1000_decisions_with_peers"] = med(rows, "cpu_s_per_1000_decisions_with_peers")
            results["throughput"][name] = entry

        def per_round_ratios(side: str) -> tuple[list[float], list[float]]:
            """Per round: ``side``'s req/s over the Redis app's; the app's CPU per decision over ``side``'s."""
            pairs = list(zip(wrk_runs[side], wrk_runs[REDIS_SIDE], strict=True))
            return ([round(o["requests_per_s"] / max(1.0, r["requests_per_s"]), 3) for o, r in pairs],
                    [round(r["cpu_s_per_1000_decisions"] / max(1e-9, o["cpu_s_per_1000_decisions"]), 3)
                     for o, r in pairs])

        per_round, cpu_round = per_round_ratios(OURS_SIDE)
        results["throughput_ratio_ours_vs_redis_per_round"] = per_round
        results["throughput_ratio_ours_vs_redis"] = round(statistics.median(per_round), 3)
        results["cpu_per_decision_ratio_redis_vs_ours_per_round"] = cpu_round
        results["cpu_per_decision_ratio_redis_vs_ours"] = round(statistics.median(cpu_round), 3)
        slow_round, slow_cpu_round = per_round_ratios(OURS_AIOHTTP_SIDE)
        results["throughput_ratio_ours_aiohttp_path_vs_redis_per_round"] = slow_round
        results["throughput_ratio_ours_aiohttp_path_vs_redis"] = round(statistics.median(slow_round), 3)
        results["cpu_per_decision_ratio_redis_vs_ours_aiohttp_path"] = round(statistics.median(slow_cpu_round), 3)
        results["runs"] = wrk_runs

        # 2. accuracy, no fault
        node_urls = {n.id: n.url + "/v1/limits/check" for n in nodes}
        print(f"accuracy: {acc_s:.0f} s at {LOAD:.0f} req/s per design (R {R:g}/s, B {B:g}) ...", flush=True)
        designs = [Design(DESIGNS[0], "acc-open", {"app-open": open_app + "/v1/limits/check"}),
                   Design(DESIGNS[1], "acc-closed", {"app-closed": closed_app + "/v1/limits/check"}),
                   Design(DESIGNS[2], "acc-ours", dict(node_urls))]
        asyncio.run(drive(designs, acc_s, []))
        results["accuracy"] = {d.name: figures_of(d, acc_s) for d in designs}

    tp = results["throughput"]
    print(f"\nthroughput at one core each (wrk -t1 -c64 -d{wrk_s}s on cpu 1, 1,000 keys), median of {repeats} rounds")
    print(table([[k, f"{v['requests_per_s']:,}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}",
                  f"{v['cpu_percent_of_one_core']:.0f}%", f"{v['cpu_s_per_1000_decisions'] * 1000:.1f}"]
                 for k, v in tp.items()], ["design", "req/s", "p50 ms", "p99 ms", "cpu", "CPU ms / 1,000 decisions"]))
    print(f"ours / redis req/s per round: {per_round}; redis / ours CPU per decision per round: {cpu_round}")
    print(f"ours through aiohttp's request path / redis req/s per round: "
          f"{results['throughput_ratio_ours_aiohttp_path_vs_redis_per_round']}")
    print(f"\naccuracy at 2x load, R {R:g}/s B {B:g}, {acc_s:.0f} s")
    print(table([[k, v["admitted"], v["envelope_tokens"], f"{v['over_admission_pct']:+.2f}%", v["errors"]]
                 for k, v in results["accuracy"].items()], ["design", "admitted", "B+R·t", "over-admission", "errors"]))
    fig = go.Figure()
    names = list(tp)
    fig.add_bar(name="req/s", x=names, y=[tp[n]["requests_per_s"] for n in names],
                marker_color=["#9ca3af", "#2563eb", "#93c5fd"],
                text=[f"p99 {tp[n]['p99_ms']:.1f} ms, {tp[n]['cpu_s_per_1000_decisions'] * 1000:.0f} ms CPU/1k"
                      for n in names], textposition="outside")
    fig.update_layout(title="Same CPU budget (one core): Redis app + redis-server vs our node",
                      yaxis_title="req/s (wrk)",
                      template="plotly_white")
    params = {"R": R, "B": B, "load_per_design_rps": LOAD, "wrk_duration_s": wrk_s, "wrk_repeats": repeats,
              "wrk": f"taskset -c 1 wrk -t1 -c64 -d{wrk_s}s --latency --timeout 5s -s check.lua URL",
              "accuracy_s": acc_s, "redis_timeout_ms": REDIS_TIMEOUT_MS, "redis_parser": parser_name,
              "redis": f"taskset -c 0 {REDIS} --save '' --appendonly no (loopback)",
              "redis_app": "taskset -c 0 benchmarks/redis_limiter_app.py --pool 64 (low-level server, orjson, uvloop)",
              "ours": "taskset -c 0 edge-server (3-node cluster, gossip 20 ms; peers on cpu 1)",
              "ours_aiohttp_path": "the same, another 3-node cluster with server.fast_check = false",
              "cpu": "psutil user+system of the processes named, over each wrk run"}
    tgt = [target("ours / redis req/s at one core each (median of rounds)", results["throughput_ratio_ours_vs_redis"],
                  ">=", 1.0)]
    path = write_results("bench_redis", results, quick=args.quick, started=started, targets=tgt,
                         extra={"parameters": params, "charts": {"redis_throughput": fig_json(fig)},
                                "png": {"redis_throughput": write_png(fig, "redis_throughput", args.quick)}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
