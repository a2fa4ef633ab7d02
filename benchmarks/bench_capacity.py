"""Capacity as a search: closed-loop users stepped up until P95 >= 5 s or errors > 0.1 %.

Every step is a whole workbench drill (``workbench.run.drill.run_drill``): 3 regions, one node each,
gossip every 20 ms, the router in front, users spread evenly over the regions, each sending its next
``POST /v1/skills/rating/invoke`` as soon as the previous answer came (no think time).  The skill
looks like an LLM behind the edge: lognormal latency (median 1.5 s, p99 4 s), an answer of about
2 KB of chat-completion JSON (``skill.answer_bytes``), and ``--skill-cpu-us`` of CPU per call on the
node (default 200 µs: the edge's own work for an upstream call, parsing its answer).  The limit is
far above the load, so nothing is refused: the search measures the edge, not the limit.

Per step: P95 / P99 latency (the checker's: from the intended send time, errors included), errors,
req/s served, the CPU of the edge (nodes + router, the drill's psutil samples), the CPU of the load
generators (this process and its generator workers, psutil) and of the whole machine
(``psutil.cpu_times``, everyone's), the edge's peak RSS and its sockets.  **The generators' CPU is
counted against the machine**: headroom = 100 % - (edge + generators) / 2 cores.  The largest passing
step is the result; what limited the next step is named from its figures (CPU, sockets, memory,
shedding, or the skill's latency).  The reference case study's table (40 users at P95 < 5 s, 12 req/s,
35 % headroom, 1.2 GB) is written beside it.

Usage: .venv/bin/python benchmarks/bench_capacity.py [--quick] [--steps 250,500,...] [--step-s S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from benchmarks._procs import install_signal_handlers, table, workdir, write_results
from benchmarks._targets import target
from workbench.run.cluster import ClusterError
from workbench.run.drill import run_drill
from workbench.spec.scenario import Scenario

SKILL_MEDIAN_MS = 1500.0
SKILL_P99_MS = 4000.0
ANSWER_BYTES = 2048
P95_LIMIT_MS = 5000.0
ERROR_LIMIT_PCT = 0.1
REFERENCE = {"users_p95_lt_5s": 40, "requests_per_s": 12, "cpu_headroom_pct": 35, "memory_gb": 1.2}
FULL_STEPS = (250, 500, 1000, 1500, 2000, 3000, 4000, 6000)
QUICK_STEPS = (40,)


@dataclass
class Snapshot:
    """CPU-seconds so far of this process and of every descendant, split into the edge (``-m
    edge_server``: nodes and router) and the rest (the load generators and this driver), the machine's
    busy CPU-seconds (everyone's), and the edge's open file descriptors and RSS."""

    t_s: float
    edge_cpu_s: float
    other_cpu_s: float
    machine_cpu_s: float
    edge_fds: int
    edge_rss_mb: float

    @classmethod
    def take(cls, t_s: float) -> Snapshot:
        me = psutil.Process()
        edge = other = rss = 0.0
        fds = 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                if "edge_server" in " ".join(p.cmdline()):
                    edge += t.user + t.system
                    fds += p.num_fds()
                    rss += p.memory_info().rss / 2**20
                else:
                    other += t.user + t.system
        m = psutil.cpu_times()
        busy = m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0)
        return cls(t_s, edge, other, busy, fds, rss)


def step_scenario(users: int, duration: float, cpu_us: float, answer_bytes: int, seed: int) -> Scenario:
    return Scenario.build(
        name=f"capacity-{users}", seed=seed, duration_s=duration, regions=3, nodes_per_region=1,
        gossip_interval_ms=20.0, health_interval_ms=100.0, rate=1e9, burst=1e9, tenants=30,
        load_mode="closed", users=users, think_ms=0.0, route="invoke", processes=2 if users > 200 else 1,
        skill_median_ms=SKILL_MEDIAN_MS, skill_p99_ms=SKILL_P99_MS, skill_cpu_us=cpu_us,
        skill_answer_bytes=answer_bytes)


def run_step(folder: Path, users: int, duration: float, cpu_us: float, answer_bytes: int) -> dict[str, Any]:
    scenario = step_scenario(users, duration, cpu_us, answer_bytes, seed=users)
    load0 = os.getloadavg()[0]
    snaps: list[Snapshot] = []

    def on_progress(snapshot: dict[str, Any], _live: Any) -> None:
        snaps.append(Snapshot.take(float(snapshot.get("t_s", 0.0))))

    for attempt in (1, 2):  # a free port taken by another program between pick and bind: one more try
        snaps.clear()
        try:
            result = asyncio.run(run_drill(scenario, folder / f"users-{users}-{attempt}", on_progress=on_progress))
            break
        except ClusterError as exc:
            if attempt == 2:
                raise
            print(f"  cluster did not start ({str(exc)[:100]}); once more", flush=True)
    s = result.summary
    reqs = result.recording.requests
    served = [r for r in reqs if 200 <= r.status < 300]
    errors = [r for r in reqs if not (200 <= r.status < 300 or r.status == 429)]
    lat = s.get("latency_ms") or {}
    # CPU over the loaded part of the run only (process start-up and the drill's teardown left out):
    # from the first snapshot after the first wave of answers to the last one before the load ended
    warm = min(SKILL_MEDIAN_MS / 1000, duration / 3)
    inside = [x for x in snaps if warm <= x.t_s <= duration]
    if len(inside) < 2:
        raise RuntimeError(f"{len(snaps)} CPU snapshots, {len(inside)} inside the load: step too short")
    a, b = inside[0], inside[-1]
    span = b.t_s - a.t_s
    edge_cpu_s, gen_cpu_s = b.edge_cpu_s - a.edge_cpu_s, b.other_cpu_s - a.other_cpu_s
    machine_cpu_s = b.machine_cpu_s - a.machine_cpu_s
    served_in_span = sum(1 for r in served if a.t_s <= r.end_s < b.t_s)
    cores = psutil.cpu_count() or 2
    gen = result.recording.extra.get("generator", {})
    return {
        "users": users, "duration_s": duration, "requests": len(reqs), "served": len(served),
        "served_per_s": round(sum(1 for r in served if r.end_s <= duration) / duration, 1),
        "p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"), "p99_ms": lat.get("p99"),
        "errors": len(errors), "error_pct": round(100 * len(errors) / max(1, len(reqs)), 4),
        "errors_by_code": dict(Counter(f"{r.status} {r.error}"[:60] for r in errors).most_common(5)),
        "edge_cpu_s": round(edge_cpu_s, 2), "generators_cpu_s": round(gen_cpu_s, 2),
        "machine_cpu_s": round(machine_cpu_s, 2), "cpu_span_s": [round(a.t_s, 2), round(b.t_s, 2)],
        "edge_cpu_pct_of_machine": round(100 * edge_cpu_s / (span * cores), 1),
        "generators_cpu_pct_of_machine": round(100 * gen_cpu_s / (span * cores), 1),
        "machine_busy_pct": round(100 * machine_cpu_s / (span * cores), 1),
        "headroom_pct": round(100 - 100 * (edge_cpu_s + gen_cpu_s) / (span * cores), 1),
        "edge_cpu_ms_per_request": round(1000 * edge_cpu_s / max(1, served_in_span), 3),
        "edge_rss_peak_mb": round(max(x.edge_rss_mb for x in snaps), 1),
        "edge_fds_peak": max(x.edge_fds for x in snaps),
        "generator_valid": gen.get("valid"), "generator_lag_p99_ms": (gen.get("lag_ms") or {}).get("p99"),
        "load_avg_1m_before": round(load0, 2), "invariants_ok": s.get("invariants_ok"),
        "reasons": (s.get("reasons") or [])[:3],
    }


def passes(step: dict[str, Any]) -> bool:
    return (step["p95_ms"] is not None and step["p95_ms"] < P95_LIMIT_MS and step["error_pct"] <= ERROR_LIMIT_PCT
            and step["served"] > 0)


def limited_by(step: dict[str, Any]) -> str:
    """What stopped a failing step, from its own figures."""
    codes = " ".join(step["errors_by_code"])
    cpu = (f"CPU (machine {step['machine_busy_pct']:.0f} % busy; edge {step['edge_cpu_pct_of_machine']:.0f} %, "
           f"generators {step['generators_cpu_pct_of_machine']:.0f} %)")
    if step["error_pct"] > ERROR_LIMIT_PCT and step["machine_busy_pct"] >= 85:
        return f"{cpu}, seen as errors: {codes[:100]}"
    if step["error_pct"] > ERROR_LIMIT_PCT:
        if any(w in codes for w in ("Too many open files", "EMFILE", "ClientConnectorError", "ServerDisconnected")):
            return "sockets (connection errors: " + codes[:80] + ")"
        if "overloaded" in codes or "503" in codes:
            return "edge shedding (503 overloaded: max_inflight / queue)"
        return "errors: " + codes[:100]
    if step["machine_busy_pct"] >= 85:
        return cpu
    if step["edge_rss_peak_mb"] > 0.8 * psutil.virtual_memory().total / 2**20:
        return "memory"
    return "skill latency (P95 over 5 s without CPU saturation)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small step of 4 s (a smoke test: says nothing)")
    parser.add_argument("--steps", default="", help="comma-separated user counts (default 250 ... 6000)")
    parser.add_argument("--step-s", type=float, default=None, help="seconds per step (default 20)")
    parser.add_argument("--skill-cpu-us", type=float, default=200.0, help="CPU per skill call on the node, µs")
    parser.add_argument("--answer-bytes", type=int, default=ANSWER_BYTES, help="size of the skill's JSON answer")
    args = parser.parse_args()
    install_signal_handlers()
    started = time.time()
    try:
        steps = [int(x) for x in args.steps.split(",") if x.strip()] or list(QUICK_STEPS if args.quick else FULL_STEPS)
    except ValueError:
        parser.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    step_s = args.step_s or (4.0 if args.quick else 20.0)
    folder = workdir("capacity")
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    stopped: dict[str, Any] | None = None
    for users in steps:
        print(f"step: {users} users, {step_s:g} s ...", flush=True)
        row = run_step(folder, users, step_s, args.skill_cpu_us, args.answer_bytes)
        row["passed"] = passes(row)
        rows.append(row)
        print(f"  P95 {row['p95_ms']} ms, errors {row['error_pct']} %, {row['served_per_s']} req/s, edge "
              f"{row['edge_cpu_ms_per_request']} ms CPU/req, machine {row['machine_busy_pct']} % busy, headroom "
              f"{row['headroom_pct']} %, edge RSS {row['edge_rss_peak_mb']} MB, fds {row['edge_fds_peak']}", flush=True)
        if not row["passed"]:
            stopped = row
            break
        best = row
    limit = limited_by(stopped) if stopped else "not reached: every step passed (raise --steps)"
    print()
    print(table([[r["users"], r["p95_ms"], r["p99_ms"], r["error_pct"], r["served_per_s"], r["edge_cpu_ms_per_request"],
                  r["edge_cpu_pct_of_machine"], r["generators_cpu_pct_of_machine"], r["machine_busy_pct"],
                  r["headroom_pct"], r["edge_rss_peak_mb"], "pass" if r["passed"] else "FAIL"] for r in rows],
                ["users", "P95 ms", "P99 ms", "err %", "req/s", "edge CPU ms/req", "edge %", "gen %", "machine %",
                 "headroom %", "edge MB", ""]))
    print(f"largest passing step: {best['users'] if best else None} users; limited by: {limit}")
    reference_rows = [
        {"row": "concurrent users at P95 < 5 s", "reference": REFERENCE["users_p95_lt_5s"],
         "ours": best["users"] if best else None},
        {"row": "req/s at that step", "reference": REFERENCE["requests_per_s"],
         "ours": best["served_per_s"] if best else None},
        {"row": "CPU headroom (generators counted)", "reference": f"{REFERENCE['cpu_headroom_pct']} %",
         "ours": f"{best['headroom_pct']} %" if best else None},
        {"row": "memory (3 nodes + router, peak RSS)", "reference": f"{REFERENCE['memory_gb']} GB",
         "ours": f"{best['edge_rss_peak_mb']} MB" if best else None},
    ]
    figures = {"largest_passing_users": best["users"] if best else None, "limited_by": limit,
               "best_step": best, "stopping_step": stopped, "steps": rows, "reference": REFERENCE,
               "reference_rows": reference_rows}
    params = {"steps": steps, "step_s": step_s, "regions": 3, "nodes_per_region": 1, "router": True,
              "gossip_interval_ms": 20.0, "tenants": 30, "limit": "rate 1e9, burst 1e9 (nothing refused)",
              "skill": {"median_ms": SKILL_MEDIAN_MS, "p99_ms": SKILL_P99_MS, "cpu_us": args.skill_cpu_us,
                        "answer_bytes": args.answer_bytes},
              "stop_when": f"P95 >= {P95_LIMIT_MS:g} ms or errors > {ERROR_LIMIT_PCT} %",
              "generators": "the workbench closed-loop generator, 2 processes above 200 users; CPU by psutil",
              "headroom": "100 % - (edge + generators CPU-seconds) / (span x cores)"}
    tgts = [target("largest passing step (closed-loop users at P95 < 5 s, errors <= 0.1 %)",
                   best["users"] if best else None, ">=", 1000, "users")]
    path = write_results("bench_capacity", figures, quick=args.quick, started=started, targets=tgts,
                         extra={"parameters": params})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
