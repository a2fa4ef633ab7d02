"""Figures of merit that span runs or need the design's predictions: partition bound, sweeps, capacity.

The notebooks call these so that they stay thin: every number they show or assert on comes from
here, the checker's summary or the recording; the figures come from plotly builders below.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from workbench.history import Recording
from workbench.spec.scenario import Scenario

__all__ = [
    "CAPACITY_REFERENCE",
    "capacity_figure",
    "capacity_row",
    "envelope_figures",
    "envelope_verdict",
    "find_capacity",
    "gossip_bytes",
    "partition_findings",
    "phase_rates",
    "recommend",
    "strict_messages",
    "sweep",
    "sweep_heatmap",
]

# The reference benchmark's figures (the case study this product is measured against).
CAPACITY_REFERENCE = {"max_users": 40, "throughput_rps": 12.0, "cpu_headroom_pct": 35.0, "memory_gb": 1.2}


def partition_findings(scenario: Scenario, summary: Mapping[str, Any], margin: float = 1.0) -> dict[str, Any]:
    """Measured over-admission of a split against the bound the scenario's mode promises.

    Eventual mode: each of k sides enforces alone, so a key may get up to (k-1)·R·split_s tokens
    more than B + R·t, plus the staleness every run has (2 gossip intervals of rate).  Strict mode
    promises the plain envelope: bound and staleness are 0 and ``margin`` does not apply.  Keys: the
    limit is per key, so the bound is per key; ``measured_excess_tokens`` is the checker's worst
    window excess.  ``within_bound``: measured <= margin · bound + staleness.
    """
    split = next((f for f in scenario.faults if f.action == "partition"), None)
    if split is None:
        raise ValueError("the scenario has no partition")
    heal = next((f.at_s for f in scenario.faults if f.action == "heal" and f.at_s >= split.at_s), None)
    end = heal if heal is not None else (split.at_s + split.duration_s if split.duration_s else scenario.duration_s)
    split_s = max(0.0, end - split.at_s)
    groups = list(split.groups)
    grouped = {m for g in groups for m in g}
    sides = len(groups) + (1 if set(scenario.topology.regions) - grouped else 0)
    limit = scenario.limits[0]
    strict = scenario.mode == "strict"
    staleness = 0.0 if strict else 2 * scenario.topology.gossip_interval_ms / 1000 * limit.rate
    bound = 0.0 if strict else (sides - 1) * limit.rate * split_s
    measured = summary.get("worst_window_excess_tokens")
    return {"mode": scenario.mode, "promise": "B + R·t" if strict else "B + R·t + (k-1)·R·split",
            "sides": sides, "split_s": split_s, "rate": limit.rate, "burst": limit.burst,
            "bound_tokens": round(bound, 3), "staleness_tokens": round(staleness, 3),
            "measured_excess_tokens": measured,
            "measured_vs_bound": None if measured is None or bound <= 0 else round(max(0.0, measured) / bound, 3),
            "within_bound": measured is not None and measured <= margin * bound + staleness + 1e-6,
            "over_admission_pct": summary.get("over_admission_pct"),
            "convergence_ms": summary.get("convergence_ms"), "token_loss": summary.get("token_loss")}


def envelope_figures(result: Any) -> dict[str, Any]:
    """What the checker judged a run's admissions against: its mode, the staleness it allowed (strict
    mode: none, the plain envelope B + R·t), the worst window excess and whether the envelope held."""
    s = result.summary
    return {"mode": result.scenario.mode, "rate": result.scenario.limits[0].rate,
            "envelope_slack_s": s.get("envelope_slack_s"), "excess_tokens": s.get("worst_window_excess_tokens"),
            "envelope_ok": bool((s.get("checks") or {}).get("envelope"))}


def envelope_verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    """A notebook's verdict phrase from :func:`envelope_figures` rows (one run, or every run of a sweep):
    the mode, the envelope judged against, the worst window excess over it and whether it held.

    Strict mode is judged against B + R·t itself; eventual mode against B + R·t plus R times the
    staleness it allows (two gossip intervals and one delivery: ``checker.default_slack_s``), so a pass
    always says which promise it kept.
    """
    if not rows:
        return "no run to judge"
    modes = sorted({r["mode"] for r in rows})
    allowance = sorted({round(r["rate"] * (r.get("envelope_slack_s") or 0.0), 1) for r in rows})
    if modes == ["strict"]:
        against = "the plain envelope B + R·t (no allowance)"
    else:
        span = f"{allowance[0]:g}" if len(allowance) == 1 else f"{allowance[0]:g}-{allowance[-1]:g}"
        against = f"B + R·t + R x gossip staleness ({span} tokens)"
    excess = [r["excess_tokens"] for r in rows if r.get("excess_tokens") is not None]
    broken = sum(1 for r in rows if not r["envelope_ok"])
    return (f"{'/'.join(modes)} mode, judged against {against}: worst window excess "
            + ("-" if not excess else f"{max(excess):+.1f} tokens")
            + (", envelope held" if not broken else f", envelope BROKEN in {broken} of {len(rows)} runs"))


def phase_rates(rec: Recording) -> list[dict[str, Any]]:
    """Admitted requests per second by answering region between consecutive faults (capacity failover)."""
    edges = sorted({0.0, *(f.t_s for f in rec.faults), float(rec.ended_s or 0.0)})
    if rec.requests:
        edges = sorted({*edges, max(r.end_s for r in rec.requests)})
    rows = []
    for start, end in itertools.pairwise(edges):
        if end - start <= 0:
            continue
        done = [r for r in rec.requests if start <= r.end_s < end]
        row: dict[str, Any] = {"from_s": round(start, 2), "to_s": round(end, 2),
                               "after": next((f"{f.action} {f.target}".strip() for f in rec.faults
                                              if abs(f.t_s - start) < 1e-9), "start")}
        row["admitted_rps"] = round(sum(1 for r in done if r.admitted) / (end - start), 1)
        for region in sorted({r.answered_region for r in done if r.answered_region}):
            row[f"{region} admitted/s"] = round(sum(1 for r in done if r.admitted and r.answered_region == region)
                                                / (end - start), 1)
        row["errors"] = sum(1 for r in done if not (200 <= r.status < 300 or r.status == 429))
        rows.append(row)
    return rows


def gossip_bytes(rec: Recording, direction: str = "sent") -> float:
    """Gossip body bytes over the run: the last ``edge_gossip_bytes_total`` of every node, summed.

    Nodes that were killed before the final scrape are missing, so this is a lower bound then.
    """
    return _last_totals(rec, "edge_gossip_bytes_total", direction)


def strict_messages(rec: Recording, direction: str = "sent") -> float:
    """Strict mode's signed messages (leases, grants, rights, transfers) over the run, every outcome: the
    last ``edge_strict_messages_total`` of every node, summed.  Strict nodes send no delta gossip and do
    not count their messages' bytes, so a strict sweep compares its replication traffic by this count."""
    return _last_totals(rec, "edge_strict_messages_total", direction)


def _last_totals(rec: Recording, name: str, direction: str) -> float:
    """The last sample of counter ``name`` per node and label set with this ``direction``, summed."""
    last: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, float]] = {}
    for m in rec.metrics:
        if m.name == name and m.labels.get("direction") == direction:
            key = (m.node, tuple(sorted(m.labels.items())))
            if key not in last or m.t_s >= last[key][0]:
                last[key] = (m.t_s, m.value)
    return sum(v for _t, v in last.values())


def _row(params: Mapping[str, Any], result: Any) -> dict[str, Any]:
    s, rec = result.summary, result.recording
    span = max(1e-9, rec.ended_s or result.scenario.duration_s)
    return {**params, **envelope_figures(result), "over_admission_pct": s.get("over_admission_pct"),
            "excess_tokens": s.get("worst_window_excess_tokens"),
            "p50_ms": (s.get("latency_ms") or {}).get("p50"), "p99_ms": (s.get("latency_ms") or {}).get("p99"),
            "gossip_bytes": gossip_bytes(rec), "gossip_bytes_per_s": round(gossip_bytes(rec) / span, 1),
            "strict_messages": strict_messages(rec), "strict_messages_per_s": round(strict_messages(rec) / span, 1),
            "throughput_rps": s.get("throughput_rps"), "token_loss": s.get("token_loss"),
            "invariants_ok": s.get("invariants_ok"), "complete": rec.complete, "results": str(result.results_dir)}


async def sweep(base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], *,
                results_dir: str | os.PathLike[str] | None = None, **thresholds: Any) -> list[dict[str, Any]]:
    """Run ``Scenario.build(**base, **combination)`` for every combination of ``grid``; one row each.

    Each run shows a compact dashboard (progress, Stop) and leaves its summary; rows hold the swept
    values, over-admission, latency, gossip bytes (from the nodes' metrics) and the verdict.
    """
    from workbench.ui.widgets import run_with_dashboard

    names = list(grid)
    rows = []
    for values in itertools.product(*(grid[n] for n in names)):
        params = dict(zip(names, values, strict=True))
        label = "-".join(f"{k}{v:g}" if isinstance(v, int | float) else f"{k}{v}" for k, v in params.items())
        scenario = Scenario.build(**{**base, **params, "name": f"{base.get('name', 'sweep')}-{label}"})
        result = await run_with_dashboard(scenario, None if results_dir is None else f"{results_dir}/{label}",
                                          charts=False, title=label, **thresholds)
        rows.append(_row(params, result))
    return rows


def recommend(rows: Sequence[Mapping[str, Any]], error_budget_pct: float, *,
              max_p99_ms: float | None = None) -> dict[str, Any] | None:
    """The cheapest setting (least gossip bytes/s; strict mode: least strict messages/s) whose
    over-admission fits the error budget.

    Ties go to the lower p99.  ``None`` when no row fits (the budget is too tight for the grid).
    """
    fits = [r for r in rows if r.get("over_admission_pct") is not None and r["over_admission_pct"] <= error_budget_pct
            and r.get("token_loss", 0) == 0 and r.get("complete", True)
            and (max_p99_ms is None or (r.get("p99_ms") is not None and r["p99_ms"] <= max_p99_ms))]
    if not fits:
        return None
    return dict(min(fits, key=lambda r: (r["gossip_bytes_per_s"], r.get("strict_messages_per_s") or 0.0,
                                         r.get("p99_ms") or 0.0)))


def sweep_heatmap(rows: Sequence[Mapping[str, Any]], x: str, y: str, z: str, title: str = "") -> go.Figure:
    """A heatmap of ``z`` over the grid ``x`` by ``y`` (mean over any other swept dimension)."""
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows})
    grid: list[list[float | None]] = []
    for yv in ys:
        line = []
        for xv in xs:
            vals = [r[z] for r in rows if r[x] == xv and r[y] == yv and r.get(z) is not None]
            line.append(sum(vals) / len(vals) if vals else None)
        grid.append(line)
    fig = go.Figure(go.Heatmap(x=[str(v) for v in xs], y=[str(v) for v in ys], z=grid, colorscale="Viridis",
                               texttemplate="%{z:.2f}", colorbar={"title": z}))
    fig.update_layout(title=title or f"{z} by {x} and {y}", xaxis_title=x, yaxis_title=y, height=320,
                      template="plotly_white", margin={"l": 60, "r": 20, "t": 40, "b": 40})
    return fig


# ----------------------------------------------------------------------------- capacity
def capacity_row(users: int, result: Any, p95_target_ms: float) -> dict[str, Any]:
    """One step of the capacity search: latency, throughput, CPU headroom and memory of the processes."""
    s, rec = result.summary, result.recording
    by_time: dict[float, float] = {}
    peak_rss: dict[str, float] = {}
    for p in rec.processes:
        by_time[p.t_s] = by_time.get(p.t_s, 0.0) + p.cpu_pct
        peak_rss[p.name] = max(peak_rss.get(p.name, 0.0), p.rss_mb)
    busy = sorted(by_time.values())[1:]  # the first psutil sample of a process reads 0 %
    cores = os.cpu_count() or 1
    mean_cpu = sum(busy) / len(busy) if busy else 0.0
    p95 = (s.get("latency_ms") or {}).get("p95")
    return {"users": users, **envelope_figures(result), "p95_ms": p95,
            "p99_ms": (s.get("latency_ms") or {}).get("p99"),
            "throughput_rps": s.get("throughput_rps"), "client_errors": s.get("client_errors"),
            "cpu_pct_of_machine": round(mean_cpu / cores, 1),
            "cpu_headroom_pct": round(max(0.0, 100.0 - mean_cpu / cores), 1),
            "memory_gb": round(sum(peak_rss.values()) / 1024, 3),
            "meets_target": p95 is not None and p95 < p95_target_ms and s.get("client_errors", 0) == 0,
            "complete": rec.complete, "results": str(result.results_dir)}


async def find_capacity(base: Mapping[str, Any], user_steps: Sequence[int], p95_target_ms: float, *,
                        stop_after_miss: bool = True) -> dict[str, Any]:
    """Step closed-loop users up; the largest step whose P95 stays under the target is the capacity."""
    from workbench.ui.widgets import run_with_dashboard

    rows = []
    for users in user_steps:
        scenario = Scenario.build(**{**base, "users": int(users), "load_mode": "closed",
                                     "name": f"{base.get('name', 'capacity')}-u{users}"})
        result = await run_with_dashboard(scenario, charts=False, title=f"{users} users")
        rows.append(capacity_row(int(users), result, p95_target_ms))
        if stop_after_miss and not rows[-1]["meets_target"]:
            break
    passing = [r for r in rows if r["meets_target"]]
    best = max(passing, key=lambda r: r["users"]) if passing else None
    return {"steps": rows, "best": best, "p95_target_ms": p95_target_ms,
            "max_users": best["users"] if best else 0,
            "saturated": bool(rows) and not rows[-1]["meets_target"]}


def capacity_figure(steps: Sequence[Mapping[str, Any]], p95_target_ms: float) -> go.Figure:
    """P95 latency and throughput per step of users, with the latency target."""
    fig = go.Figure()
    users = [r["users"] for r in steps]
    fig.add_scatter(x=users, y=[r["p95_ms"] for r in steps], name="p95 latency (ms)", mode="lines+markers")
    fig.add_scatter(x=users, y=[r["throughput_rps"] for r in steps], name="throughput (req/s)",
                    mode="lines+markers", yaxis="y2")
    fig.add_hline(y=p95_target_ms, line_dash="dash", line_color="#dc2626", annotation_text="P95 target")
    fig.update_layout(title="Closed-loop users: P95 latency and throughput", xaxis_title="concurrent users",
                      yaxis_title="p95 (ms)", yaxis2={"overlaying": "y", "side": "right", "title": "req/s"},
                      height=320, template="plotly_white", legend={"orientation": "h", "y": -0.25},
                      margin={"l": 60, "r": 60, "t": 40, "b": 40})
    return fig
