"""Our replicated limiter vs the centralized design users run today: a token bucket in a real
redis-server driven by an atomic Lua script from an aiohttp app (benchmarks/redis_limiter_app.py).

Three parts, one run, same machine:

1. **Throughput** with wrk (pinned as bench_node.py: the app or node under test on cpu 0, wrk and
   redis-server on cpu 1): POST /v1/limits/check over 1,000 keys whose limit is far above the load.
2. **Accuracy**: R = 100 tokens/s, B = 100, one key per design, 2x load from an open-loop asyncio
   client (every request at its intended time); admitted vs the envelope B + R·t.  The Redis app is
   one replica (replicas are stateless, Redis is the state); ours is a 3-node cluster, load split evenly.
3. **Outage**: the same three designs driven at once (2x load each, distinct keys): Redis fail-open,
   Redis fail-closed (both apps on the same Redis), ours (3 nodes).  At 1/3 of the run Redis gets
   ``kill -9`` and one of our nodes gets ``kill -9`` at the same moment; at 2/3 both come back (Redis
   restarted empty, the node restarted with its id).  A second run does the same with SIGSTOP /
   SIGCONT.  Our client moves a dead or paused node's share to the survivors at the fault instant
   (a stand-in for the router, whose failover time bench_reference.py measures); requests already
   in flight to it fail.  Per 100 ms bin: admitted / denied / errors per design, charted.

Redis: ``redis-server --save '' --appendonly no`` on a free loopback port; the app's Redis timeout
is 250 ms (socket connect and read), its pool redis.asyncio's ConnectionPool.

Usage: .venv/bin/python benchmarks/bench_redis.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
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
from plotly.subplots import make_subplots

from benchmarks._plots import fig_json, write_png
from benchmarks._procs import (
    PYTHON,
    REPO,
    Child,
    Cluster,
    Procs,
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
from benchmarks.bench_accuracy import worst_interval
from benchmarks.bench_node import write_lua

R = 100.0
B = 100.0
LOAD = 2 * R
BIN_S = 0.1
REDIS = "/usr/bin/redis-server"
REDIS_TIMEOUT_MS = 250
DESIGNS = ("redis fail-open", "redis fail-closed", "ours (3 nodes)")
SERVER_CPU = {0}
LOAD_CPU = {1}


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


def start_redis(procs: Procs, port: int, name: str = "redis") -> Child:
    child = procs.start(name, [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                               "no", "--protected-mode", "no"], cpus=LOAD_CPU)
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


def start_app(procs: Procs, name: str, redis_port: int, rate: float, burst: float, fail: str) -> str:
    port = free_port()
    child = procs.start(name, [PYTHON, str(REPO / "benchmarks" / "redis_limiter_app.py"), "--port", str(port),
                               "--redis-port", str(redis_port), "--rate", repr(rate), "--burst", repr(burst),
                               "--fail", fail, "--redis-timeout-ms", str(REDIS_TIMEOUT_MS)], cpus=SERVER_CPU)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, child)
    return url


async def drive(designs: list[Design], duration: float, events: list[tuple[float, Any]]) -> float:
    """Open loop: every design gets LOAD req/s at fixed intended times; ``events`` (offset, callable)
    run in the schedule at their offsets.  Returns the wall clock of t = 0."""
    timeout = aiohttp.ClientTimeout(total=2.0)
    tasks: set[asyncio.Task] = set()

    async def one(d: Design, rec: Rec, session: aiohttp.ClientSession, t0: float) -> None:
        rec.sent = time.monotonic() - t0
        try:
            async with session.post(d.urls[rec.target], json={"key": d.key, "cost": 1}) as resp:
                body = await resp.read()
                rec.status = resp.status
                rec.allowed = resp.status == 200 and (b'"allowed": true' in body or b'"allowed":true' in body)
                rec.degraded = b'"degraded": true' in body
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


def series(d: Design, duration: float) -> dict[str, list]:
    bins = round(duration / BIN_S)
    out = {"t_s": [round(i * BIN_S, 2) for i in range(bins)], "admitted": [0] * bins, "denied": [0] * bins,
           "errors": [0] * bins}
    for r in d.records:
        k = min(int(r.intended / BIN_S), bins - 1)
        if r.allowed:
            out["admitted"][k] += 1
        elif r.status in (200, 429):
            out["denied"][k] += 1
        else:
            out["errors"][k] += 1
    return out


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


def outage_chart(title: str, data: dict[str, dict], duration: float, fault_at: float, back_at: float) -> go.Figure:
    fig = make_subplots(rows=len(data) + 1, cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[*data, "cumulative admitted vs the limit B + R·t"])
    colors = {"admitted": "#2563eb", "denied": "#9ca3af", "errors": "#dc2626"}
    for row, s in enumerate(data.values(), start=1):
        for kind, color in colors.items():
            fig.add_scatter(x=s["t_s"], y=[v / BIN_S for v in s[kind]], name=kind, line={"color": color},
                            legendgroup=kind, showlegend=row == 1, row=row, col=1)
        fig.add_scatter(x=[0, duration], y=[R, R], name="limit R", line={"color": "#111827", "dash": "dash"},
                        legendgroup="R", showlegend=row == 1, row=row, col=1)
    palette = ["#d97706", "#7c3aed", "#16a34a"]
    last = len(data) + 1
    for (name, s), color in zip(data.items(), palette, strict=False):
        acc, cum = 0, []
        for v in s["admitted"]:
            acc += v
            cum.append(acc)
        fig.add_scatter(x=[t + BIN_S for t in s["t_s"]], y=cum, name=f"{name} admitted", line={"color": color},
                        row=last, col=1)
    fig.add_scatter(x=[0, duration], y=[B, B + R * duration], name="B + R·t", line={"color": "#111827", "dash": "dash"},
                    row=last, col=1)
    for x, text in ((fault_at, "fault"), (back_at, "back")):
        fig.add_vline(x=x, line_dash="dot", line_color="#dc2626", annotation_text=text)
    fig.update_yaxes(title_text="req/s", row=1, col=1)
    fig.update_xaxes(title_text="run time (s)", row=last, col=1)
    fig.update_layout(title=title, height=220 * (len(data) + 1), template="plotly_white")
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    wrk_s = 2 if args.quick else 8
    repeats = 1 if args.quick else 2
    acc_s = 2.0 if args.quick else 15.0
    out_s = 3.0 if args.quick else 12.0
    if len(psutil.Process().cpu_affinity()) < 2:
        print("needs 2 cpus", file=sys.stderr)
        return 2
    folder = workdir("redis")
    lua = write_lua(folder, "check", "allow-", 1000)
    results: dict[str, Any] = {}
    charts: dict[str, Any] = {}
    pngs: dict[str, str | None] = {}
    redis_port = free_port()
    with Procs(folder) as procs:
        redis_child = start_redis(procs, redis_port)
        wrk_app = start_app(procs, "app-wrk", redis_port, 1e9, 1e9, "open")
        open_app = start_app(procs, "app-open", redis_port, R, B, "open")
        closed_app = start_app(procs, "app-closed", redis_port, R, B, "closed")
        path, nodes = write_cluster(folder, ["eu", "us", "ap"], limits=[("allow-*", 1e9, 1e9), ("*", R, B)])
        cluster = Cluster(path, nodes, procs)
        cluster.start_all({nodes[0].id: SERVER_CPU, nodes[1].id: LOAD_CPU, nodes[2].id: LOAD_CPU})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(len(http_json(n.url + "/v1/state?keys=none")[1].get("live_peers", [])) == 2 for n in nodes):
                break
            time.sleep(0.05)

        # 1. throughput with wrk
        targets = {"redis (Lua, EVALSHA)": wrk_app + "/v1/limits/check", "ours": nodes[0].url + "/v1/limits/check"}
        wopts = {"threads": 1, "connections": 64, "cpus": LOAD_CPU, "script": lua}
        for url in targets.values():
            run_wrk(url, duration_s=1, **wopts)
        wrk_runs: dict[str, list[dict]] = {k: [] for k in targets}
        for rep in range(repeats):
            for name, url in targets.items():
                res = run_wrk(url, duration_s=wrk_s, **wopts)
                wrk_runs[name].append(res.as_dict())
                print(f"  wrk {rep + 1}/{repeats} {name:22s} {res.requests_per_s:>9,.0f} req/s  p50 {res.p50_ms:.2f} "
                      f"p99 {res.p99_ms:.2f} ms  non-2xx {res.non_2xx}", flush=True)
        results["throughput"] = {
            name: {"requests_per_s": round(statistics.median(r["requests_per_s"] for r in rows)),
                   "p50_ms": round(statistics.median(r["p50_ms"] for r in rows), 3),
                   "p99_ms": round(statistics.median(r["p99_ms"] for r in rows), 3)}
            for name, rows in wrk_runs.items()}
        tp = results["throughput"]
        results["throughput_ratio_ours_vs_redis"] = round(
            tp["ours"]["requests_per_s"] / max(1, tp["redis (Lua, EVALSHA)"]["requests_per_s"]), 2)

        node_urls = {n.id: n.url + "/v1/limits/check" for n in nodes}

        def make(tag: str) -> list[Design]:
            return [Design(DESIGNS[0], f"{tag}-open", {"app-open": open_app + "/v1/limits/check"}),
                    Design(DESIGNS[1], f"{tag}-closed", {"app-closed": closed_app + "/v1/limits/check"}),
                    Design(DESIGNS[2], f"{tag}-ours", dict(node_urls))]

        # 2. accuracy, no fault
        print(f"accuracy: {acc_s:.0f} s at {LOAD:.0f} req/s per design (R {R:g}/s, B {B:g}) ...", flush=True)
        designs = make("acc")
        asyncio.run(drive(designs, acc_s, []))
        results["accuracy"] = {d.name: figures_of(d, acc_s) for d in designs}

        # 3. outages
        victim = nodes[2].id
        for fault in ("kill", "pause"):
            designs = make(fault)
            ours = designs[2]
            fault_at, back_at = out_s / 3, 2 * out_s / 3
            log: list[str] = []
            state = {"redis": redis_child}

            def do_fault(fault: str = fault, ours: Design = ours, log: list[str] = log,
                         state: dict = state) -> None:
                ours.up.remove(victim)
                if fault == "kill":
                    state["redis"].popen.send_signal(signal.SIGKILL)
                    os.kill(cluster.children[victim].pid, signal.SIGKILL)
                else:
                    os.kill(state["redis"].pid, signal.SIGSTOP)
                    os.kill(cluster.children[victim].pid, signal.SIGSTOP)
                log.append(f"{fault}: redis and {victim} at {time.monotonic():.3f}")

            async def do_back(fault: str = fault, ours: Design = ours, log: list[str] = log,
                              state: dict = state) -> None:
                loop = asyncio.get_running_loop()
                if fault == "kill":
                    with contextlib.suppress(Exception):
                        state["redis"].popen.wait(timeout=1)
                    state["redis"] = await loop.run_in_executor(None, start_redis, procs, redis_port, "redis-2")
                    await loop.run_in_executor(None, lambda: cluster.start(victim, wait=False))
                    log.append("redis restarted empty; node restarting")
                    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
                        for _ in range(300):
                            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                                async with s.get(cluster.node(victim).url + "/readyz") as r:
                                    if r.status == 200:
                                        break
                            await asyncio.sleep(0.02)
                else:
                    os.kill(state["redis"].pid, signal.SIGCONT)
                    os.kill(cluster.children[victim].pid, signal.SIGCONT)
                ours.up.append(victim)
                log.append(f"{victim} back in rotation")

            print(f"outage ({fault}): {out_s:.0f} s, fault at {fault_at:.1f} s, back at {back_at:.1f} s ...",
                  flush=True)
            try:
                asyncio.run(drive(designs, out_s, [(fault_at, do_fault), (back_at, do_back)]))
            finally:
                for child in (state["redis"], cluster.children[victim]):
                    if child.alive():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(child.pid, signal.SIGCONT)
            redis_child = state["redis"]
            data = {d.name: series(d, out_s) for d in designs}
            results[f"outage_{fault}"] = {
                "fault_at_s": fault_at, "back_at_s": back_at, "log": log,
                "designs": {d.name: figures_of(d, out_s, (fault_at, back_at)) | {"series_100ms": data[d.name]}
                            for d in designs}}
            what = "kill -9" if fault == "kill" else "SIGSTOP"
            fig = outage_chart(f"Redis {what} vs one of our 3 nodes {what} at the same moment "
                               f"(R {R:g}/s, 2x load per design)", data, out_s, fault_at, back_at)
            charts[f"redis_outage_{fault}"] = fig_json(fig)
            pngs[f"redis_outage_{fault}"] = write_png(fig, f"redis_outage_{fault}", args.quick, height=900)

    tp = results["throughput"]
    print("\nthroughput (wrk -t1 -c64, 1,000 keys, server on cpu 0; redis-server and wrk on cpu 1)")
    print(table([[k, f"{v['requests_per_s']:,}", f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}"] for k, v in tp.items()],
                ["design", "req/s", "p50 ms", "p99 ms"]))
    print(f"\naccuracy at 2x load, R {R:g}/s B {B:g}, {acc_s:.0f} s")
    print(table([[k, v["admitted"], v["envelope_tokens"], f"{v['over_admission_pct']:+.2f}%", v["errors"]]
                 for k, v in results["accuracy"].items()], ["design", "admitted", "B+R·t", "over-admission", "errors"]))
    for fault in ("kill", "pause"):
        o = results[f"outage_{fault}"]
        print(f"\noutage ({fault}) {o['fault_at_s']:.1f}-{o['back_at_s']:.1f} s")
        print(table([[k, v["fault_window"]["admitted"], v["fault_window"]["limit_tokens"],
                      f"{v['fault_window']['admitted_pct_of_limit']:.0f}%", f"{v['fault_window']['error_pct']:.0f}%",
                      f"{v['over_admission_pct']:+.1f}%"] for k, v in o["designs"].items()],
                    ["design", "admitted in fault", "R·window", "% of limit", "errors", "whole-run over-admission"]))
    params = {"R": R, "B": B, "load_per_design_rps": LOAD, "bin_s": BIN_S, "wrk_duration_s": wrk_s,
              "wrk_repeats": repeats, "accuracy_s": acc_s, "outage_s": out_s, "redis_timeout_ms": REDIS_TIMEOUT_MS,
              "redis": f"{REDIS} --save '' --appendonly no (loopback, cpu 1)", "ours": "3 nodes, gossip 20 ms"}
    path = write_results("bench_redis", results, quick=args.quick, started=started,
                         extra={"parameters": params, "charts": charts, "png": pngs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
