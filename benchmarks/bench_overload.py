"""Goodput under overload: the offered load stepped past capacity through the router.

Every step is a whole workbench drill (``workbench.run.drill.run_drill``): 3 regions, one node each,
the router in front, ``POST /v1/skills/rating/invoke`` with a simulated skill of median 1.5 s, p99 4 s
and 0.5 ms of CPU per call; the limit is far above the load (nothing is refused with 429), so the
steps measure the edge and its load shedding, not the limiter.

1. **Capacity**: a closed-loop step (``--capacity-users`` users, no think time); its goodput is the
   capacity ``C`` (or ``--capacity-rps`` when given).
2. **Open loop** at 1x, 2x, 5x and 10x ``C`` (Poisson arrivals; 2 generator processes past 500
   req/s).  Every step uses the generator's lean HTTP client (``load.client = "lean"``,
   ``workbench.run.load.lean``, ~15 % less CPU per request than aiohttp's); with the aiohttp client the
   generator itself fell 2.5-4 s behind its schedule past 2x on this 2-core machine, which inflated the
   latencies and cut the offered load, and it still can fall behind: so it says so.  What
   the generator could not send on time is counted, not hidden: per step the requests *asked*
   (rate x window), *sent*, sent *late* (more than 5 ms behind their intended time), dropped at the
   generator's in-flight cap, and its lag (p50 / p99 / max), CPU seconds and peak RSS per generator
   process.
3. **Closed loop** users up to 5,000, with no think time.  A user that gets a shed waits its
   ``Retry-After`` (1 s from the edge, capped at 5 s) before it sends again, as real clients and RFC 9110
   do (``load.honor_retry_after``, the default).  The run of 14:09 UTC had users resend at once: the
   capacity step (3,000 users) then served 575 req/s amid 1,766 sheds/s, a resend loop that measured the
   generator more than the edge.  Open-loop arrivals never wait: they do not depend on answers.

Per step: offered and goodput (2xx per second, by intended send time), shed (quick 503 with
Retry-After from the router's or a node's admission gate), other errors by status, P95 of the served
requests (from the intended send time), ``no_healthy_region`` answers, the router's and the nodes'
peak RSS (psutil, the drill's samples), peak in-flight, ejections by reason, and the drill's verdict.

The verdict is the default one on purpose: it counts every 503 against the error budget, because to a
client a 503 is an error, and the error budget (``workbench.check.errors``) has no setting that exempts
sheds (its one setting is the budget's share, and raising it would also hide real errors).  So every
step that sheds more than the budget FAILS by design: past capacity, a quick shed is the designed
answer.  For those steps read goodput and shed, and ``other_errors_within_budget``: the same budget
(0.1 %) applied to the errors other than sheds (``verdict_note`` says so in each failed step).
Definitions of served / shed / errors: ``workbench.check.overload``.

Also per step: how fast sheds were answered (client-side, from the actual send to the answer, p50 / p95
/ p99: it includes the generator's own loop and any wait in the kernel before the router read the
request), the adaptive limit's cuts per process and the lowest router limit seen.

``--pin`` runs the router and the nodes on cpu 0 and the drill with its load generator on cpu 1
(results ``overload-pinned.json``, plot ``docs/img/overload-pinned.png``): the standard pinning of the
other benchmarks (the server on one core, the load tool on the other).  Unpinned, every process shares
both cores, and past 2x the generator's own CPU for the sheds it sends and reads (96 % of a core at
10x) is taken from the system it measures; pinned, the system has one core of its own, so its capacity
is lower and the steps ask less of the generator.

Every 504 is traced (``timeouts_traced``): the router logs each request it timed out (request id, the
node that had said 100 Continue, how long each try ran, its own loop lag) and a node logs each skill
call whose caller left before it ended (request id, how long the call ran); the two are joined by
request id.  Beside them, ``skill_tail_expected``: how many of the step's calls the reference skill's
lognormal alone sends past the router's 10 s timeout (3.4 in a million calls).

Targets (reported, never an exit code): goodput at 2x-10x >= 90 % of the peak goodput; zero
``no_healthy_region`` (no node is ever down here); zero 5xx other than quick 503 sheds; P95 of served
requests < 5 s; sheds answered in < 10 ms (p95, client-side); router and node RSS < 512 MB each.

Usage: .venv/bin/python benchmarks/bench_overload.py [--quick] [--pin] [--step-s S] [--capacity-rps R]
Writes ``benchmarks/results/overload[-pinned][-quick].json`` and (full runs) ``docs/img/overload[-pinned].png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plotly.graph_objects as go
import psutil

from benchmarks._plots import fig_json, write_png
from benchmarks._procs import install_signal_handlers, table, workdir, write_results
from benchmarks._targets import target
from edge_server.config import RouterConfig
from edge_server.skill import Z99
from workbench.check import overload
from workbench.check.errors import DEFAULT_ERROR_BUDGET_PCT, error_budget_state
from workbench.history import CUT_AT_END, Recording
from workbench.run.cluster import ClusterError
from workbench.run.drill import run_drill
from workbench.spec.scenario import Scenario

SKILL_MEDIAN_MS = 1500.0
SKILL_P99_MS = 4000.0
SKILL_CPU_US = 500.0
P95_LIMIT_MS = 5000.0
CUTS_METRICS = ("router_inflight_limit_cuts_total", "edge_inflight_limit_cuts_total")
SHED_LIMIT_MS = 10.0  # a shed is a quick 503: answered within this long
RSS_LIMIT_MB = 512.0
MULTIPLES = (1, 2, 5, 10)
FULL_USERS = (1000, 2000, 3000, 5000)
QUICK_USERS = ()  # quick: the capacity step (300 users) is the one closed-loop step
TAIL_S = 3.0  # requests scheduled in the last TAIL_S of a step are not measured: with the drill's 2 s drain each
# measured one had 5 s (> the skill's 4 s p99) to be answered
CUT_OFF = CUT_AT_END  # the generator's error for a request still unanswered when its drain ended
PROXIES_NOTE = ("the drills run without the workbench's fault proxies (no fault is injected): with them, every "
                "router-to-node request and all gossip are relayed by asyncio proxies in the benchmark's own "
                "process, whose CPU no sample showed; at 2,550 req/s offered that loop stalled for seconds "
                "(no metrics scrape for 11 s, served P95 11 s, node sheds answered 5 s after the send)")
CLIENT = "lean"  # the generator's HTTP client (workbench.run.load.lean): ~15 % less CPU per request than aiohttp
TWO_PROCESSES_RPS = 500.0
TWO_PROCESSES_USERS = 200
VERDICT_NOTE = ("the drill's verdict counts quick 503 sheds against the error budget (a 503 is an error to a "
                "client; no setting exempts sheds): this step shed past the budget, as designed past capacity. "
                "Judge it by goodput, shed and other_errors_within_budget")


def step_scenario(kind: str, amount: float, duration: float, seed: int) -> Scenario:
    """One step: ``kind`` "open" (``amount`` req/s) or "closed" (``amount`` users)."""
    two = amount > (TWO_PROCESSES_RPS if kind == "open" else TWO_PROCESSES_USERS)
    load: dict[str, Any] = ({"load_mode": "open", "load_rps": float(amount), "arrival": "poisson"} if kind == "open"
                            else {"load_mode": "closed", "users": int(amount), "think_ms": 0.0})
    scenario = Scenario.build(
        name=f"overload-{kind}-{int(amount)}", seed=seed, duration_s=duration, regions=3, nodes_per_region=1,
        rate=1e9, burst=1e9, tenants=30, route="invoke", processes=2 if two else 1,
        skill_median_ms=SKILL_MEDIAN_MS, skill_p99_ms=SKILL_P99_MS, skill_cpu_us=SKILL_CPU_US, **load)
    return replace(scenario, load=replace(scenario.load, client=CLIENT))


def _peak_rss(samples: list[Any], router: bool) -> float | None:
    values = [s.rss_mb for s in samples if (s.name == "router") == router]
    return round(max(values), 1) if values else None


def _pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted ``values`` (nearest rank), in the unit given; None when empty."""
    return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else None


def _quantiles(values: list[float]) -> dict[str, float | None]:
    """p50, p95 and p99 of sorted ``values`` (:func:`_pct`)."""
    return {q: _pct(values, f) for q, f in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}


def _counter_total(metrics: list[Any], names: tuple[str, ...]) -> dict[str, float]:
    """The last value of each process's counter among ``names`` (counters only grow within a step)."""
    last: dict[str, float] = {}
    for m in metrics:
        if m.name in names:
            last[m.node or "router"] = m.value
    return last


def _per_process(samples: list[Any], window: float) -> dict[str, dict[str, float]]:
    """Mean CPU % (of one core) over the samples taken in ``[0, window]`` and peak RSS, per process."""
    out: dict[str, dict[str, float]] = {}
    for name in sorted({p.name for p in samples}):
        mine = [p for p in samples if p.name == name]
        cpu = [p.cpu_pct for p in mine if 0 < p.t_s <= window]
        out[name] = {"cpu_pct_mean": round(sum(cpu) / len(cpu), 1) if cpu else None,
                     "rss_peak_mb": round(max(p.rss_mb for p in mine), 1)}
    return out


def _gauge_min(metrics: list[Any], name: str) -> float | None:
    values = [m.value for m in metrics if m.name == name]
    return min(values) if values else None


def _gauge_quantiles(metrics: list[Any], name: str, scale: float) -> dict[str, float | None]:
    """p50 / p95 / max of a gauge's scraped samples (x ``scale``): for the router's loop lag, how long a
    request's bytes could wait in the kernel before the router read them."""
    values = sorted(m.value * scale for m in metrics if m.name == name)
    return {"p50": _pct(values, 0.5), "p95": _pct(values, 0.95),
            "max": round(values[-1], 3) if values else None, "samples": len(values)}


def _gc_longest(metrics: list[Any]) -> dict[str, dict[str, float]]:
    """Per process and generation: the longest garbage collection (ms), their total (ms) and count."""
    out: dict[str, dict[str, float]] = {}
    for m in metrics:
        if m.name in ("router_gc_pause_longest_seconds", "edge_gc_pause_longest_seconds"):
            out.setdefault(m.node or "router", {})[f"gen{m.labels.get('generation')}"] = round(m.value * 1000, 1)
        elif m.name in ("router_gc_pause_seconds_total", "edge_gc_pause_seconds_total"):
            d = out.setdefault(m.node or "router", {})
            d[f"total_gen{m.labels.get('generation')}"] = round(m.value * 1000, 1)  # counters: the last sample
        elif m.name in ("router_gc_collections_total", "edge_gc_collections_total"):
            out.setdefault(m.node or "router", {})[f"count_gen{m.labels.get('generation')}"] = m.value
    return out


def _generator_cpu_pct(gen: dict[str, Any], duration: float) -> float | None:
    """The load generator's CPU over the step, in % of one core (all its processes)."""
    procs = gen.get("processes") or []
    return round(100 * sum(p.get("cpu_s") or 0 for p in procs) / duration, 1) if procs else None


def listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listener's accept queue was full (TcpExt
    ListenOverflows; for the whole network namespace, so other programs' listeners count too)."""
    try:
        text = Path("/proc/net/netstat").read_text()
        lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
        return int(dict(zip(lines[0], lines[1], strict=True))["ListenOverflows"])
    except (OSError, KeyError, IndexError, ValueError):
        return None


def _log_records(path: Path, message: str) -> list[dict[str, Any]]:
    """The structured log lines of ``path`` whose message is ``message``."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if message in line:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("msg") == message:
                out.append(doc)
    return out


def traced_timeouts(cluster_dir: Path) -> list[dict[str, Any]]:
    """Every request the router timed out (its 504s), joined by request id with what its node logged:
    how long the skill call itself ran (``skill_s``; None if the node logged nothing: the wait was not
    the skill's) and the latency the simulated skill drew (``skill_drawn_ms``).  So a 504 is shown
    to be the skill's own tail, or not."""
    skill_s: dict[str, tuple[str, float, float | None]] = {}
    for log_file in sorted(cluster_dir.glob("*.log")):
        if log_file.stem == "router":
            continue
        for doc in _log_records(log_file, "skill call outlived its caller"):
            skill_s[doc.get("request_id", "")] = (log_file.stem, doc.get("skill_s"), doc.get("skill_drawn_ms"))
    out = []
    for doc in _log_records(cluster_dir / "router.log", "request timed out"):
        rid = doc.get("request_id", "")
        node, ran, drawn = skill_s.get(rid, (doc.get("continued_by"), None, None))
        out.append({"request_id": rid, "route": doc.get("route"), "node": node, "continued": doc.get("continued_by"),
                    "skill_s": ran, "skill_drawn_ms": drawn, "router_loop_lag_ms": doc.get("loop_lag_ms")})
    return out


def skill_tail_probability(seconds: float) -> float:
    """P(one call of the reference skill takes longer than ``seconds``): its lognormal's upper tail."""
    sigma = math.log(SKILL_P99_MS / SKILL_MEDIAN_MS) / Z99
    z = math.log(seconds * 1000 / SKILL_MEDIAN_MS) / sigma
    return 0.5 * math.erfc(z / math.sqrt(2))


SYSTEM_CPU = 0  # --pin: the router and the nodes
LOAD_CPU = 1  # --pin: this process (the drill, its recorder) and the load generator's processes


class Pinner:
    """``--pin``: every edge process (router, node) this process starts runs on :data:`SYSTEM_CPU`, and
    this process -- the drill, its recorder and the generator processes it spawns, which inherit its
    affinity -- on :data:`LOAD_CPU`.  The drill starts its own processes, so a thread pins each one as it
    appears (within ``poll_s`` of its start; a node is not ready for ~0.5 s anyway)."""

    def __init__(self, poll_s: float = 0.02) -> None:
        self.poll_s = poll_s
        self.pinned: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pinner", daemon=True)

    def __enter__(self) -> Pinner:
        os.sched_setaffinity(0, {LOAD_CPU})
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.poll_s):
            try:
                children = me.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                if child.pid in self.pinned:
                    continue
                try:
                    cmd = child.cmdline()
                    if "edge_server" in cmd:
                        child.cpu_affinity([SYSTEM_CPU])
                        self.pinned.add(child.pid)
                except psutil.Error:  # gone, or not ours to pin
                    self.pinned.add(child.pid)


def run_step(folder: Path, kind: str, amount: float, duration: float, label: str) -> dict[str, Any]:
    scenario = step_scenario(kind, amount, duration, seed=int(amount) + (0 if kind == "open" else 7))
    for attempt in (1, 2):  # a free port taken by another program between pick and bind: one more try
        try:
            cpu0, overflows0 = time.process_time(), listen_overflows()
            # No fault proxies: no fault is injected here, and the proxies run in this process, relaying
            # every router-to-node request and all gossip on this one Python loop (see PROXIES_NOTE).
            run_dir = folder / f"{kind}-{int(amount)}-{attempt}"
            result = asyncio.run(run_drill(scenario, run_dir, proxies=False))
            drill_cpu_s = time.process_time() - cpu0
            overflows1 = listen_overflows()
            break
        except ClusterError as exc:
            if attempt == 2:
                raise
            print(f"  cluster did not start ({str(exc)[:100]}); once more", flush=True)
    rec = result.recording
    # figures over the requests whose schedule fell in [0, duration - TAIL_S]: each had the skill's p99
    # plus the drain to be answered, so the end of the run does not cut them off
    window = duration - TAIL_S
    sent = [r for r in rec.requests if r.intended_s < window]
    s = overload.overload_summary(Recording(requests=sent, metrics=rec.metrics))
    no_healthy = sum(1 for r in rec.requests if r.error == "no_healthy_region")  # the whole run
    served = sum(1 for r in sent if overload.outcome(r) == "served")
    shed = sum(1 for r in sent if overload.outcome(r) == "shed")
    errors = sum(1 for r in sent if overload.outcome(r) == "error")
    cut_off = sum(1 for r in rec.requests if r.status == 0 and r.error.startswith(CUT_OFF))
    other_5xx = sum(n for code, n in s["errors_by_status"].items() if code.startswith("5"))
    gen = rec.extra.get("generator") or {}
    asked = round(amount * window) if kind == "open" else None
    sent_in_window = sum(1 for r in sent if not r.error.startswith("max_inflight reached"))
    shed_ms = sorted((r.end_s - r.start_s) * 1000 for r in sent if overload.outcome(r) == "shed")
    shed_by_wait = {kind: sorted((r.end_s - r.start_s) * 1000 for r in sent if overload.shed_wait(r) == kind)
                    for kind in ("on_arrival", "after_wait", "unknown")}
    series = overload.request_series(rec)
    timeouts = traced_timeouts(run_dir / "cluster")
    timeout_s = RouterConfig().request_timeout_ms / 1000
    others_ok, others_pct, _ = error_budget_state(s["errors"], s["requests"] - s["cut_at_end"],
                                                  DEFAULT_ERROR_BUDGET_PCT)
    return {
        "step": label, "kind": kind, "asked": amount, "duration_s": duration, "window_s": [0.0, window],
        "offered_rps": round(len(sent) / window, 1), "goodput_rps": round(served / window, 1),
        "asked_in_window": asked, "scheduled_in_window": len(sent), "sent_in_window": sent_in_window,
        "generator": {"client": scenario.load.client, "sent": gen.get("sent"), "late": gen.get("late"),
                      "late_pct": gen.get("late_pct"), "dropped_at_inflight_cap": gen.get("overflow"),
                      "lag_ms": gen.get("lag_ms"), "processes": gen.get("processes")},
        "cpu_rss_by_process": _per_process(rec.processes, window),
        "drill_process_cpu_s": round(drill_cpu_s, 2),
        "listen_overflows": None if overflows0 is None or overflows1 is None else overflows1 - overflows0,
        "shed_rps": round(shed / window, 1), "errors_rps": round(errors / window, 1),
        "cut_off_at_end": cut_off,
        "requests_measured": s["requests"], "requests_total": len(rec.requests), "served": s["served"],
        "shed": s["shed"], "limited": s["limited"],
        "errors": s["errors"], "errors_by_status": s["errors_by_status"], "other_5xx": other_5xx,
        # the router's 504s, each traced to its node's skill call (``traced_timeouts``), beside how many
        # calls of the reference skill are expected to outlast the router's timeout on their own
        "timeouts_traced": timeouts,
        "skill_tail_expected": round(served * skill_tail_probability(timeout_s), 3),
        "served_p95_ms": s["served_p95_ms"], "no_healthy_region": no_healthy,
        "shed_answer_ms": _quantiles(shed_ms),
        # the same, apart: sheds refused on arrival (the quick 503s the target is for) and sheds after a
        # wait by design (a queue's deadline, a connect under loop lag, a node reached past the deadline)
        "shed_answer_by_wait_ms": {kind: {"count": len(ms), **_quantiles(ms)} for kind, ms in shed_by_wait.items()},
        "shed_reasons_seen": dict(Counter(r.shed or "(none)" for r in sent if overload.outcome(r) == "shed")),
        "adaptive_cuts": _counter_total(rec.metrics, CUTS_METRICS),
        "shed_from_raw_bytes": _counter_total(rec.metrics, ("router_shed_raw_total", "edge_shed_raw_total")),
        "probes_let_through": _counter_total(rec.metrics, ("router_shed_probes_total", "edge_shed_probes_total")),
        "router_loop_lag_ms": _gauge_quantiles(rec.metrics, "router_inflight_limit_lag_seconds", 1000.0),
        "generator_cpu_pct_of_core": _generator_cpu_pct(gen, duration),
        "shed_answer_phases_ms": gen.get("shed_phases_ms"),
        "gc_pause_longest_ms": _gc_longest(rec.metrics),
        "router_limit_min": _gauge_min(rec.metrics, "router_inflight_limit"),
        "router_rss_peak_mb": _peak_rss(rec.processes, True), "node_rss_peak_mb": _peak_rss(rec.processes, False),
        "peak_inflight": s["peak_inflight"], "peak_queue": s["peak_queue"],
        "ejections_by_reason": s["ejections_by_reason"], "ejections_refused": s["ejections_refused"],
        "panic_seen": s["panic_seen"], "shed_counted": s["shed_counted"],
        "generator_lag_p99_ms": (gen.get("lag_ms") or {}).get("p99"), "generator_valid": gen.get("valid"),
        "generator_processes": scenario.load.processes, "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "verdict": "held" if result.ok else "FAILED", "reasons": (result.summary.get("reasons") or [])[:3],
        "other_errors_within_budget": others_ok, "other_errors_pct": others_pct,
        "verdict_note": VERDICT_NOTE if not result.ok and s["shed"] else "",
        "samples": {"per_second": series,
                    "rss_mb": [[round(p.t_s, 2), p.name, round(p.rss_mb, 1)] for p in rec.processes]},
    }


def figure(rows: list[dict[str, Any]], pinned: bool = False) -> go.Figure:
    """Goodput, shed and errors (req/s) and P95 of served requests (s, right axis) against offered load."""
    fig = go.Figure()
    for kind, symbol in (("open", "circle"), ("closed", "square")):
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["offered_rps"])
        if not pts:
            continue
        x = [r["offered_rps"] for r in pts]
        for key, name, color in (("goodput_rps", "goodput (2xx/s)", "#16a34a"), ("shed_rps", "shed (503/s)", "#d97706"),
                                 ("errors_rps", "other errors/s", "#dc2626")):
            fig.add_scatter(x=x, y=[r[key] for r in pts], name=f"{name}, {kind} loop", mode="lines+markers",
                            marker={"symbol": symbol, "size": 9}, line={"color": color,
                                                                        "dash": "solid" if kind == "open" else "dot"})
        fig.add_scatter(x=x, y=[(r["served_p95_ms"] or 0) / 1000 for r in pts], name=f"P95 served (s), {kind} loop",
                        mode="lines+markers", yaxis="y2", marker={"symbol": symbol, "size": 9},
                        line={"color": "#2563eb", "dash": "solid" if kind == "open" else "dot"})
    fig.add_scatter(x=[0, max((r["offered_rps"] for r in rows), default=1)], y=[P95_LIMIT_MS / 1000] * 2,
                    yaxis="y2", mode="lines", name="P95 target (5 s)",
                    line={"color": "#2563eb", "dash": "dash", "width": 1})
    where = "; router and nodes on cpu 0, load generator on cpu 1" if pinned else ""
    fig.update_layout(title=f"Goodput, shed, errors and P95 against offered load (invoke, 3 regions, via the router"
                            f"{where})",
                      xaxis_title="offered load (requests / s)", yaxis_title="requests / s", template="plotly_white",
                      yaxis2={"overlaying": "y", "side": "right", "title": "P95 of served (s)", "rangemode": "tozero"},
                      legend={"orientation": "h", "y": -0.2}, margin={"l": 60, "r": 60, "t": 50, "b": 120})
    return fig


def goodput_held_pct(rows: list[dict[str, Any]]) -> float | None:
    """Worst, over the open-loop steps at 2x or more, of its goodput as % of the peak goodput of every
    step offered no more load than it.  With a true capacity step that peak is the capacity (the
    issue's "goodput at 2x-10x >= 90 % of the peak"); when the capacity step was below the real
    capacity (quick runs), goodput that still grows with the load is not counted as a fall."""
    worst = None
    for r in rows:
        if r["kind"] != "open" or r.get("multiple", 1) < 2:
            continue
        peak = max((x["goodput_rps"] for x in rows if x["offered_rps"] <= r["offered_rps"]), default=0.0)
        if peak > 0:
            pct = 100 * r["goodput_rps"] / peak
            worst = pct if worst is None else min(worst, pct)
    return None if worst is None else round(worst, 1)


def targets_for(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    held = goodput_held_pct(rows)
    p95s = [r["served_p95_ms"] for r in rows if r["served_p95_ms"] is not None]
    sheds = [r["shed_answer_ms"]["p95"] for r in rows if r["shed_answer_ms"]["p95"] is not None]
    quick = [r["shed_answer_by_wait_ms"]["on_arrival"]["p95"] for r in rows
             if r["shed_answer_by_wait_ms"]["on_arrival"]["p95"] is not None]
    rss_router = [r["router_rss_peak_mb"] for r in rows if r["router_rss_peak_mb"] is not None]
    rss_node = [r["node_rss_peak_mb"] for r in rows if r["node_rss_peak_mb"] is not None]
    return [
        target("goodput at 2x-10x capacity, worst step, % of peak goodput", held, ">=", 90.0, "%"),
        target("no_healthy_region answers while every node is alive (all steps)",
               sum(r["no_healthy_region"] for r in rows), "==", 0),
        target("5xx other than quick 503 sheds (all steps)", sum(r["other_5xx"] for r in rows), "==", 0),
        target("P95 of served requests, worst step", max(p95s) if p95s else None, "<", P95_LIMIT_MS, "ms"),
        target("shed answered (client-side, send to answer), worst step's p95", max(sheds) if sheds else None, "<",
               SHED_LIMIT_MS, "ms"),
        target("shed refused on arrival (queue_full, queue_stalled) answered, worst step's p95",
               max(quick) if quick else None, "<", SHED_LIMIT_MS, "ms"),
        target("router peak RSS, worst step", max(rss_router) if rss_router else None, "<", RSS_LIMIT_MB, "MB"),
        target("node peak RSS, worst step", max(rss_node) if rss_node else None, "<", RSS_LIMIT_MB, "MB"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short steps at small loads (a smoke test, ~1 min)")
    parser.add_argument("--step-s", type=float, default=None, help="seconds per step (default 20; quick 5)")
    parser.add_argument("--capacity-users", type=int, default=None,
                        help="closed-loop users of the capacity step (default 3000; quick 300)")
    parser.add_argument("--capacity-rps", type=float, default=None, help="skip the capacity step: use this")
    parser.add_argument("--multiples", default=",".join(map(str, MULTIPLES)),
                        help="open-loop steps as multiples of the capacity ('' for none)")
    parser.add_argument("--users", default="", help="comma-separated closed-loop user counts (default 1000 ... 5000; "
                        "'none' for no closed-loop step)")
    parser.add_argument("--pin", action="store_true",
                        help=f"the router and the nodes on cpu {SYSTEM_CPU}, the load generator on cpu {LOAD_CPU} "
                        "(results overload-pinned.json): the generator no longer takes the system's cpu")
    args = parser.parse_args()
    if args.pin and len(psutil.Process().cpu_affinity()) < 2:
        parser.error("--pin needs 2 cpus")
    install_signal_handlers()
    started = time.time()
    step_s = args.step_s or (5.0 if args.quick else 20.0)
    if step_s < TAIL_S + 1:
        parser.error(f"--step-s must be >= {TAIL_S + 1:g} (the last {TAIL_S:g} s of a step are not measured), "
                     f"got {step_s:g}")
    try:
        users = [int(x) for x in args.users.split(",") if x.strip()] if args.users.strip() != "none" else []
        if not users and args.users.strip() != "none":
            users = list(QUICK_USERS if args.quick else FULL_USERS)
        multiples = [float(x) for x in args.multiples.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--users / --multiples must be comma-separated numbers, got {args.users!r} / {args.multiples!r}")
    load_before = os.getloadavg()
    folder = workdir("overload")
    rows: list[dict[str, Any]] = []

    def step(kind: str, amount: float, label: str) -> dict[str, Any]:
        print(f"step {label}: {kind} loop, {amount:g} {'req/s' if kind == 'open' else 'users'}, {step_s:g} s ...",
              flush=True)
        with contextlib.ExitStack() as stack:
            if args.pin:
                pinner = stack.enter_context(Pinner())
            row = run_step(folder, kind, amount, step_s, label)
            row["pinned_processes"] = len(pinner.pinned) if args.pin else None
        print(f"  offered {row['offered_rps']} req/s, goodput {row['goodput_rps']}, shed {row['shed_rps']}, "
              f"errors {row['errors_by_status']}, P95 {row['served_p95_ms']} ms, shed answered "
              f"{row['shed_answer_ms']} ms (on arrival / after a wait: "
              f"{ {k: (v['count'], v['p95']) for k, v in row['shed_answer_by_wait_ms'].items()} }), "
              f"cuts {row['adaptive_cuts']}, router limit min {row['router_limit_min']}, "
              f"no_healthy {row['no_healthy_region']}, cut off {row['cut_off_at_end']}, "
              f"RSS router {row['router_rss_peak_mb']} MB / node {row['node_rss_peak_mb']} MB, {row['verdict']}",
              flush=True)
        for t in row["timeouts_traced"]:
            print(f"  504 {t['request_id']} on {t['node']}: its skill call ran "
                  f"{'(nothing logged)' if t['skill_s'] is None else str(t['skill_s']) + ' s'} "
                  f"(drawn {t['skill_drawn_ms']} ms); "
                  f"{row['skill_tail_expected']} calls expected past the timeout from the skill's tail", flush=True)
        g = row["generator"]
        print(f"  generator: asked {row['asked_in_window']}, sent {row['sent_in_window']} in the window, late "
              f"{g['late']} ({g['late_pct']} %), dropped {g['dropped_at_inflight_cap']}, lag {g['lag_ms']}, "
              f"processes {g['processes']}; CPU/RSS {row['cpu_rss_by_process']}", flush=True)
        rows.append(row)
        return row

    capacity = args.capacity_rps
    cap_users = None
    if capacity is None:
        cap_users = args.capacity_users or (300 if args.quick else 3000)
        capacity = step("closed", cap_users, f"capacity ({cap_users} users)")["goodput_rps"]
    if not capacity or capacity <= 0:
        print("capacity step served nothing: no open-loop steps")
    else:
        for m in multiples:
            step("open", round(capacity * m), f"open {m:g}x")["multiple"] = m
    for u in users:
        if u != cap_users:  # the capacity step already measured that many users
            step("closed", u, f"closed {u} users")
    print()
    print(table([[r["step"], r["offered_rps"], r["sent_in_window"], r["goodput_rps"], r["shed_rps"], r["errors_rps"],
                  r["errors_by_status"] or "-", r["served_p95_ms"], (r["generator"]["lag_ms"] or {}).get("p99"),
                  r["generator"]["late_pct"], r["no_healthy_region"], r["router_rss_peak_mb"],
                  r["node_rss_peak_mb"], (r["cpu_rss_by_process"].get("router") or {}).get("cpu_pct_mean"),
                  r["verdict"],
                  "yes" if r["other_errors_within_budget"] else "NO"]
                 for r in rows],
                ["step", "offered/s", "sent", "goodput/s", "shed/s", "errors/s", "errors by status", "P95 ms",
                 "gen lag p99 ms", "late %", "no_healthy", "router MB", "node MB", "router CPU %", "verdict",
                 "other errors in budget"]))
    if any(r["verdict_note"] for r in rows):
        print(f"verdict FAILED where sheds passed the budget: {VERDICT_NOTE}.")
    fig = figure(rows, args.pin)
    name = "overload-pinned" if args.pin else "overload"
    png = write_png(fig, name, args.quick, width=1100, height=650)
    tgts = targets_for(rows)
    for t in tgts:
        print(f"  target {t['name']}: {t['measured']} ({t['target']}) -> "
              f"{'met' if t['met'] else 'MISSED' if t['met'] is False else 'not measured'}")
    figures = {"capacity_rps": capacity, "peak_goodput_rps": max((r["goodput_rps"] for r in rows), default=None),
               "steps": rows, "png": png}
    params = {"step_s": step_s, "multiples": multiples, "users": users, "regions": 3, "nodes_per_region": 1,
              "route": "invoke", "tenants": 30, "limit": "rate 1e9, burst 1e9 (nothing refused)",
              "skill": {"median_ms": SKILL_MEDIAN_MS, "p99_ms": SKILL_P99_MS, "cpu_us": SKILL_CPU_US},
              "generator_processes": f"2 past {TWO_PROCESSES_RPS:g} req/s or {TWO_PROCESSES_USERS} users, else 1",
              "generator_client": CLIENT, "fault_proxies": PROXIES_NOTE,
              "pinning": (f"router and nodes on cpu {SYSTEM_CPU}; the drill and the load generator on cpu {LOAD_CPU}"
                          if args.pin else "none: every process on both cpus"),
              "load_average_before": [round(x, 2) for x in load_before],
              "closed_loop_users": "no think time; honour Retry-After after a shed (load.honor_retry_after), "
                                   "at most 5 s",
              "verdict": "the drill's default: sheds count against the 0.1 % error budget (see verdict_note)",
              "definitions": "workbench.check.overload (served = 2xx, shed = 503 router_overloaded/overloaded)"}
    path = write_results(name, figures, quick=args.quick, started=started, targets=tgts,
                         extra={"parameters": params, "charts": {"overload": fig_json(fig)}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
