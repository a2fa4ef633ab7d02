"""Strict vs eventual: safety against availability, swept over the lease and alpha, and drawn.

:func:`strict_sweep` runs the deterministic simulator (``workbench.run.simulate``: the real
``StrictTable`` and voters on virtual time) for every ``(lease_ms, alpha)`` of a grid on two drill
scenarios -- a partition and a region loss -- and on a few random fault schedules, and the same in
eventual mode once (eventual mode has neither setting).  Each point gets a row: the worst window
excess over ``B + R (t - s)`` (safety; strict promises <= 0), the share of R admitted during the cut
per side, the time the cut-off side takes to fall to its pinned share, the time to get R back after
the heal, and after the region loss the time to ``(1 - alpha w_lost) R`` and the share kept.  A
sweep of nine points takes seconds: a run is a pure function of its scenario, so a figure here is
the same on every machine.

The figures below draw rows and series computed by :mod:`workbench.check.availability`; they
compute nothing themselves.  :func:`modes_figure` is also the partition notebook's side-by-side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from edge_server.strict.settings import StrictSettings
from workbench.check.availability import (
    partition_sides,
    rate_share,
    region_rates,
    sides_cumulative,
    split_window,
    time_to_rate,
)
from workbench.run.sim.strict_node import strict_settings_for
from workbench.run.sim.world import run_world
from workbench.run.simulate import draw_schedule, judge, simulate
from workbench.spec.scenario import Scenario
from workbench.ui.charts import REGION_COLORS

__all__ = [
    "cost_figure",
    "loss_figure",
    "modes_figure",
    "point_settings",
    "safety_availability_figure",
    "save_study",
    "strict_sweep",
]

BIN_S = 0.1  # availability figures are binned on 100 ms of the run clock
WINDOW_S = 0.2  # a recovery is a 200 ms window at the goal rate (as benchmarks/bench_strict_core.py)
FENCE_WINDOW_S = 0.5  # the cut-off side's fall is judged over 500 ms (its pinned rate is a few tokens/s)
MODE_COLORS = {"eventual": "#dc2626", "strict": "#2563eb"}
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "cross", "star", "hexagon")


def point_settings(gossip_interval_ms: float, lease_ms: float, alpha: float) -> StrictSettings:
    """The simulator's strict settings with one sweep point's lease and alpha (``StrictSettingsError``
    naming ``strict.lease_ms`` or ``strict.alpha`` when out of range)."""
    return dataclasses.replace(strict_settings_for(gossip_interval_ms), lease_ms=float(lease_ms), alpha=float(alpha))


def _worst(res: Any) -> float:
    return round(max((k["worst_excess"] for k in res.keys.values()), default=0.0), 3)


def _minority(scenario: Scenario) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The smallest side of the partition (it has no quorum of voters) and the rest."""
    sides = partition_sides(scenario)
    small = min(sides, key=len)
    return small, tuple(r for r in scenario.topology.regions if r not in small)


def _partition_row(scenario: Scenario, res: Any, settings: StrictSettings | None) -> dict[str, Any]:
    window = split_window(scenario)
    if window is None:
        raise ValueError("the partition scenario has no partition")
    start, end = window
    rate = scenario.limits[0].rate
    series = region_rates(res.recording, scenario, BIN_S)
    small, rest = _minority(scenario)
    regions = scenario.topology.regions
    weight = len(small) / len(regions)
    pinned = 0.0 if settings is None else settings.alpha * weight
    settled = start + (settings.reclaim_s if settings else 0.0) + 2 * BIN_S
    ceiling = (pinned * rate + 1 / FENCE_WINDOW_S) * 1.5  # its pinned rate, plus one token per window
    fence = _time_to_fall(series, small, start, ceiling, end)
    return {"partition_excess_tokens": _worst(res),
            "cut_total_share": rate_share(series, regions, start, end, rate),
            "cut_majority_share": rate_share(series, rest, min(settled, end - BIN_S), end, rate),
            "cut_minority_share": rate_share(series, small, min(settled, end - BIN_S), end, rate),
            "minority_pinned_share": round(pinned, 4),
            "fence_s": fence,
            "heal_recover_s": time_to_rate(series, regions, end, 0.95 * rate, WINDOW_S)}


def _time_to_fall(series: Mapping[str, Any], regions: Sequence[str], since: float, ceiling: float,
                  until: float) -> float | None:
    """Seconds after ``since`` until the rate over :data:`FENCE_WINDOW_S` first stays under ``ceiling``
    (measured at the window's end), looking no later than ``until``."""
    bin_s = series["bin_s"]
    width = round(FENCE_WINDOW_S / bin_s)
    totals = [sum(series["regions"][r][i] for r in regions) for i in range(len(series["t_s"]))]
    for i in range(round(since / bin_s), min(len(totals), round(until / bin_s)) - width + 1):
        if sum(totals[i:i + width]) / width <= ceiling:
            return round((i + width) * bin_s - since, 3)
    return None


def _loss_row(scenario: Scenario, res: Any, settings: StrictSettings | None) -> dict[str, Any]:
    kill = next((f for f in scenario.faults if f.action == "kill"), None)
    if kill is None:
        raise ValueError("the region-loss scenario kills nothing")
    rate = scenario.limits[0].rate
    lost = set(scenario.topology.resolve(kill.target))
    regions = scenario.topology.regions
    survivors = [r for r in regions if not set(scenario.topology.nodes_of(r)) <= lost]
    w_lost = len(lost) / len(scenario.topology.node_ids)
    goal = 1.0 - (settings.alpha * w_lost if settings else 0.0)
    series = region_rates(res.recording, scenario, BIN_S)
    end = scenario.duration_s
    return {"loss_excess_tokens": _worst(res), "loss_goal_share": round(goal, 4),
            "loss_recover_s": time_to_rate(series, survivors, kill.at_s, 0.98 * goal * rate, WINDOW_S),
            "loss_share_first_1s": rate_share(series, survivors, kill.at_s, min(end, kill.at_s + 1.0), rate),
            "loss_share_after": rate_share(series, survivors, max(kill.at_s, end - 2.0), end, rate)}


def _schedules(count: int, seed: int, mode: str, lease_ms: float, alpha: float) -> dict[str, Any]:
    """Worst excess over the plain envelope on ``count`` random fault schedules (10 virtual s each).
    A schedule's lease is the point's, at least 3 of that schedule's gossip intervals.  Some schedules
    have a burst smaller than a strict node can use (strict mode then admits nothing: docs/strict-mode.md,
    "Small bursts"); ``schedules_admitting`` counts the others."""
    worst, clamped, admitting = None, 0, 0
    for i in range(count):
        scenario, faults = draw_schedule(seed, i, duration_s=10.0, max_faults=6, mode=mode)
        settings = None
        if mode == "strict":
            g = scenario.topology.gossip_interval_ms
            clamped += lease_ms < 3 * g
            settings = point_settings(g, max(lease_ms, 3 * g), alpha)
        res = judge(scenario, faults, run_world(scenario, faults, strict_settings=settings))
        worst = _worst(res) if worst is None else max(worst, _worst(res))
        admitting += (res.envelope.figures.get("admitted_tokens") or 0) > 0
    return {"schedules": count, "schedules_excess_tokens": worst, "schedules_admitting": admitting,
            "schedules_lease_clamped": clamped}


def _point(partition: Scenario, loss: Scenario, mode: str, lease_ms: float | None, alpha: float | None,
           schedules: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    started = time.process_time()
    settings = None
    if mode == "strict":
        assert lease_ms is not None and alpha is not None
        settings = point_settings(partition.topology.gossip_interval_ms, lease_ms, alpha)
    cut = dataclasses.replace(partition, mode=mode)
    gone = dataclasses.replace(loss, mode=mode)
    res_cut = simulate(cut, strict_settings=settings)
    res_loss = simulate(gone, strict_settings=settings)
    row: dict[str, Any] = {"mode": mode, "lease_ms": lease_ms, "alpha": alpha}
    row |= _partition_row(cut, res_cut, settings) | _loss_row(gone, res_loss, settings)
    row |= _schedules(schedules, seed, mode, lease_ms or 0.0, alpha or 0.0)
    row["drills_excess_tokens"] = max(row["partition_excess_tokens"], row["loss_excess_tokens"])
    row["max_excess_tokens"] = max(v for v in (row["drills_excess_tokens"], row["schedules_excess_tokens"])
                                   if v is not None)
    row["within_envelope"] = row["max_excess_tokens"] <= 1e-6
    row["cpu_s"] = round(time.process_time() - started, 2)
    series = {"partition": sides_cumulative(res_cut.recording, cut, BIN_S),
              "loss": region_rates(res_loss.recording, gone, BIN_S) | {"kill_s": _kill_s(gone),
                                                                       "goal_share": row["loss_goal_share"]}}
    return row, series


def _kill_s(scenario: Scenario) -> float | None:
    return next((f.at_s for f in scenario.faults if f.action == "kill"), None)


def strict_sweep(partition: Scenario, loss: Scenario, leases_ms: Sequence[float], alphas: Sequence[float], *,
                 schedules: int = 0, seed: int = 1, show: tuple[float, float] | None = None) -> dict[str, Any]:
    """Every ``(lease_ms, alpha)`` in strict mode, and eventual mode once, on the same two scenarios
    (``partition``: one partition and its heal; ``loss``: one kill, no restart) and ``schedules``
    random fault schedules of ``seed``.

    Returns ``{"rows": [strict rows], "eventual": row, "series": {"strict": ..., "eventual": ...},
    "shown": (lease_ms, alpha), "seconds"}``; ``series`` holds the time series of the point ``show``
    (default the first) and of eventual mode, for :func:`modes_figure` and :func:`loss_figure`.
    """
    if not leases_ms or not alphas:
        raise ValueError("the sweep needs at least one lease and one alpha")
    if split_window(partition) is None:
        raise ValueError("the partition scenario has no partition")
    if _kill_s(loss) is None:
        raise ValueError("the region-loss scenario kills nothing")
    if loss.topology.gossip_interval_ms != partition.topology.gossip_interval_ms:
        raise ValueError("both scenarios must have the same gossip interval")
    started = time.perf_counter()
    shown = show or (float(leases_ms[0]), float(alphas[0]))
    rows, series = [], {}
    for lease in leases_ms:
        for alpha in alphas:
            row, ser = _point(partition, loss, "strict", float(lease), float(alpha), schedules, seed)
            rows.append(row)
            if (float(lease), float(alpha)) == shown:
                series["strict"] = ser
    eventual, series["eventual"] = _point(partition, loss, "eventual", None, None, schedules, seed)
    if "strict" not in series:
        raise ValueError(f"show={show!r} is not a point of the grid")
    return {"rows": rows, "eventual": eventual, "series": series, "shown": shown,
            "seconds": round(time.perf_counter() - started, 2)}


def save_study(study: Mapping[str, Any], results_dir: str | os.PathLike[str], scenarios: Sequence[Scenario] = (),
               ) -> Path:
    """Write the sweep's rows (not its time series) to ``<results_dir>/study.json``, with the scenarios."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"rows": study["rows"], "eventual": study["eventual"], "shown": study["shown"],
           "seconds": study["seconds"], "within_envelope": all(r["within_envelope"] for r in study["rows"]),
           "scenarios": [s.to_dict() for s in scenarios]}
    path = out / "study.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- figures (draw only)
def _label(row: Mapping[str, Any]) -> str:
    return "eventual" if row["mode"] == "eventual" else f"L {row['lease_ms']:g} ms, alpha {row['alpha']:g}"


def safety_availability_figure(rows: Sequence[Mapping[str, Any]], eventual: Mapping[str, Any]) -> go.Figure:
    """Worst excess over the envelope in the two drills (y) against what stays available (x): the share
    of R during the partition, and the survivors' share after a region loss; one point per setting,
    eventual in red.  (The random schedules' excess is in the rows, not here: many of them have a
    burst of a few tokens, so their worst excess says little about the setting.)"""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=("during the partition: total share of R",
                                        "after a region loss: survivors' share of R"))
    alphas = sorted({r["alpha"] for r in rows})
    leases = sorted({r["lease_ms"] for r in rows})
    for col, x in ((1, "cut_total_share"), (2, "loss_share_after")):
        for r in rows:  # colour: alpha; symbol: lease (the points of one alpha sit close together)
            fig.add_scatter(x=[r[x]], y=[r["drills_excess_tokens"]], mode="markers", name=_label(r),
                            legendgroup=_label(r), showlegend=col == 1, row=1, col=col,
                            marker={"size": 11, "opacity": 0.85,
                                    "color": REGION_COLORS[alphas.index(r["alpha"]) % len(REGION_COLORS)],
                                    "symbol": SYMBOLS[leases.index(r["lease_ms"]) % len(SYMBOLS)]},
                            hovertemplate=f"{_label(r)}: excess %{{y:.1f}} tokens, share %{{x:.3f}}<extra></extra>")
        fig.add_scatter(x=[eventual[x]], y=[eventual["drills_excess_tokens"]], mode="markers+text", text=["eventual"],
                        textposition="bottom center", name="eventual", legendgroup="eventual",
                        marker={"size": 13, "symbol": "x", "color": MODE_COLORS["eventual"]},
                        showlegend=col == 1, row=1, col=col)
        fig.add_hline(y=0, line_dash="dash", line_color="#6b7280", row=1, col=col,
                      annotation_text="envelope B + R·(t-s)", annotation_font_size=9)
        fig.update_xaxes(title_text="share of R admitted", row=1, col=col)
    fig.update_yaxes(title_text="worst excess over B + R·(t-s) in the drills (tokens)", row=1, col=1)
    fig.update_layout(title="Safety vs availability: strict per (lease, alpha) against eventual", height=460,
                      template="plotly_white", legend={"orientation": "h", "y": -0.25, "font": {"size": 10}},
                      margin={"l": 60, "r": 20, "t": 60, "b": 40})
    return fig


COSTS = (("loss_recover_s", "region loss: s back to (1 - alpha·w_lost)·R"),
         ("fence_s", "partition: s until the cut-off side is at its pinned share"),
         ("cut_total_share", "partition: share of R admitted while cut"))


def cost_figure(rows: Sequence[Mapping[str, Any]], eventual: Mapping[str, Any] | None = None,
                costs: Sequence[tuple[str, str]] = COSTS) -> go.Figure:
    """One panel per figure of ``costs`` against the lease, one line per alpha (eventual mode, which
    has no lease, as a dashed level where it has a value).  Scatter traces only: an executed notebook
    then embeds plotly's basic bundle, not the full one a heatmap needs."""
    fig = make_subplots(rows=1, cols=len(costs), subplot_titles=[title for _z, title in costs],
                        horizontal_spacing=0.08)
    alphas = sorted({r["alpha"] for r in rows})
    for col, (z, _title) in enumerate(costs, start=1):
        for i, alpha in enumerate(alphas):
            pts = sorted((r for r in rows if r["alpha"] == alpha), key=lambda r: r["lease_ms"])
            fig.add_scatter(x=[r["lease_ms"] for r in pts], y=[r[z] for r in pts], mode="lines+markers",
                            name=f"strict alpha {alpha:g}", legendgroup=f"a{alpha}", showlegend=col == 1,
                            line={"color": REGION_COLORS[i % len(REGION_COLORS)]}, row=1, col=col)
        if eventual is not None and eventual.get(z) is not None:
            fig.add_hline(y=eventual[z], line_dash="dash", line_color=MODE_COLORS["eventual"], row=1, col=col,
                          annotation_text="eventual", annotation_font_size=9)
        fig.update_xaxes(title_text="lease L (ms)", type="log", row=1, col=col)
    fig.update_layout(title="What the lease and alpha cost", height=360, template="plotly_white",
                      legend={"orientation": "h", "y": -0.3}, margin={"l": 50, "r": 20, "t": 70, "b": 40})
    return fig


def modes_figure(by_mode: Mapping[str, Mapping[str, Any]], title: str = "") -> go.Figure:
    """Side by side per mode (``sides_cumulative`` of each run): cumulative admitted tokens per side and
    in total against the envelope and the mode's promised bound (top), tokens/s per side against R
    (bottom; eventual's sides may each reach R, k x R in total, strict's stay under R together)."""
    modes = list(by_mode)
    fig = make_subplots(rows=2, cols=len(modes), shared_xaxes=True, shared_yaxes=True, vertical_spacing=0.1,
                        subplot_titles=[f"{m}: admitted vs the envelope" for m in modes]
                        + [f"{m}: tokens/s per side" for m in modes])
    for col, mode in enumerate(modes, start=1):
        s = by_mode[mode]
        t = s["t_s"]
        first = col == 1
        for i, (label, ys) in enumerate(s["sides"].items()):
            color = REGION_COLORS[i % len(REGION_COLORS)]
            fig.add_scatter(x=t, y=ys, name=f"side {label}", legendgroup=label, showlegend=first,
                            line={"color": color}, row=1, col=col)
            fig.add_scatter(x=t, y=s["rate_per_s"][label], name=f"side {label}", legendgroup=label,
                            showlegend=False, line={"color": color}, row=2, col=col)
        fig.add_scatter(x=t, y=s["total"], name="all sides", legendgroup="total", showlegend=first,
                        line={"color": "#111827", "width": 3}, row=1, col=col)
        total_rate = [sum(v[i] for v in s["rate_per_s"].values()) for i in range(len(t))]
        fig.add_scatter(x=t, y=total_rate, name="all sides", legendgroup="total", showlegend=False,
                        line={"color": "#111827", "width": 3}, row=2, col=col)
        fig.add_scatter(x=t, y=s["envelope"], name="envelope B + R·t", legendgroup="envelope", showlegend=first,
                        line={"color": "#dc2626", "dash": "dash"}, row=1, col=col)
        promise = ("strict promise = the envelope" if mode == "strict"
                   else "eventual promise: + (k-1)·R·cut")
        fig.add_scatter(x=t, y=s["bound"], name=promise, showlegend=True,
                        line={"color": MODE_COLORS.get(mode, "#6b7280"), "dash": "dot", "width": 2}, row=1, col=col)
        fig.add_hline(y=s["rate"], line_dash="dash", line_color="#dc2626", row=2, col=col,
                      annotation_text="R", annotation_font_size=9)
        if mode != "strict" and len(s["sides"]) > 1:
            k = len(s["sides"])
            fig.add_hline(y=k * s["rate"], line_dash="dot", line_color=MODE_COLORS["eventual"], row=2, col=col,
                          annotation_text=f"{k} x R: each side alone", annotation_font_size=9)
        if s.get("split"):
            for row in (1, 2):
                fig.add_vrect(x0=s["split"][0], x1=s["split"][1], fillcolor="#9333ea", opacity=0.07,
                              line_width=0, row=row, col=col)
        fig.update_xaxes(title_text="run time (s)", row=2, col=col)
    fig.update_yaxes(title_text="tokens (cumulative)", row=1, col=1)
    fig.update_yaxes(title_text="tokens / s", row=2, col=1)
    fig.update_layout(title=title or "Partition (shaded): eventual vs strict, per side", height=620,
                      template="plotly_white", legend={"orientation": "h", "y": -0.12},
                      margin={"l": 60, "r": 20, "t": 60, "b": 40})
    return fig


def loss_figure(by_mode: Mapping[str, Mapping[str, Any]], rate: float, title: str = "") -> go.Figure:
    """Admitted tokens/s per region through a region loss, one panel per mode, with R and strict's
    goal ``(1 - alpha w_lost) R`` (``region_rates`` plus ``kill_s`` and ``goal_share``)."""
    modes = list(by_mode)
    fig = make_subplots(rows=1, cols=len(modes), shared_yaxes=True, subplot_titles=modes)
    for col, mode in enumerate(modes, start=1):
        s = by_mode[mode]
        t = s["t_s"]
        for i, (region, ys) in enumerate(s["regions"].items()):
            fig.add_scatter(x=t, y=ys, name=region, legendgroup=region, showlegend=col == 1,
                            line={"color": REGION_COLORS[i % len(REGION_COLORS)]}, row=1, col=col)
        total = [sum(v[i] for v in s["regions"].values()) for i in range(len(t))]
        fig.add_scatter(x=t, y=total, name="all regions", legendgroup="total", showlegend=col == 1,
                        line={"color": "#111827", "width": 3}, row=1, col=col)
        fig.add_hline(y=rate, line_dash="dash", line_color="#dc2626", row=1, col=col, annotation_text="R",
                      annotation_font_size=9)
        if mode == "strict" and s.get("goal_share") is not None:
            fig.add_hline(y=s["goal_share"] * rate, line_dash="dot", line_color=MODE_COLORS["strict"], row=1,
                          col=col, annotation_text="(1 - alpha·w_lost)·R", annotation_position="bottom right",
                          annotation_font_size=9)
        if s.get("kill_s") is not None:
            fig.add_vline(x=s["kill_s"], line_dash="dot", line_color="#dc2626", row=1, col=col)
        fig.update_xaxes(title_text="run time (s)", row=1, col=col)
    fig.update_yaxes(title_text="tokens / s", row=1, col=1)
    fig.update_layout(title=title or "Region loss: admitted tokens/s per region", height=360,
                      template="plotly_white", legend={"orientation": "h", "y": -0.25},
                      margin={"l": 60, "r": 20, "t": 60, "b": 40})
    return fig

