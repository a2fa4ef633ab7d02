"""Self-contained HTML dashboards of recorded runs: summary, verdict, every chart, offline.

plotly.js is embedded once per page (not once per chart), so a page with many charts stays small
and opens with no network.  Several runs give a comparison table with regressions flagged against
the first run (the baseline).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.io as pio
from plotly.offline import get_plotlyjs

from workbench.check import checker
from workbench.check.live import LiveStats
from workbench.history import Recording, RecordingError
from workbench.ui import charts

__all__ = ["REGRESSION_RULES", "ReportError", "figures_for", "health_intervals", "render_report", "write_report"]


class ReportError(ValueError):
    """A results folder cannot be reported (missing, older format, ...)."""


# figure -> (direction, allowed relative worsening against the baseline)
REGRESSION_RULES: dict[str, tuple[str, float]] = {
    "throughput_rps": ("higher", 0.10),
    "latency_ms.p99": ("lower", 0.25),
    "latency_ms.p50": ("lower", 0.25),
    "over_admission_pct": ("lower_abs", 1.0),
    "failover_ms.p99": ("lower", 0.50),
    "client_errors": ("lower_abs", 0.0),
    "token_loss": ("lower_abs", 0.0),
}


def _get(summary: dict[str, Any], dotted: str) -> Any:
    value: Any = summary
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def health_intervals(rec: Recording, nodes: Sequence[str], regions: dict[str, str],
                     end_s: float) -> dict[str, list[tuple[float, float, str]]]:
    """Per node, spans of its state derived from the applied faults."""
    state = dict.fromkeys(nodes, "up")
    since = dict.fromkeys(nodes, 0.0)
    spans: dict[str, list[tuple[float, float, str]]] = {n: [] for n in nodes}

    def members(target: str) -> list[str]:
        if target in state:
            return [target]
        return [n for n in nodes if regions.get(n) == target]

    def move(node: str, t: float, new: str) -> None:
        if state[node] != new:
            spans[node].append((since[node], t, state[node]))
            state[node], since[node] = new, t

    for f in sorted(rec.faults, key=lambda f: f.t_s):
        new = {"kill": "killed", "pause": "paused", "resume": "up", "restart": "up"}.get(f.action)
        if new:
            for n in members(f.target):
                move(n, f.t_s, new)
        elif f.action == "partition":
            groups = f.detail.get("groups") or []
            if len(groups) > 1:
                for n in nodes:
                    if state[n] == "up":
                        move(n, f.t_s, "partitioned")
        elif f.action in ("heal", "end_partition"):
            for n in nodes:
                if state[n] == "partitioned":
                    move(n, f.t_s, "up")
    for n in nodes:
        spans[n].append((since[n], end_s, state[n]))
    return spans


def figures_for(rec: Recording, summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every chart of one run, in report order."""
    scenario = rec.scenario or {}
    topo = scenario.get("topology", {})
    regions = list(topo.get("nodes_per_region", {})) or sorted({r.home_region for r in rec.requests})
    limits = (scenario.get("limits") or [{"rate": 0, "burst": 0}])[0]
    duration = float(scenario.get("duration_s") or (rec.ended_s or 1))
    live = LiveStats(regions, duration, float(limits["rate"]), float(limits["burst"]))
    for r in rec.requests:
        live.add(r)
    end = rec.ended_s or duration
    series = live.series(duration)
    nodes = [f"{r}-{i}" for r in regions for i in range(1, int(topo.get("nodes_per_region", {}).get(r, 1)) + 1)]
    node_region = {n: n.rsplit("-", 1)[0] for n in nodes}
    failover = checker.failover_times(rec)
    per_target = {o["region"]: o["region_ms"] for o in failover.get("outages", [])
                  if isinstance(o.get("region_ms"), int | float)}
    return [
        ("throughput", charts.throughput_figure(series, rec.faults)),
        ("latency", charts.latency_figure(series, rec.faults)),
        ("envelope", charts.envelope_figure(series, rec.faults)),
        ("health", charts.health_figure(nodes, health_intervals(rec, nodes, node_region, end), end)),
        ("faults", charts.fault_timeline_figure(rec.faults, per_target, end)),
        ("processes", charts.process_figure(rec.processes)),
    ]


def _load(folder: str | Path) -> tuple[Recording, dict[str, Any]]:
    try:
        rec = Recording.load(folder)
    except RecordingError as exc:
        raise ReportError(str(exc)) from None
    summary_path = Path(folder) / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    else:
        summary = checker.summarize(rec)
    return rec, summary


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#111827;background:#f9fafb}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
table{border-collapse:collapse;background:#fff;font-size:13px}
td,th{border:1px solid #e5e7eb;padding:4px 10px;text-align:right}th{background:#f3f4f6}
td:first-child,th:first-child{text-align:left}.reg{background:#fee2e2}
.grid{display:grid;grid-template-columns:minmax(0,1fr);gap:12px;max-width:1200px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:6px;min-width:0;overflow:hidden}
.muted{color:#6b7280;font-size:12px}
"""

_ROWS = [("throughput_rps", "throughput (req/s)"), ("latency_ms.p50", "latency p50 (ms)"),
         ("latency_ms.p95", "latency p95 (ms)"), ("latency_ms.p99", "latency p99 (ms)"),
         ("admitted_tokens", "admitted tokens"), ("envelope_tokens", "limit envelope (tokens)"),
         ("over_admission_pct", "over-admission %"), ("failover_ms.p50", "failover p50 (ms)"),
         ("failover_ms.p99", "failover p99 (ms)"), ("failover_ms.max", "failover max (ms)"),
         ("token_loss", "token loss"), ("client_errors", "client errors"), ("requests", "requests"),
         ("invariants_ok", "invariants held")]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return html.escape(f"{value:,}" if isinstance(value, int) else str(value))


def _regressed(base: Any, value: Any, rule: tuple[str, float]) -> bool:
    if not isinstance(base, int | float) or not isinstance(value, int | float):
        return False
    direction, allowed = rule
    if direction == "higher":
        return value < base * (1 - allowed)
    if direction == "lower":
        return value > base * (1 + allowed) and value - base > 1.0
    return value > base + allowed


def _summary_table(names: list[str], summaries: list[dict[str, Any]]) -> tuple[str, list[str]]:
    head = "<tr><th>figure</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    rows, regressions = [], []
    for key, label in _ROWS:
        cells = []
        for i, s in enumerate(summaries):
            value = _get(s, key)
            regressed = i > 0 and key in REGRESSION_RULES and _regressed(_get(summaries[0], key), value,
                                                                         REGRESSION_RULES[key])
            if regressed:
                regressions.append(f"{names[i]}: {label} {_fmt(value)} vs baseline {_fmt(_get(summaries[0], key))}")
            cells.append(f"<td class='{'reg' if regressed else ''}'>{_fmt(value)}</td>")
        rows.append(f"<tr><td>{label}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>", regressions


def render_report(folders: Sequence[str | Path], title: str = "Rating Edge drill report") -> str:
    """The HTML page for one or more results folders (the first is the baseline)."""
    if not folders:
        raise ReportError("no results folder given")
    loaded = [_load(f) for f in folders]
    names = [Path(f).name for f in folders]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    table, regressions = _summary_table(names, [s for _r, s in loaded])
    for name, (rec, summary) in zip(names, loaded, strict=True):
        ok = summary.get("invariants_ok") and rec.complete
        verdict = "<span class='ok'>every invariant held</span>" if ok else "<span class='bad'>FAILED</span>"
        parts.append(f"<p><b>{html.escape(name)}</b>: {verdict}"
                     + ("" if rec.complete else f" — incomplete: {html.escape(rec.incomplete_reason)}") + "</p>")
        if summary.get("reasons"):
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(r))}</li>" for r in summary["reasons"]) + "</ul>")
    parts.append("<h2>Summary</h2>" + table)
    if len(loaded) > 1:
        parts.append("<h2>Regressions against the baseline (" + html.escape(names[0]) + ")</h2>")
        parts.append("<ul>" + "".join(f"<li class='bad'>{html.escape(r)}</li>" for r in regressions) + "</ul>"
                     if regressions else "<p class='ok'>none</p>")
    chart_id = 0
    for name, (rec, summary) in zip(names, loaded, strict=True):
        parts.append(f"<h2>Charts — {html.escape(name)}</h2><div class='grid'>")
        for _kind, fig in figures_for(rec, summary):
            chart_id += 1
            div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"chart-{chart_id}",
                              default_width="100%", config={"displaylogo": False, "responsive": True})
            parts.append(f"<div class='card'>{div}</div>")
        parts.append("</div>")
        scenario = json.dumps(rec.scenario, indent=1)
        parts.append(f"<details><summary class='muted'>scenario</summary><pre>{html.escape(scenario)}</pre></details>")
    plotly_js = get_plotlyjs()
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{plotly_js}</script></head><body>"
            + "\n".join(parts) + "</body></html>")


def write_report(folders: Sequence[str | Path], out: str | Path, title: str = "Rating Edge drill report") -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(folders, title), encoding="utf-8")
    return path
