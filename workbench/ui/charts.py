"""Plotly figures of a drill, drawn from precomputed series (LiveStats.series) and records.

The same functions feed the live notebook widgets (as FigureWidgets), the static figures saved in
executed notebooks and the HTML report.  They draw; they never compute figures of merit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from workbench.history import FaultRecord, ProcessSample

__all__ = [
    "FAULT_COLORS",
    "REGION_COLORS",
    "envelope_figure",
    "excess_figure",
    "fault_timeline_figure",
    "health_check_figure",
    "health_figure",
    "inflight_figure",
    "latency_figure",
    "overload_figure",
    "process_figure",
    "throughput_figure",
]

REGION_COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#65a30d", "#db2777"]
FAULT_COLORS = {"kill": "#dc2626", "pause": "#d97706", "resume": "#16a34a", "restart": "#16a34a",
                 "partition": "#9333ea", "heal": "#0891b2", "latency": "#a16207", "loss": "#be123c"}


def _layout(fig: go.Figure, title: str, ytitle: str, height: int = 300) -> go.Figure:
    fig.update_layout(title=title, height=height, margin={"l": 50, "r": 20, "t": 40, "b": 40},
                      xaxis_title="run time (s)", yaxis_title=ytitle, template="plotly_white",
                      legend={"orientation": "h", "y": -0.25})
    return fig


def _fault_lines(fig: go.Figure, faults: Iterable[FaultRecord]) -> None:
    for f in faults:
        fig.add_vline(x=f.t_s, line_dash="dot", line_color=FAULT_COLORS.get(f.action, "#6b7280"),
                      annotation_text=f"{f.action} {f.target}".strip(), annotation_position="top left",
                      annotation_font_size=9)


def throughput_figure(series: Mapping[str, Any], faults: Sequence[FaultRecord] = ()) -> go.Figure:
    """Admitted (solid), denied (dashed) and errors (dotted) per second, per home region."""
    fig = go.Figure()
    t = series["t_s"]
    for i, region in enumerate(series["admitted_rps"]):
        color = REGION_COLORS[i % len(REGION_COLORS)]
        fig.add_scatter(x=t, y=series["admitted_rps"][region], name=f"{region} admitted",
                        line={"color": color})
        fig.add_scatter(x=t, y=series["denied_rps"][region], name=f"{region} denied",
                        line={"color": color, "dash": "dash"}, opacity=0.6)
        fig.add_scatter(x=t, y=series["errors_rps"][region], name=f"{region} errors",
                        line={"color": color, "dash": "dot", "width": 3})
    _fault_lines(fig, faults)
    _layout(fig, "Throughput by client home region", "requests / s")
    fig.update_layout(legend={"orientation": "v", "x": 1.02, "y": 1, "font": {"size": 10}})
    return fig


def latency_figure(series: Mapping[str, Any], faults: Sequence[FaultRecord] = ()) -> go.Figure:
    fig = go.Figure()
    for pct, dash in ((50, "solid"), (95, "dash"), (99, "dot")):
        fig.add_scatter(x=series["t_s"], y=series[f"p{pct}_ms"], name=f"p{pct}", line={"dash": dash},
                        connectgaps=False)
    _fault_lines(fig, faults)
    return _layout(fig, "Latency from intended send time (percentiles per bin)", "ms")


def envelope_figure(series: Mapping[str, Any], faults: Sequence[FaultRecord] = ()) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=series["t_s"], y=series["envelope_tokens"], name="limit envelope B + R·t",
                    line={"color": "#dc2626", "dash": "dash"})
    fig.add_scatter(x=series["t_s"], y=series["admitted_tokens"], name="admitted tokens",
                    line={"color": "#2563eb"}, fill="tozeroy", fillcolor="rgba(37,99,235,0.1)")
    _fault_lines(fig, faults)
    return _layout(fig, "Admitted tokens vs the global limit", "tokens (cumulative)")


def excess_figure(excess: Mapping[str, Any], faults: Sequence[FaultRecord] = ()) -> go.Figure:
    """Per key, the worst window ending in each bin over ``B + R·(t - s)`` (``check.excess``), and the
    checker's allowance: above 0 is over-admission, above the allowance a broken envelope."""
    fig = go.Figure()
    t = excess["t_s"]
    for i, (key, values) in enumerate(excess["keys"].items()):
        fig.add_scatter(x=t, y=values, name=f"key {key}", line={"color": REGION_COLORS[i % len(REGION_COLORS)]},
                        hovertemplate=f"{key}: %{{y:.1f}} tokens at %{{x:.1f}} s<extra></extra>")
    allowance = excess.get("allowance_tokens")
    if allowance is not None and t:
        fig.add_scatter(x=[0, t[-1]], y=[allowance, allowance], name=f"allowed ({allowance:g} tokens)",
                        mode="lines", line={"color": "#dc2626", "dash": "dash"})
    fig.add_hline(y=0, line_color="#9ca3af", line_width=1)
    _fault_lines(fig, faults)
    shown = len(excess["keys"])
    note = "" if shown >= excess.get("keys_total", shown) else f" ({shown} of {excess['keys_total']} keys)"
    return _layout(fig, "Excess over the limit envelope, worst window ending at t" + note,
                   "tokens over B + R·(t-s)")


def health_figure(nodes: Sequence[str], intervals: Mapping[str, Sequence[tuple[float, float, str]]],
                  duration_s: float, *, title: str = "Node health") -> go.Figure:
    """One row per node: coloured spans of its state (up, paused, killed, partitioned; or the router's
    view: in rotation, out: <evidence>)."""
    colors = {"up": "#16a34a", "running": "#16a34a", "paused": "#d97706", "killed": "#dc2626",
              "partitioned": "#9333ea", "stopped": "#6b7280", "exited": "#dc2626", "in rotation": "#16a34a"}
    fig = go.Figure()
    seen: set[str] = set()
    for node in nodes:
        for start, end, state in intervals.get(node, [(0.0, duration_s, "up")]):
            color = colors.get(state, "#dc2626" if state.startswith("out") else "#6b7280")
            fig.add_bar(x=[max(0.001, end - start)], y=[node], base=[start], orientation="h",
                        marker_color=color, name=state, showlegend=state not in seen,
                        hovertemplate=f"{node}: {state} %{{base:.2f}}-%{{x:.2f}} s<extra></extra>")
            seen.add(state)
    fig.update_layout(barmode="overlay")
    return _layout(fig, title, "", height=max(180, 60 + 30 * len(nodes)))


def fault_timeline_figure(faults: Sequence[FaultRecord], failover_ms: Mapping[str, float],
                          duration_s: float) -> go.Figure:
    """Every applied fault on the run clock, and for each kill the time until its clients were served."""
    fig = go.Figure()
    for i, f in enumerate(faults):
        fig.add_scatter(x=[f.t_s], y=[f.action], mode="markers+text", text=[f.target], textposition="top center",
                        marker={"size": 12, "color": FAULT_COLORS.get(f.action, "#6b7280")},
                        showlegend=False, hovertemplate=f"{f.action} {f.target} at %{{x:.3f}} s<extra></extra>")
        if f.action == "kill" and f.target in failover_ms:
            end = f.t_s + failover_ms[f.target] / 1000
            fig.add_scatter(x=[f.t_s, end], y=["failover", "failover"], mode="lines+markers",
                            line={"color": "#dc2626", "width": 6}, name=f"failover {f.target}",
                            hovertemplate=f"{f.target}: {failover_ms[f.target]:.1f} ms<extra></extra>")
        _ = i
    fig.update_xaxes(range=[0, duration_s])
    return _layout(fig, "Fault timeline and failover", "", height=260)


def process_figure(samples: Sequence[ProcessSample]) -> go.Figure:
    """CPU % and RSS per process over the run (two y axes)."""
    fig = go.Figure()
    names = sorted({s.name for s in samples})
    for i, name in enumerate(names):
        rows = [s for s in samples if s.name == name]
        color = REGION_COLORS[i % len(REGION_COLORS)]
        fig.add_scatter(x=[s.t_s for s in rows], y=[s.cpu_pct for s in rows], name=f"{name} CPU %",
                        line={"color": color})
        fig.add_scatter(x=[s.t_s for s in rows], y=[s.rss_mb for s in rows], name=f"{name} RSS MB",
                        line={"color": color, "dash": "dot"}, yaxis="y2")
    fig.update_layout(yaxis2={"overlaying": "y", "side": "right", "title": "RSS (MB)"})
    return _layout(fig, "CPU and memory per process", "CPU %")


def overload_figure(series: Mapping[str, Any], faults: Sequence[FaultRecord] = ()) -> go.Figure:
    """Offered vs served (2xx) vs shed (quick 503) vs limited (429) vs errors per second
    (``workbench.check.overload.request_series``)."""
    fig = go.Figure()
    t = series["t_s"]
    for key, name, style in (("offered_rps", "offered", {"color": "#6b7280", "dash": "dash"}),
                             ("served_rps", "served (2xx)", {"color": "#16a34a", "width": 3}),
                             ("shed_rps", "shed (quick 503)", {"color": "#d97706"}),
                             ("limited_rps", "limited (429)", {"color": "#2563eb", "dash": "dot"}),
                             ("errors_rps", "errors", {"color": "#dc2626", "dash": "dot", "width": 3})):
        fig.add_scatter(x=t, y=series[key], name=name, line=style)
    if any(series.get("cut_rps") or ()):  # only when the run's end cut requests off
        fig.add_scatter(x=t, y=series["cut_rps"], name="cut at the end (not judged)",
                        line={"color": "#9ca3af", "dash": "dot"})
    _fault_lines(fig, faults)
    return _layout(fig, "Offered vs served vs shed", "requests / s")


def inflight_figure(gauges: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]) -> go.Figure:
    """In-flight (solid) and queue depth (dotted) per process, the router first
    (``workbench.check.overload.inflight_series``)."""
    fig = go.Figure()
    procs = sorted(set(gauges.get("inflight", {})) | set(gauges.get("queue", {})),
                   key=lambda p: (p != "router", p))
    for i, proc in enumerate(procs):
        color = "#111827" if proc == "router" else REGION_COLORS[i % len(REGION_COLORS)]
        for kind, dash in (("inflight", "solid"), ("queue", "dot")):
            row = gauges.get(kind, {}).get(proc)
            if row:
                fig.add_scatter(x=row["t_s"], y=row["value"], name=f"{proc} {kind}",
                                line={"color": color, "dash": dash})
    return _layout(fig, "In-flight and queued requests per process", "requests")


def health_check_figure(latency: Mapping[str, Mapping[str, Sequence[float]]],
                        ejections: Sequence[Mapping[str, Any]]) -> go.Figure:
    """The router's mean active-check latency per node, and every ejection (x) and refused
    ejection (o) with its reason (``workbench.check.overload``)."""
    fig = go.Figure()
    nodes = sorted(set(latency) | {e["node"] for e in ejections})
    color = {n: REGION_COLORS[i % len(REGION_COLORS)] for i, n in enumerate(nodes)}
    for node in nodes:
        row = latency.get(node)
        if row:
            fig.add_scatter(x=row["t_s"], y=row["mean_ms"], name=f"{node} check", line={"color": color[node]})
    for e in ejections:
        label = ("refused " if e["refused"] else "") + f"ejection {e['node']}: {e['reason']} x{e['count']}"
        fig.add_scatter(x=[e["t_s"]], y=[0], mode="markers", showlegend=False,
                        marker={"symbol": "circle-open" if e["refused"] else "x", "size": 11,
                                "color": color.get(e["node"], "#dc2626")},
                        hovertemplate=label + " at %{x:.1f} s<extra></extra>")
    return _layout(fig, "Health-check latency and ejections", "ms (mean per scrape)")
