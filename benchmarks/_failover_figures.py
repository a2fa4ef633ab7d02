"""The failover benchmark's figures: pure functions over one drill's recording (and the router's counters).

Split from ``bench_failover.py``, which runs the drills; these read what a drill recorded -- failover per
client by the checker's definition, its split into the client's own wait and the system's part, errors by
kind, the commit protocol's counts, admitted tokens per bin around the kill -- and pool them over drills.
Nothing here starts a process or reads a clock.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from workbench.check import checker
from workbench.history import Recording, RequestRecord
from workbench.run.drill import ROUTER_SOURCE, DrillResult

TARGET_CAPACITY_PCT = 95.0
BIN_S = 0.1  # capacity bins
CAPACITY_WINDOW_S = 1.0  # the target's window after the kill
BINS_AFTER = 20  # 2 s of bins after the kill in the table
FIGURE_BEFORE_S, FIGURE_AFTER_S = 1.5, 3.0  # the figure's span around the kill


@dataclass
class RouterCounters:
    """The router's own view, scraped during the drill (the drill does not scrape the router)."""

    retries: float | None = None  # router_retries_total, summed over labels
    failed_by_code: dict[str, float] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)  # /v1/router/state "counters"
    scrapes: int = 0


def fault_time(rec: Recording, action: str) -> float:
    """Run-clock time the nemesis applied ``action`` (after the signal was sent)."""
    return next(f.t_s for f in rec.faults if f.action == action)


def _error_class(r: RequestRecord) -> str:
    """Which kind of client-visible error a failed request is (see the module docstring)."""
    if r.status == 502 and r.error == "upstream_unreachable":
        return "retried_failed"  # the router's retry (or its missing alternative) failed too
    if r.status in (502, 504) and r.error in ("upstream_broken", "upstream_timeout"):
        return "inflight_not_retried"
    if r.status == 0 and r.error.startswith("timeout"):
        return "inflight_not_retried"  # stuck on a node that stopped answering, until our timeout
    if r.status == 0 and r.error.startswith("cancelled"):
        return "unfinished_at_end"  # still waiting when the drill's drain ended
    if r.status == 503 and r.error == "no_healthy_region":
        return "no_healthy_region"
    return "other"


def client_breakdown(rec: Recording, outage: Mapping[str, Any]) -> dict[str, list[float]]:
    """Each affected client's failover split in two: its own wait from the fault to its first request
    sent after it (``wait_ms``: the load's shape, not the router), and the rest (``after_send_ms``:
    that request's way through the router, retries, and any further request until the first success).
    Also how many answers it got in between from the router's shedding memory (``router_sheds``)."""
    t0 = outage["death_s"]
    regions = set(outage["regions"])
    clients = outage["clients_ms"]
    wait, after, sheds = [], [], []
    for r_key, ms_value in clients.items():
        home, _, key = r_key.rpartition("/")
        mine = [r for r in rec.requests if r.key == key and (r.home_region == home if home else
                                                             r.home_region in regions)]
        stop = t0 + ms_value / 1000
        sent = [max(r.intended_s, t0) for r in mine if r.end_s >= t0 and r.intended_s <= stop]  # in flight: 0
        first = min(sent) if sent else stop
        wait.append(round((first - t0) * 1000, 3))
        after.append(round((stop - first) * 1000, 3))
        sheds.append(sum(1 for r in mine if t0 <= r.end_s < stop and r.error == "shed_by_router"))
    return {"wait_ms": wait, "after_send_ms": after, "router_sheds": sheds}


def _final(rec: Recording, name: str) -> list[tuple[str, dict[str, str], float]]:
    """``(source, labels, value)`` of metric ``name`` in each source's last scrape (the drill's final,
    full one for the processes still running at the end)."""
    last: dict[str, float] = {}
    for m in rec.metrics:
        if m.name == name:
            last[m.node] = max(last.get(m.node, m.t_s), m.t_s)
    return [(m.node, m.labels, m.value) for m in rec.metrics if m.name == name and m.t_s == last[m.node]]


def commit_figures(rec: Recording) -> dict[str, Any]:
    """What the invoke route's commit protocol saw in one drill: the router's header times (bucket
    counts of ``router_invoke_continue_seconds``, all regions), and per node what it dropped or ran for
    a caller that was gone."""
    buckets: Counter[str] = Counter()
    for source, labels, value in _final(rec, "router_invoke_continue_seconds_bucket"):
        if source == ROUTER_SOURCE:
            buckets[labels["le"]] += value
    dropped: dict[str, dict[str, float]] = {}
    for source, labels, value in _final(rec, "edge_invoke_dropped_total"):
        if value:
            dropped.setdefault(source, {})[labels.get("stage", "")] = value
    gone = {source: value for source, _labels, value in _final(rec, "edge_skill_calls_client_gone_total") if value}
    return {"continue_buckets": dict(buckets), "dropped": dropped, "skill_calls_client_gone": gone}


def bucket_quantiles(cumulative: Mapping[str, float]) -> dict[str, Any]:
    """p50 / p99 / max of a Prometheus histogram as the upper bounds of the buckets they fall in (ms);
    past the last finite bucket, the string ``"> <last bound>"`` (JSON has no infinity)."""
    bounds = sorted(((float(le), n) for le, n in cumulative.items()), key=lambda x: x[0])
    total = bounds[-1][1] if bounds else 0
    last = max((b for b, _n in bounds if math.isfinite(b)), default=0.0)

    def upper(q: float) -> float | str | None:
        bound = next((b for b, n in bounds if n >= q * total), None) if total else None
        if bound is None:
            return None
        return round(bound * 1000, 3) if math.isfinite(bound) else f"> {last * 1000:g}"

    return {"tries": total, "p50_le_ms": upper(0.5), "p99_le_ms": upper(0.99), "max_le_ms": upper(1.0)}


def failover_figures(result: DrillResult, counters: RouterCounters, action: str) -> dict[str, Any]:
    """Failover time per client of the failed region, and the client-visible errors split by kind."""
    rec = result.recording
    action = action.removesuffix("-dense")
    fo = checker.failover_times(rec, actions=(action,))
    errors = [r for r in rec.requests if not (200 <= r.status < 300 or r.status == 429)]
    kinds = Counter(_error_class(r) for r in errors)
    retried = counters.retries
    retried_failed = kinds.get("retried_failed", 0)
    t_fault = fault_time(rec, action)
    gen = rec.extra.get("generator", {})
    loss = checker.check_token_loss(rec)
    after = [r for r in rec.requests if r.intended_s >= t_fault]
    after_errors = [r for r in after if not (200 <= r.status < 300 or r.status == 429)]
    inflight = [r for r in rec.requests if r.intended_s < t_fault <= r.end_s]
    stall_ms = sorted((r.end_s - t_fault) * 1000 for r in inflight)
    outage = next((o for o in fo["outages"]), {})
    split = client_breakdown(rec, outage) if outage else {"wait_ms": [], "after_send_ms": [], "router_sheds": []}
    # Requests the router had written to the victim when it failed (502 upstream_broken: not retried,
    # the node may have acted) or that waited on a silent victim until the client's timeout.
    written = [r for r in after_errors if (r.status == 502 and r.error == "upstream_broken")
               or (r.status == 0 and r.error.startswith("timeout"))]
    # The first sign of the victim's death the router passed on: a retry away from it or a broken try.
    victim = {n for o in fo["outages"] for n in o["nodes"]}
    signs = [r.end_s for r in rec.requests if r.end_s >= t_fault and (r.retried_from in victim or (
        r.status == 502 and r.error == "upstream_broken"))]
    return {
        "route": result.scenario.load.route,
        "seed": result.scenario.seed,
        "fault_at_s": round(t_fault, 4),
        "clients_ms": [v for o in fo["outages"] for v in o["clients_ms"].values()],
        "client_wait_ms": split["wait_ms"],
        "client_after_send_ms": split["after_send_ms"],
        "client_router_sheds": split["router_sheds"],
        "clients_with_router_sheds": sum(1 for n in split["router_sheds"] if n),
        "first_victim_failure_seen_ms": round((min(signs) - t_fault) * 1000, 3) if signs else None,
        "region_ms": [o["region_ms"] for o in fo["outages"]],
        "failover_ms": {"p50": fo["p50"], "p99": fo["p99"], "max": fo["max"]},
        "unserved_clients": fo["unserved_clients"],
        "checker_outage": {k: outage.get(k) for k in ("kind", "target", "death_s", "back_s", "clients",
                                                      "failed_requests", "timed_out_requests", "stalled_requests",
                                                      "region_ms", "p50_ms", "p99_ms", "max_ms")},
        "sent_after_fault": len(after),
        "errors_sent_after_fault": len(after_errors),
        "errors_sent_after_fault_written_to_victim": len(written),
        "errors_sent_after_fault_by_code": dict(Counter(f"{r.status} {r.error}"[:60]
                                                        for r in after_errors).most_common(5)),
        "inflight_at_fault": len(inflight),
        "inflight_errors": sum(1 for r in inflight if not (200 <= r.status < 300 or r.status == 429)),
        "inflight_stall_ms": {"p50": checker.percentile(stall_ms, 50), "max": stall_ms[-1] if stall_ms else None},
        "requests": len(rec.requests),
        "client_errors": len(errors),
        "errors_by_kind": dict(kinds),
        "errors_by_code": dict(Counter(f"{r.status} {r.error}"[:60] for r in errors).most_common(8)),
        "errors_first_after_fault_ms": (round((min(r.intended_s for r in errors) - t_fault) * 1000, 1)
                                        if errors else None),
        "router_retries": retried,
        "retried_ok": None if retried is None else retried - retried_failed,
        "retried_failed": retried_failed,
        "inflight_not_retried": kinds.get("inflight_not_retried", 0),
        "router_counters": counters.counters,
        "router_scrapes": counters.scrapes,
        "orphaned_grants_at_fault": loss.figures.get("orphaned_at_kill"),
        "double_grants": loss.figures.get("double_grants"),
        "double_grants_after_retry": loss.figures.get("double_grants_after_retry"),
        "token_loss": loss.figures.get("token_loss"),
        "unanswered_grants": loss.figures.get("unanswered_grants"),
        "invoke_commit": commit_figures(rec),
        "generator": {"valid": gen.get("valid"), "lag_p99_ms": (gen.get("lag_ms") or {}).get("p99"),
                      "sent": gen.get("sent")},
        "invariants_ok": result.summary.get("invariants_ok"),
        "reasons": result.summary.get("reasons", [])[:3],
    }


def capacity_bins(rec: Recording, killed_region: str, rate: float, *, bin_s: float = BIN_S,
                  before_s: float = FIGURE_BEFORE_S, after_s: float = FIGURE_AFTER_S) -> dict[str, Any]:
    """Admitted tokens per bin around the kill, from the audit trails' grant times.

    ``rate`` is the global R (tokens/s over every tenant). Bin i covers [kill + i*bin, kill + (i+1)*bin).
    The survivors' share is every grant made outside the killed region; the first-second figure is
    the survivors' tokens in [kill, kill + 1 s) over R * 1 s.
    """
    kill = fault_time(rec, "kill")
    lo, hi = -round(before_s / bin_s), round(after_s / bin_s)
    total = [0.0] * (hi - lo)
    survivors = [0.0] * (hi - lo)
    first_second = 0.0
    for ev in rec.audit:
        t = rec.wall_to_run(ev.ts) - kill
        i = math.floor(t / bin_s)
        if lo <= i < hi:
            total[i - lo] += ev.cost
            if ev.region != killed_region:
                survivors[i - lo] += ev.cost
        if 0 <= t < CAPACITY_WINDOW_S and ev.region != killed_region:
            first_second += ev.cost
    per_bin = rate * bin_s
    surv_pct = [round(x / per_bin * 100, 1) for x in survivors]
    after = surv_pct[-lo:]
    reached = next((i for i, p in enumerate(after) if p >= TARGET_CAPACITY_PCT), None)
    # single 100 ms bins swing by +-15 % (a few tokens of 30); a 300 ms rolling mean says when it holds
    rolling = [sum(after[i:i + 3]) / 3 for i in range(BINS_AFTER - 2)]
    held = next((i for i in range(len(rolling)) if all(p >= TARGET_CAPACITY_PCT for p in rolling[i:])), None)
    before = total[:-lo]
    before_surv = survivors[:-lo]
    return {
        "kill_at_s": round(kill, 4),
        "bin_ms": bin_s * 1000,
        "bin_start_ms": [round(i * bin_s * 1000) for i in range(lo, hi)],
        "all_tokens": total,
        "survivor_tokens": survivors,
        "survivor_pct_of_R": surv_pct,
        "before_kill_all_pct_of_R": round(sum(before) / (rate * bin_s * len(before)) * 100, 1) if before else None,
        "before_kill_survivors_pct_of_R": (round(sum(before_surv) / (rate * bin_s * len(before)) * 100, 1)
                                           if before else None),
        "first_second_pct_of_R": round(first_second / (rate * CAPACITY_WINDOW_S) * 100, 1),
        "first_bin_at_95_ms": None if reached is None else round(reached * bin_s * 1000),
        "rolling_300ms_at_95_from_ms": None if held is None else round(held * bin_s * 1000),
    }


def pooled(values: Iterable[float]) -> dict[str, float | int | None]:
    """Nearest-rank p50 / p99 / max over all samples (the checker's definition)."""
    xs = sorted(values)
    return {"p50": checker.percentile(xs, 50), "p99": checker.percentile(xs, 99),
            "max": xs[-1] if xs else None, "clients": len(xs)}


def _sum(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) if vals else None


def p99_client(rows: Sequence[Mapping[str, Any]], route: str) -> dict[str, Any]:
    """The client at the nearest-rank p99 of one route's failover times, with its own split: its wait
    for its next request after the fault (the load's shape) and the rest (the system's part: the
    router, its retries and the survivors), and which of the two dominates.  The p99 of each part
    alone may come from other clients; this one is the p99 figure itself, taken apart."""
    trios = sorted((total, wait, after, sheds) for r in rows if r["route"] == route
                   for total, wait, after, sheds in zip(r["clients_ms"], r["client_wait_ms"], r["client_after_send_ms"],
                                                        r.get("client_router_sheds") or [0] * len(r["clients_ms"]),
                                                        strict=False))
    if not trios:
        return {"failover_ms": None, "own_wait_ms": None, "system_ms": None, "dominated_by": None}
    rank = max(1, math.ceil(0.99 * len(trios)))  # nearest rank, as checker.percentile
    total, wait, after, sheds = trios[rank - 1]
    share = sum(t[1] for t in trios) / sum(t[0] for t in trios) if sum(t[0] for t in trios) else None
    # A 429 from the router's shedding memory (the client's key was over its limit) has no node behind
    # it, so it is no success elsewhere by the definition; it is the limiter's answer, not failover work.
    dominated = "client wait" if wait > after else (
        f"system, with {sheds} 429 from the router's shedding memory (the key over its limit)" if sheds else "system")
    return {"failover_ms": total, "own_wait_ms": wait, "system_ms": after, "router_sheds_meanwhile": sheds,
            "dominated_by": dominated,
            "own_wait_share_of_all_clients_pct": None if share is None else round(100 * share, 1),
            "clients": len(trios)}


def standard_vs_dense(by_kind: Mapping[str, Any]) -> dict[str, Any]:
    """The check route's kill figures of the standard load and of dense clients side by side: the same
    definition (every affected client, from the fault to its first success elsewhere), and for each
    what its p99 is made of.  The standard load's clients send every ~100 ms, so a client's own wait
    for its next request is most of its failover; dense clients send every ~5 ms, so what is left is
    the system's share."""
    out: dict[str, Any] = {}
    for kind, label in (("kill", "standard"), ("kill-dense", "dense")):
        f = by_kind.get(kind)
        if not f or "check" not in f["by_route"]:
            continue
        out[label] = {"failover_ms": f["by_route"]["check"], "own_wait_ms": f["client_wait_by_route"]["check"],
                      "system_ms": f["client_after_send_by_route"]["check"],
                      "p99_client": f["p99_client_by_route"]["check"]}
    return out


def summarize_failover(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pool the clients of every drill of one kind; sum the error counts."""
    return {
        "drills": len(rows),
        "failover_ms": pooled(v for r in rows for v in r["clients_ms"]),
        "region_ms": pooled(v for r in rows for v in r["region_ms"] if v is not None),
        "by_route": {route: pooled(v for r in rows if r["route"] == route for v in r["clients_ms"])
                     for route in sorted({r["route"] for r in rows})},
        # the split of each client's failover (client_breakdown): its own wait, then the router's part
        "client_wait_by_route": {route: pooled(v for r in rows if r["route"] == route for v in r["client_wait_ms"])
                                 for route in sorted({r["route"] for r in rows})},
        "client_after_send_by_route": {route: pooled(v for r in rows if r["route"] == route
                                                     for v in r["client_after_send_ms"])
                                       for route in sorted({r["route"] for r in rows})},
        "p99_client_by_route": {route: p99_client(rows, route) for route in sorted({r["route"] for r in rows})},
        "clients_with_router_sheds": sum(r["clients_with_router_sheds"] for r in rows),
        "first_victim_failure_seen_ms": [r["first_victim_failure_seen_ms"] for r in rows],
        "unserved_clients": sum(r["unserved_clients"] for r in rows),
        "checker_failed_requests": sum(r["checker_outage"].get("failed_requests") or 0 for r in rows),
        "checker_stalled_requests": sum(r["checker_outage"].get("stalled_requests") or 0 for r in rows),
        "sent_after_fault": sum(r["sent_after_fault"] for r in rows),
        "errors_sent_after_fault": sum(r["errors_sent_after_fault"] for r in rows),
        "errors_sent_after_fault_written_to_victim": sum(r["errors_sent_after_fault_written_to_victim"] for r in rows),
        "inflight_at_fault": sum(r["inflight_at_fault"] for r in rows),
        "inflight_errors": sum(r["inflight_errors"] for r in rows),
        "inflight_stall_max_ms": max((r["inflight_stall_ms"]["max"] for r in rows
                                      if r["inflight_stall_ms"]["max"] is not None), default=None),
        "requests": sum(r["requests"] for r in rows),
        "client_errors": sum(r["client_errors"] for r in rows),
        "router_retries": _sum(rows, "router_retries"),
        "retried_ok": _sum(rows, "retried_ok"),
        "retried_failed": sum(r["retried_failed"] for r in rows),
        "inflight_not_retried": sum(r["inflight_not_retried"] for r in rows),
        "other_errors": sum(r["client_errors"] - r["retried_failed"] - r["inflight_not_retried"] for r in rows),
        "orphaned_grants_at_fault": _sum(rows, "orphaned_grants_at_fault"),
        "double_grants": _sum(rows, "double_grants"),
        "double_grants_after_retry": _sum(rows, "double_grants_after_retry"),
        # what the router itself saw of its hedged checks' losing tries (edge_server/hedge_watch.py)
        "router_double_grants": sum(r["router_counters"].get("double_grants", 0) for r in rows),
        "router_hedge_orphaned_grants": sum(r["router_counters"].get("hedge_orphaned_grants", 0) for r in rows),
        "router_hedges_deferred": sum(r["router_counters"].get("hedges_deferred", 0) for r in rows),
        "token_loss": _sum(rows, "token_loss"),
        "unanswered_grants": _sum(rows, "unanswered_grants"),
        "invoke_commit": {
            "continue_ms": bucket_quantiles(sum((Counter(r["invoke_commit"]["continue_buckets"]) for r in rows
                                                 if r["route"] == "invoke"), Counter())),
            "tries_cancelled_unsent": sum(r["router_counters"].get("invoke_tries_cancelled", 0) for r in rows),
            "dropped_by_stage": dict(sum((Counter(d) for r in rows for d in r["invoke_commit"]["dropped"].values()),
                                         Counter())),
            "skill_calls_client_gone": sum(v for r in rows
                                           for v in r["invoke_commit"]["skill_calls_client_gone"].values()),
        },
        "generator_valid_drills": sum(1 for r in rows if r["generator"]["valid"]),
    }


def summarize_capacity(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per bin the median and the minimum over drills; the first-second figure of every drill."""
    if not rows:
        return {}
    per_bin = list(zip(*(r["survivor_pct_of_R"] for r in rows), strict=True))
    first = [r["first_second_pct_of_R"] for r in rows]
    return {
        "drills": len(rows),
        "bin_start_ms": rows[0]["bin_start_ms"],
        "survivor_pct_of_R_median": [round(statistics.median(b), 1) for b in per_bin],
        "survivor_pct_of_R_min": [min(b) for b in per_bin],
        "first_second_pct_of_R": {"min": min(first), "median": round(statistics.median(first), 1),
                                  "per_drill": first},
        "first_bin_at_95_ms": [r["first_bin_at_95_ms"] for r in rows],
        "rolling_300ms_at_95_from_ms": [r["rolling_300ms_at_95_from_ms"] for r in rows],
        "before_kill_all_pct_of_R": [r["before_kill_all_pct_of_R"] for r in rows],
        "before_kill_survivors_pct_of_R": [r["before_kill_survivors_pct_of_R"] for r in rows],
    }


def capacity_figure(rows: Sequence[Mapping[str, Any]], rate: float) -> go.Figure:
    """Admitted tokens/s in 100 ms bins around the kill: survivors and all nodes, one line per drill."""
    fig = go.Figure()
    for i, r in enumerate(rows):
        x = [ms + r["bin_ms"] / 2 for ms in r["bin_start_ms"]]
        scale = 1000 / r["bin_ms"]
        fig.add_trace(go.Scatter(x=x, y=[t * scale for t in r["all_tokens"]], mode="lines", name=f"all nodes #{i + 1}",
                                 line={"dash": "dot", "width": 1}, legendgroup="all"))
        fig.add_trace(go.Scatter(x=x, y=[t * scale for t in r["survivor_tokens"]], mode="lines+markers",
                                 name=f"survivors #{i + 1} ({r['route']})", legendgroup="surv"))
    fig.add_hline(y=rate, line_dash="dash", annotation_text="R (global rate)")
    fig.add_hline(y=TARGET_CAPACITY_PCT / 100 * rate, line_dash="dot", annotation_text="95 % of R")
    fig.add_vline(x=0, line_color="red", annotation_text="kill")
    fig.update_layout(title="Admitted tokens/s around a region's death (100 ms bins, audit grant times)",
                      xaxis_title="ms after the kill", yaxis_title="admitted tokens/s", template="plotly_white")
    return fig
