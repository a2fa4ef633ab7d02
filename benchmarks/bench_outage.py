"""Through an outage: a *replicated* Redis token bucket vs our cluster behind the real router.

The centralized design as it is run in production: a primary redis-server, one replica
(``--replicaof``) and a Sentinel (Debian's ``redis-sentinel``; quorum 1, ``down-after-milliseconds``
1,000, which is aggressive: the default is 30,000) that promotes the replica when the primary goes
away.  Two copies of the fair app (benchmarks/redis_limiter_app.py) follow the Sentinel
(``--sentinel``): one fails open, one fails closed.  The primary is reached through the workbench's
fault proxy (``workbench.run.faults.proxy.FaultProxy``) by everyone -- apps, replica and Sentinel --
so a blackhole of the primary is a real one for all of them.  Ours: a 3-region workbench drill
(``workbench.run.drill.run_drill``), one node per region, the REAL router in front, the client
knows nothing of the fault (no oracle).

Ours runs twice: in ``eventual`` mode and in ``strict`` mode (``cluster.mode = "strict"``: escrow rights
and leases, docs/strict-mode.md), where the survivors of a lost or cut-off region may admit only
``(1 - alpha * w_lost) * R`` until the region's floating share is reclaimed.  For strict mode the run also
reports the **recovery**: the time from the fault to the end of the first 500 ms window (by intended send
time) in which the cluster admitted at least that rate (the issue's target: within 2.5 s), with no
synchronized clocks (every node's lease runs on its own monotonic clock).

Each of the three faults hits the primary (Redis) or the busiest region (ours) at 1/3 of the run:

* **kill**: SIGKILL, never restarted (the Sentinel promotes the replica; the router routes around);
* **pause**: SIGSTOP, SIGCONT at 2/3 of the run;
* **blackhole**: the proxy (Redis) or the region's links (ours) drop everything silently, healed at 2/3.

Load: one key per design, R = 100 tokens/s, B = 100, open loop at 2 R (constant arrivals), client
timeout 5 s for both.  Per design, over the fault window (fault to heal/resume; kill: fault to the
end): admitted tokens vs the limit R x window, client errors (no answer, 5xx), answers admitted without
asking Redis (fail-open's ``degraded``), and the **stall**: the longest time after the fault during
which no request got a real decision (a 200 from the limiter or a 429), and the slowest request sent in
the window.  The Sentinel's failover time (fault -> the Sentinel names the new primary) is recorded.

Usage: .venv/bin/python benchmarks/bench_outage.py [--quick] [--duration S]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from benchmarks._plots import fig_json, write_png
from benchmarks._procs import Procs, free_port, install_signal_handlers, table, workdir, write_results
from benchmarks._targets import target
from benchmarks.bench_redis import Design, drive, start_app, start_redis
from edge_server.strict.settings import StrictSettings
from workbench.check import summarize
from workbench.run.drill import run_drill
from workbench.run.faults.proxy import FaultProxy
from workbench.spec.scenario import Scenario

R = 100.0
B = 100.0
LOAD = 2 * R
CLIENT_TIMEOUT_S = 5.0
FAULTS = ("kill", "pause", "blackhole")
SENTINEL = "/usr/bin/redis-sentinel"
MASTER = "edge"
DOWN_AFTER_MS = 1000
SERVER_CPU = {0}
LOAD_CPU = {1}
OURS = {"eventual": "ours (3 regions, router)", "strict": "ours, strict mode (3 regions, router)"}
RECOVERY_WINDOW_S = 0.5
RECOVERY_TARGET_S = 2.5


@dataclass
class Outcome:
    """One request, whichever design answered it (run clock seconds)."""

    intended: float
    end: float
    decided: bool  # the limiter answered: a 200 that is not a degraded admit, or a 429
    admitted: bool
    degraded: bool
    error: bool


# ------------------------------------------------------------------------------------ Redis side


def redis_cmd(port: int, *args: str, timeout: float = 0.5) -> bytes:
    """One RESP command on a fresh connection; the raw reply (enough for PING and the Sentinel)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        time.sleep(0.01)
        return s.recv(65536)


def sentinel_master_port(port: int) -> int | None:
    """The port the Sentinel names as the primary now, or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        reply = redis_cmd(port, "SENTINEL", "get-master-addr-by-name", MASTER).split(b"\r\n")
        return int(reply[4])
    return None


class ProxyThread:
    """A FaultProxy in front of the primary, on an event loop of its own thread (so the open-loop
    client and the blocking process starts never stall it)."""

    def __init__(self, target_port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.proxy = FaultProxy("127.0.0.1", 0, "127.0.0.1", target_port, name="redis-primary")
        self.thread = threading.Thread(target=self.loop.run_forever, name="redis-proxy", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(timeout=5)

    @property
    def port(self) -> int:
        return self.proxy.port

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def replicated_redis(procs: Procs, folder: Path, tag: str) -> dict[str, Any]:
    """Primary, proxy, replica (through the proxy), Sentinel (watching the proxy); waits until the
    replica is in sync and the Sentinel knows it."""
    primary_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    primary = start_redis(procs, primary_port, f"redis-primary-{tag}", cpus=SERVER_CPU)
    proxy = ProxyThread(primary_port)
    replica = start_redis(procs, replica_port, f"redis-replica-{tag}", cpus=SERVER_CPU,
                          extra=["--replicaof", "127.0.0.1", str(proxy.port)])
    conf = folder / f"sentinel-{tag}.conf"
    conf.write_text(f"port {sentinel_port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n"
                    f"dir {folder}\nsentinel monitor {MASTER} 127.0.0.1 {proxy.port} 1\n"
                    f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {MASTER} 5000\nsentinel parallel-syncs {MASTER} 1\n")
    sentinel = procs.start(f"sentinel-{tag}", [SENTINEL, str(conf)], cpus=SERVER_CPU)
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError):
            info = redis_cmd(replica_port, "INFO", "replication")
            known = redis_cmd(sentinel_port, "SENTINEL", "replicas", MASTER)
            if b"master_link_status:up" in info and str(replica_port).encode() in known:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicated Redis {tag} not ready:\n{sentinel.log_tail()}")
        time.sleep(0.1)
    return {"primary": primary, "replica": replica, "sentinel": sentinel, "proxy": proxy,
            "ports": {"primary": primary_port, "replica": replica_port, "sentinel": sentinel_port,
                      "proxy": proxy.port}}


def start_following_app(procs: Procs, name: str, mode: str, sentinel: str, tries: int = 3) -> str:
    """The app following the Sentinel; on a busy machine its first Sentinel query or script load can
    exceed the 250 ms Redis timeout and the app exits, so it gets ``tries`` starts."""
    for attempt in range(1, tries + 1):
        try:
            return start_app(procs, f"{name}-{attempt}", None, R, B, mode, sentinel=sentinel, pool=64,
                             cpus=SERVER_CPU)[0]
        except (RuntimeError, TimeoutError) as exc:
            if attempt == tries:
                raise
            print(f"  {name} did not start ({str(exc).splitlines()[0][:100]}); again", flush=True)
    raise AssertionError("unreachable")


def redis_run(procs: Procs, folder: Path, fault: str, duration: float, fault_at: float,
              back_at: float | None) -> dict[str, Any]:
    """One outage of the replicated Redis under both apps; outcomes per app and the Sentinel's view."""
    rs = replicated_redis(procs, folder, fault)
    sentinel = f"127.0.0.1:{rs['ports']['sentinel']}"
    try:
        urls = {mode: start_following_app(procs, f"app-{mode}-{fault}", mode, sentinel) for mode in ("open", "closed")}
        designs = [Design(f"redis fail-{mode}", f"{fault}-{mode}", {mode: url + "/v1/limits/check"})
                   for mode, url in urls.items()]
        primary, proxy = rs["primary"], rs["proxy"]
        seen: dict[str, Any] = {"applied_mono": None, "promoted_after_s": None, "new_primary_port": None}

        def apply() -> None:
            seen["applied_mono"] = time.monotonic()
            if fault == "kill":
                os.kill(primary.pid, signal.SIGKILL)
            elif fault == "pause":
                os.kill(primary.pid, signal.SIGSTOP)
            else:
                proxy.call(proxy.proxy.partition, "blackhole")

        def back() -> None:
            if fault == "pause":
                os.kill(primary.pid, signal.SIGCONT)
            elif fault == "blackhole":
                proxy.call(proxy.proxy.heal)

        async def watch_sentinel() -> None:
            loop = asyncio.get_running_loop()
            old = rs["ports"]["proxy"]
            while time.monotonic() - (seen["applied_mono"] or time.monotonic()) < duration:
                port = await loop.run_in_executor(None, sentinel_master_port, rs["ports"]["sentinel"])
                if port is not None and port != old:
                    seen["promoted_after_s"] = round(time.monotonic() - seen["applied_mono"], 3)
                    seen["new_primary_port"] = port
                    return
                await asyncio.sleep(0.05)

        events: list[tuple[float, Any]] = [(fault_at, apply), (fault_at + 0.001, watch_sentinel)]
        if back_at is not None:
            events.append((back_at, back))
        asyncio.run(drive(designs, duration, events, timeout_s=CLIENT_TIMEOUT_S))
    finally:
        with contextlib.suppress(ProcessLookupError):
            if rs["primary"].alive():
                os.kill(rs["primary"].pid, signal.SIGCONT)
        rs["proxy"].close()
    out: dict[str, Any] = {"sentinel_failover_s": seen["promoted_after_s"],
                           "replica_promoted": seen["new_primary_port"] == rs["ports"]["replica"],
                           "ports": rs["ports"], "designs": {}}
    for d in designs:
        outcomes = [Outcome(r.intended, r.done, decided=r.status == 429 or (r.status == 200 and not r.degraded),
                            admitted=r.allowed, degraded=r.degraded, error=r.status not in (200, 429))
                    for r in d.records]
        out["designs"][d.name] = outcomes
    return out


# ------------------------------------------------------------------------------------ ours


def our_scenario(fault: str, duration: float, fault_at: float, back_at: float | None, seed: int,
                 mode: str = "eventual") -> Scenario:
    steps = {"kill": {"kill_region_at_s": fault_at},
             "pause": {"pause_at_s": fault_at, "resume_at_s": back_at},
             "blackhole": {"blackhole_at_s": fault_at, "heal_at_s": back_at}}[fault]
    return Scenario.build(name=f"outage-{fault}", seed=seed, duration_s=duration, regions=3, nodes_per_region=1,
                          rate=R, burst=B, tenants=1, load_rps=LOAD, arrival="constant", route="check",
                          health_interval_ms=100.0, mode=mode, **steps)


def our_run(folder: Path, fault: str, duration: float, fault_at: float, back_at: float | None,
            seed: int, mode: str = "eventual") -> dict[str, Any]:
    scenario = our_scenario(fault, duration, fault_at, back_at, seed, mode)
    result = asyncio.run(run_drill(scenario, folder / f"ours-{mode}-{fault}"))
    rec = result.recording
    t_fault = next((f.t_s for f in rec.faults if f.action == fault), fault_at)
    outcomes = [Outcome(r.intended_s, r.end_s, decided=r.status in (200, 429), admitted=r.status == 200
                        and r.allowed is not False, degraded=False, error=r.status not in (200, 429))
                for r in rec.requests]
    summary = summarize(rec)
    fo = summary.get("failover", {})
    return {"fault_at_s": round(t_fault, 4), "outcomes": outcomes,
            "failover_ms": summary.get("failover_ms"),
            "checker": {k: fo.get(k) for k in ("clients", "unserved_clients", "failed_requests",
                                              "timed_out_requests", "stalled_requests")},
            "invariants_ok": summary.get("invariants_ok"), "reasons": summary.get("reasons", [])[:4],
            "over_admission_pct": summary.get("over_admission_pct")}


# ------------------------------------------------------------------------------------ figures


def window_figures(outcomes: list[Outcome], start: float, end: float) -> dict[str, Any]:
    """Admitted vs the limit, errors and stall over [start, end) of intended times."""
    inside = [o for o in outcomes if start <= o.intended < end]
    admitted = sum(1 for o in inside if o.admitted)
    limit = R * (end - start)
    # the stall runs until decisions resume, even past the window's end (up to the last answer seen)
    points = [start]
    for t in sorted(o.end for o in outcomes if o.decided and o.end >= start):
        points.append(t)
        if t > end:
            break
    else:
        points.append(max([end, *(o.end for o in outcomes)]))
    gaps = [b - a for a, b in itertools.pairwise(points)]
    slowest = max(((o.end - o.intended) for o in inside), default=0.0)
    return {"window_s": [round(start, 3), round(end, 3)], "requests": len(inside), "admitted": admitted,
            "limit_tokens": round(limit, 1), "admitted_pct_of_limit": round(100 * admitted / limit, 1),
            "errors": sum(1 for o in inside if o.error),
            "error_pct": round(100 * sum(1 for o in inside if o.error) / max(1, len(inside)), 2),
            "admitted_without_limiter": sum(1 for o in inside if o.degraded),
            "stall_ms": round(1000 * max(gaps), 1), "slowest_request_ms": round(1000 * slowest, 1)}


def strict_goal_per_s(regions: int = 3) -> float:
    """What strict mode's survivors may admit once a region (weight ``1 / regions``) is lost or cut off,
    before its floating share is reclaimed: ``(1 - alpha * w_lost) * R`` at the default alpha."""
    return (1.0 - StrictSettings().alpha / regions) * R


def recovery_s(outcomes: list[Outcome], fault_at: float, end: float, goal_per_s: float,
               window_s: float = RECOVERY_WINDOW_S, step_s: float = 0.01) -> float | None:
    """Seconds from the fault to the end of the first ``window_s`` window (by intended send time, slid
    by ``step_s``) in which at least ``goal_per_s`` tokens a second were admitted; None if none before
    ``end`` (the heal or the run's end)."""
    times = sorted(o.intended for o in outcomes if o.admitted and fault_at <= o.intended < end)
    need = goal_per_s * window_s - 1e-9
    t = fault_at
    while t + window_s <= end + 1e-9:
        lo = bisect.bisect_left(times, t)
        hi = bisect.bisect_left(times, t + window_s)
        if hi - lo >= need:
            return round(t + window_s - fault_at, 3)
        t += step_s
    return None


def admitted_series(outcomes: list[Outcome], duration: float, bin_s: float = 0.1) -> list[float]:
    """Admitted tokens per second in bins of ``bin_s`` (by intended time), for the chart."""
    bins = [0.0] * max(1, round(duration / bin_s))
    for o in outcomes:
        if o.admitted and 0 <= o.intended < duration:
            bins[min(len(bins) - 1, int(o.intended / bin_s))] += 1 / bin_s
    return bins


def outage_chart(series: dict[str, dict[str, list[float]]], duration: float, fault_at: float) -> Any:
    """Admitted tokens/s per design, one panel per fault, the limit R dashed."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=len(series), cols=1, shared_xaxes=True, subplot_titles=list(series))
    colors = {"redis fail-open": "#d97706", "redis fail-closed": "#7c3aed", OURS["eventual"]: "#2563eb",
              OURS["strict"]: "#059669"}
    for row, (_fault, designs) in enumerate(series.items(), start=1):
        for name, ys in designs.items():
            fig.add_scatter(x=[round(i * 0.1, 1) for i in range(len(ys))], y=ys, name=name, legendgroup=name,
                            showlegend=row == 1, line={"color": colors.get(name)}, row=row, col=1)
        fig.add_hline(y=R, line_dash="dash", row=row, col=1)
        fig.add_vline(x=fault_at, line_dash="dot", line_color="#dc2626", row=row, col=1)
    fig.update_layout(title="Admitted tokens/s through an outage: replicated Redis (Sentinel) vs ours (router)",
                      height=260 * len(series), template="plotly_white")
    fig.update_xaxes(title_text="run time (s)", row=len(series), col=1)
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4.5 s runs")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run (default 15)")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    duration = args.duration or (4.5 if args.quick else 15.0)
    fault_at, back_at = round(duration / 3, 2), round(2 * duration / 3, 2)
    for exe in (SENTINEL, "/usr/bin/redis-server"):
        if not os.path.exists(exe):
            print(f"{exe} is missing (Debian packages redis-server and redis-sentinel)", file=sys.stderr)
            return 2
    if len(psutil.Process().cpu_affinity()) < 2:
        print("needs 2 cpus", file=sys.stderr)
        return 2
    folder = workdir("outage")
    results: dict[str, Any] = {}
    series: dict[str, dict[str, list[float]]] = {}
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, LOAD_CPU)  # the open-loop client and the proxy thread on the load core
    for i, fault in enumerate(FAULTS):
        back = None if fault == "kill" else back_at
        end = duration if back is None else back
        print(f"{fault}: replicated Redis ({duration:g} s, fault at {fault_at:g} s"
              + (f", back at {back:g} s" if back else "") + ") ...", flush=True)
        with Procs(folder / f"redis-{fault}") as procs:
            red = redis_run(procs, folder, fault, duration, fault_at, back)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, SERVER_CPU | LOAD_CPU)  # the drill pins nothing: let it use both cores
        ours = {}
        for mode in OURS:
            print(f"{fault}: ours through the router, {mode} mode ...", flush=True)
            ours[mode] = our_run(folder, fault, duration, fault_at, back, seed=300 + i, mode=mode)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, LOAD_CPU)
        designs: dict[str, Any] = {}
        series[fault] = {name: admitted_series(o, duration) for name, o in red["designs"].items()}
        for name, outcomes in red["designs"].items():
            designs[name] = window_figures(outcomes, fault_at, end)
        for mode, name in OURS.items():
            run = ours[mode]
            series[fault][name] = admitted_series(run["outcomes"], duration)
            designs[name] = window_figures(run["outcomes"], run["fault_at_s"], end) | {
                "failover_ms": run["failover_ms"], "checker": run["checker"], "invariants_ok": run["invariants_ok"],
                "reasons": run["reasons"], "whole_run_over_admission_pct": run["over_admission_pct"]}
            if mode == "strict":
                goal = strict_goal_per_s()
                designs[name] |= {"recovery_goal_per_s": round(goal, 2), "recovery_window_s": RECOVERY_WINDOW_S,
                                  "recovery_s": recovery_s(run["outcomes"], run["fault_at_s"], end, goal)}
        results[fault] = {"fault_at_s": fault_at, "back_at_s": back, "sentinel_failover_s": red["sentinel_failover_s"],
                          "replica_promoted": red["replica_promoted"], "designs": designs}
        print(table([[n, f"{v['admitted']} / {v['limit_tokens']:g}", f"{v['admitted_pct_of_limit']:.0f}%",
                      v["errors"], v["admitted_without_limiter"], f"{v['stall_ms']:.0f}",
                      f"{v['slowest_request_ms']:.0f}"] for n, v in designs.items()],
                    ["design", "admitted / limit", "% of limit", "errors", "admitted w/o limiter", "stall ms",
                     "slowest ms"]))
        print(f"  Sentinel failover: {red['sentinel_failover_s']} s (replica promoted: {red['replica_promoted']})",
              flush=True)
        strict_fig = designs[OURS["strict"]]
        print(f"  strict mode: back to {strict_fig['recovery_goal_per_s']:g} tokens/s "
              f"((1 - alpha w_lost) R) after {strict_fig['recovery_s']} s", flush=True)
    tgts = []
    for fault in FAULTS:
        d = results[fault]["designs"][OURS["eventual"]]
        tgts.append(target(f"{fault}: ours admitted in the fault window, % of the limit", d["admitted_pct_of_limit"],
                           ">=", 95.0, "%"))
        tgts.append(target(f"{fault}: ours, client errors in the fault window", d["errors"], "==", 0, "requests"))
        d = results[fault]["designs"][OURS["strict"]]
        tgts.append(target(f"{fault}: strict mode, time back to (1 - alpha w_lost) R", d["recovery_s"], "<=",
                           RECOVERY_TARGET_S, "s"))
        tgts.append(target(f"{fault}: strict mode, client errors in the fault window", d["errors"], "==", 0,
                           "requests"))
    params = {"R": R, "B": B, "load_per_design_rps": LOAD, "arrival": "constant", "client_timeout_s": CLIENT_TIMEOUT_S,
              "duration_s": duration, "fault_at_s": fault_at, "back_at_s": back_at,
              "redis": {"topology": "primary + 1 replica (--replicaof) + 1 Sentinel (quorum 1), all on cpu 0",
                        "sentinel": f"down-after-milliseconds {DOWN_AFTER_MS}, failover-timeout 5000",
                        "proxy": "workbench FaultProxy in front of the primary (apps, replica, Sentinel use it)",
                        "apps": "benchmarks/redis_limiter_app.py --sentinel --pool 64 --redis-timeout-ms 250, "
                                "fail open and fail closed"},
              "ours": "workbench drill: 3 regions x 1 node, router with 100 ms health checks, check route, 1 tenant; "
                      "once in eventual mode, once in strict mode (default strict settings)",
              "recovery": f"strict mode: fault to the end of the first {RECOVERY_WINDOW_S:g} s window (intended "
                          "send times) admitting at least (1 - alpha w_lost) R",
              "stall": "longest time after the fault with no limiter decision (200 not degraded, or 429)",
              "client": "open loop, asyncio (Redis apps: bench_redis.drive; ours: the workbench generator)"}
    for fault in FAULTS:  # the raw per-100 ms series behind the chart
        for name, ys in series[fault].items():
            results[fault]["designs"][name]["admitted_per_s_100ms"] = [round(y, 1) for y in ys]
    fig = outage_chart(series, duration, fault_at)
    path = write_results("bench_outage", results, quick=args.quick, started=started, targets=tgts,
                         extra={"parameters": params, "charts": {"outage": fig_json(fig)},
                                "png": {"outage": write_png(fig, "outage", args.quick, height=800)}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
