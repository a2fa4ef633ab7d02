"""Self-contained HTML dashboards of recorded runs, for someone who decides from them.

At the top, each run's verdict and a table of its objectives (target, measured, met / missed), from
the checker's summary; then, for several runs, the comparison with regressions flagged against the
first run (the baseline); the failover of every outage; and every chart, drawn offline.  The
envelope chart shows the *excess* over ``B + R·(t - s)`` over time (``workbench.check.excess``):
cumulative tokens next to the envelope hide a 13-token over-admission in 4,000.

plotly.js is embedded once per page.  When every chart uses only plotly's basic trace types
(scatter, bar, pie) the page embeds plotly's basic bundle shipped in ``ui/assets`` (1.2 MB, same
plotly.js version as plotly.py's, checked) instead of the full one (4.6 MB): a smaller page that a
browser compiles faster on a cold open (``benchmarks/bench_report.py``).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.io as pio
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from workbench.check import checker, overload
from workbench.check.excess import excess_over_time
from workbench.check.live import LiveStats
from workbench.history import Recording, RecordingError
from workbench.ui import charts

__all__ = ["REGRESSION_RULES", "ReportError", "bundle_kind", "figures_for", "health_intervals", "objectives",
           "overload_figures", "overload_section", "plotly_bundle", "render_report", "write_report"]

_ASSETS = Path(__file__).with_name("assets")
BASIC_BUNDLE = _ASSETS / "plotly-basic.min.js"
BASIC_BUNDLE_VERSION = "4.1.1"  # the plotly.js release the vendored basic bundle is
BASIC_TRACES = {"scatter", "bar", "pie"}


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
        ("excess", charts.excess_figure(excess_over_time(rec, bin_s=live.bin_s), rec.faults)),
        ("health", charts.health_figure(nodes, health_intervals(rec, nodes, node_region, end), end)),
        ("faults", charts.fault_timeline_figure(rec.faults, per_target, end)),
        ("processes", charts.process_figure(rec.processes)),
    ]


def overload_figures(rec: Recording) -> list[tuple[str, Any]]:
    """The overload charts of one run: offered vs served vs shed; in-flight and queue per process;
    health-check latency and ejections; the router's rotation when its routing table was sampled
    (figures from ``workbench.check.overload``)."""
    tracker = overload.tracker_for(rec)
    out = [
        ("overload", charts.overload_figure(overload.request_series(rec), rec.faults)),
        ("inflight", charts.inflight_figure(tracker.gauges)),
        ("health_checks", charts.health_check_figure(tracker.health, tracker.sorted_ejections())),
    ]
    if rec.routers:
        end = rec.ended_s or max(x.t_s for x in rec.routers)
        spans = overload.rotation_intervals(rec.routers, end)
        out.append(("rotation", charts.health_figure(sorted(spans), spans, end,
                                                     title="The router's rotation (why a node is out)")))
    return out


def overload_section(rec: Recording) -> str:
    """HTML of a run's overload totals and its ejections table (the charts go in the grid)."""
    s = overload.overload_summary(rec)
    errors = ", ".join(f"{k}: {v}" for k, v in s["errors_by_status"].items()) or "none"
    peak = ", ".join(f"{p} {v:g}" for p, v in sorted(s["peak_inflight"].items(), key=lambda kv: kv[0] != "router"))
    queue = ", ".join(f"{p} {v:g}" for p, v in sorted(s["peak_queue"].items(), key=lambda kv: kv[0] != "router"))
    sheds = ", ".join(f"{p} {v['total']}" for p, v in sorted(s["shed_counted"].items())) or "none"
    rows = [("requests offered", s["requests"]), ("served (2xx)", s["served"]), ("shed (quick 503)", s["shed"]),
            ("limited (429)", s["limited"]), ("other errors by status", errors),
            ("cut at the run's end (not judged)", s["cut_at_end"]),
            ("no_healthy_region answers", s["no_healthy_region"]), ("P95 of served (ms)", s["served_p95_ms"]),
            ("sheds counted by each gate", sheds), ("peak in-flight", peak or "not scraped"),
            ("peak queue depth", queue or "not scraped"),
            ("router in panic at some scrape", "yes" if s["panic_seen"] else "no"),
            ("most nodes out of the router's rotation at once",
             "not sampled" if s["most_out_of_rotation"] is None else s["most_out_of_rotation"])]
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in rows)
    parts = [f"<table class='overload'>{body}</table>"]
    ej = overload.ejections(rec)
    if ej:
        head = "<tr><th>at (s)</th><th>node</th><th>reason</th><th>count</th><th>cap</th></tr>"
        lines = "".join(f"<tr><td>{e['t_s']:.1f}</td><td>{html.escape(e['node'])}</td>"
                        f"<td>{html.escape(e['reason'])}</td><td>{e['count']}</td>"
                        f"<td>{'refused' if e['refused'] else 'ejected'}</td></tr>" for e in ej)
        parts.append(f"<table class='ejections'>{head}{lines}</table>")
    else:
        parts.append("<p class='muted'>no ejection in this run</p>")
    return "".join(parts)


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
h2.verdict{font-size:19px;margin:18px 0 8px}.obj td{text-align:left}.obj td:last-child{text-align:center}
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


def _yes(ok: Any) -> str:
    return {True: "<span class='ok'>met</span>", False: "<span class='bad'>MISSED</span>"}.get(ok, "-")


def objectives(rec: Recording, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per check of the summary: objective, target, measured (all as text) and met."""
    checks = summary.get("checks") or {}
    fo, errs = summary.get("failover") or {}, summary.get("errors") or {}
    conv, counter = summary.get("convergence") or {}, summary.get("envelope_counter") or {}
    allowance = excess_over_time(rec)["allowance_tokens"]
    fo_ms = summary.get("failover_ms") or {}
    known = {
        "envelope": ("limit envelope (audit trails)",
                     f"worst window <= {allowance:g} tokens over B + R·(t-s)",
                     f"{_fmt(summary.get('worst_window_excess_tokens'))} tokens"),
        "envelope_counter": ("limit envelope (clients; unknown outcomes counted as admitted)",
                             f"worst window <= {allowance:g} tokens over B + R·(t-s)",
                             f"{_fmt(counter.get('worst_excess_tokens'))} tokens"),
        "token_loss": ("no token lost or granted twice", "0", _fmt(summary.get("token_loss"))),
        "failover": ("failover: every affected client served elsewhere",
                     "0 unserved clients" + ("" if fo.get("applicable", True) else " (no outage: not applicable)"),
                     f"{_fmt(fo.get('unserved_clients'))} unserved; p99 {_fmt(fo_ms.get('p99'))} ms, "
                     f"max {_fmt(fo_ms.get('max'))} ms"),
        "convergence": ("convergence after a heal or restart", f"<= {_fmt(conv.get('allowed_ms'))} ms",
                        f"max {_fmt(conv.get('convergence_max_ms'))} ms"),
        "error_budget": ("client errors within the error budget", f"<= {_fmt(errs.get('budget_pct'))} % of requests",
                         f"{_fmt(errs.get('rate_pct'))} % ({_fmt(errs.get('total'))} of "
                         f"{_fmt(errs.get('judged', errs.get('requests')))})"
                         + (f"; {_fmt(errs['cut_at_end'])} cut at the run's end, not judged"
                            if errs.get("cut_at_end") else "")),
        "client_errors": ("client errors at most the maximum given", "", _fmt(summary.get("client_errors"))),
        "complete": ("the run completed", "every request sent is recorded",
                     "yes" if rec.complete else f"no: {rec.incomplete_reason or 'stopped early'}"),
    }
    rows = []
    for name, ok in checks.items():
        label, goal, measured = known.get(name, (name, "", ""))
        rows.append({"objective": label, "target": goal, "measured": measured, "met": bool(ok)})
    if summary.get("generator_valid") is not None:
        rows.append({"objective": "load generator on schedule (else the figures are distorted)",
                     "target": "on schedule", "measured": f"lag p99 {_fmt(summary.get('generator_lag_p99_ms'))} ms",
                     "met": bool(summary.get("generator_valid"))})
    return rows


def _objectives_table(rows: list[dict[str, Any]]) -> str:
    body = "".join(f"<tr><td>{html.escape(r['objective'])}</td><td>{html.escape(r['target'])}</td>"
                   f"<td>{html.escape(r['measured'])}</td><td>{_yes(r['met'])}</td></tr>" for r in rows)
    return ("<table class='obj'><tr><th>objective</th><th>target</th><th>measured</th><th></th></tr>"
            f"{body}</table>")


def _outages_table(summary: dict[str, Any]) -> str:
    outages = (summary.get("failover") or {}).get("outages") or []
    if not outages:
        return "<p class='muted'>no outage in this run</p>"
    cols = [("kind", "fault"), ("target", "target"), ("death_s", "at (s)"), ("back_s", "back (s)"),
            ("clients", "clients"), ("unserved_clients", "unserved"), ("failed_requests", "failed requests"),
            ("p50_ms", "failover p50 (ms)"), ("max_ms", "failover max (ms)")]
    head = "".join(f"<th>{label}</th>" for _k, label in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(o.get(k))}</td>" for k, _l in cols) + "</tr>" for o in outages)
    return f"<table><tr>{head}</tr>{body}</table>"


def bundle_kind(figures: Sequence[Any]) -> str:
    """``"basic"`` when plotly's basic bundle (shipped in ``ui/assets``) can draw every one of ``figures``."""
    types = {getattr(trace, "type", None) or "scatter" for fig in figures for trace in fig.data}
    if types <= BASIC_TRACES and BASIC_BUNDLE.exists() and get_plotlyjs_version() == BASIC_BUNDLE_VERSION:
        return "basic"
    return "full"


def plotly_bundle(figures: Sequence[Any]) -> str:
    """plotly.js for a page of ``figures``: the basic bundle when it can draw them all, else the full one."""
    return BASIC_BUNDLE.read_text(encoding="utf-8") if bundle_kind(figures) == "basic" else get_plotlyjs()


def render_report(folders: Sequence[str | Path], title: str = "Rating Edge drill report") -> str:
    """The HTML page for one or more results folders (the first is the baseline)."""
    if not folders:
        raise ReportError("no results folder given")
    loaded = [_load(f) for f in folders]
    names = [Path(f).name for f in folders]
    parts = [f"<h1>{html.escape(title)}</h1>"]
    table, regressions = _summary_table(names, [s for _r, s in loaded])
    for name, (rec, summary) in zip(names, loaded, strict=True):
        rows = objectives(rec, summary)
        missed = [r for r in rows if r["met"] is False]
        ok = summary.get("invariants_ok") and rec.complete
        verdict = ("<span class='ok'>PASSED: every invariant held</span>" if ok else
                   f"<span class='bad'>FAILED: {len(missed)} of {len(rows)} objectives missed</span>")
        parts.append(f"<h2 class='verdict'>{html.escape(name)}: {verdict}"
                     + ("" if rec.complete else f" — incomplete: {html.escape(rec.incomplete_reason)}") + "</h2>")
        parts.append(_objectives_table(rows))
        if summary.get("reasons"):
            parts.append("<ul>" + "".join(f"<li>{html.escape(str(r))}</li>" for r in summary["reasons"]) + "</ul>")
    if len(loaded) > 1:
        parts.append("<h2>Regressions against the baseline (" + html.escape(names[0]) + ")</h2>")
        parts.append("<ul>" + "".join(f"<li class='bad'>{html.escape(r)}</li>" for r in regressions) + "</ul>"
                     if regressions else "<p class='ok'>none</p>")
    parts.append("<h2>Figures" + (" side by side" if len(loaded) > 1 else "") + "</h2>" + table)
    for name, (_rec, summary) in zip(names, loaded, strict=True):
        parts.append(f"<h2>Failover per outage — {html.escape(name)}</h2>" + _outages_table(summary))
    for name, (rec, _summary) in zip(names, loaded, strict=True):
        parts.append(f"<h2 id='overload'>Overload — {html.escape(name)}</h2>" + overload_section(rec))
    chart_id = 0
    every: list[Any] = []
    for name, (rec, summary) in zip(names, loaded, strict=True):
        parts.append(f"<h2>Charts — {html.escape(name)}</h2><div class='grid'>")
        for _kind, fig in [*figures_for(rec, summary), *overload_figures(rec)]:
            chart_id += 1
            every.append(fig)
            div = pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"chart-{chart_id}",
                              default_width="100%", config={"displaylogo": False, "responsive": True})
            parts.append(f"<div class='card'>{div}</div>")
        parts.append("</div>")
        scenario = json.dumps(rec.scenario, indent=1)
        parts.append(f"<details><summary class='muted'>scenario</summary><pre>{html.escape(scenario)}</pre></details>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{plotly_bundle(every)}</script></head><body>"
            + "\n".join(parts) + "</body></html>")


def write_report(folders: Sequence[str | Path], out: str | Path, title: str = "Rating Edge drill report") -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(folders, title), encoding="utf-8")
    return path
