"""A live notebook dashboard of a drill, and the static record it leaves in the notebook.

While a drill runs, :class:`LiveDashboard` shows a progress bar with the time left, a Stop button
that sets the drill's stop event, a node table, and one light :class:`~workbench.ui.live_chart.LiveChart`
(throughput, latency, excess over the limit envelope, faults as markers; and overload: offered vs
served vs shed vs other errors, in-flight and queue depth at the router and every node, the router's
health-check latency per node with its ejections and their reasons as markers) to which each new bin
of the run clock is sent once.  :meth:`LiveDashboard.finish` then closes every widget and replaces the
live view with static plotly figures and the summary table, because a saved notebook keeps neither
the widgets' incremental updates nor anything sent after a cell ends.

Why no plotly ``FigureWidget`` while live: each one carries plotly.js as its own front-end module and
was rebuilt in full on every update; five of them blocked the page for seconds and slowed the load
generator on a 2-core machine (issue 11, ``benchmarks/bench_live.py``).

Headless (``WORKBENCH_HEADLESS=1``, which ``workbench run`` sets) no live chart is created at all:
the same cells print a progress line now and then and leave the same static figures.

Static figures carry two representations: plotly's own mimetype (JupyterLab draws it, trusted or
not) and HTML for nbconvert; plotly.js is embedded in the first one of the kernel session only, so
an exported page stays offline and holds plotly.js once.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from workbench.check import checker
from workbench.check.excess import BinnedExcess
from workbench.check.live import LiveStats
from workbench.check.overload import ROUTER
from workbench.history import Recording
from workbench.spec.scenario import Scenario
from workbench.ui import charts
from workbench.ui.live_chart import LiveChart
from workbench.ui.report import bundle_kind, figures_for, health_intervals, plotly_bundle

__all__ = [
    "HEADLESS_ENV",
    "WALL_ENV",
    "LiveDashboard",
    "figure_bundle",
    "headless",
    "run_with_dashboard",
    "show_figure",
    "show_html",
    "summary_html",
    "table_html",
]

HEADLESS_ENV = "WORKBENCH_HEADLESS"  # "1": no live chart widget (papermill / CI)
WALL_ENV = "WORKBENCH_WALL"  # "1": a wall screen (``workbench dashboard``): the run goes on after its cell
_background: set[asyncio.Task[Any]] = set()  # wall-screen runs in progress (a reference keeps each alive)
_state = {"plotlyjs": ""}  # per kernel: which plotly.js the static figures embedded so far ("", basic, full)


def wall_screen() -> bool:
    """True under ``workbench dashboard`` (Voila shows a page once its cells ran: the run must not block)."""
    return os.environ.get(WALL_ENV, "").strip() not in ("", "0", "false", "no")


def headless() -> bool:
    """True when no one watches: live chart widgets would only bloat the saved notebook."""
    return os.environ.get(HEADLESS_ENV, "").strip() not in ("", "0", "false", "no")


# ----------------------------------------------------------------------------- static output
def figure_bundle(fig: go.Figure) -> dict[str, Any]:
    """A display bundle for one figure: plotly mimetype, offline HTML, text.

    The HTML embeds plotly.js in the first figure of the kernel session only: plotly's basic bundle
    (1.2 MB) while every figure can use it, the full one (4.6 MB) once a figure needs more (a later
    script replaces ``window.Plotly``; figures drawn before stay drawn).
    """
    need = bundle_kind([fig])
    script = ""
    if _state["plotlyjs"] == "" or (_state["plotlyjs"] == "basic" and need == "full"):
        _state["plotlyjs"] = need
        script = f"<script type='text/javascript'>{plotly_bundle([fig])}</script>"
    div = pio.to_html(fig, include_plotlyjs=False, full_html=False, config={"displaylogo": False, "responsive": True})
    title = fig.layout.title.text or "figure"
    return {"application/vnd.plotly.v1+json": json.loads(pio.to_json(fig, validate=False)),
            "text/html": script + div, "text/plain": f"<plotly figure: {title}>"}


def show_figure(fig: go.Figure) -> None:
    """Display a static, offline figure (survives headless runs and HTML export)."""
    from IPython.display import display

    display(figure_bundle(fig), raw=True)


def show_html(markup: str, text: str = "") -> None:
    from IPython.display import display

    display({"text/html": markup, "text/plain": text or _strip_tags(markup)}, raw=True)


def _strip_tags(markup: str) -> str:
    out, inside = [], False
    for ch in markup:
        if ch == "<":
            inside = True
        elif ch == ">":
            inside = False
            out.append(" ")
        elif not inside:
            out.append(ch)
    return " ".join("".join(out).split())


def _fmt(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}"
    return f"{value}{unit}"


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain HTML table of dict rows (values formatted, escaped)."""
    if not rows:
        return "<p><i>no rows</i></p>"
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def summary_html(summary: Mapping[str, Any], *, complete: bool = True, incomplete_reason: str = "",
                 title: str = "") -> str:
    """The verdict and the checker's figures of one run as HTML."""
    lat, fo = summary.get("latency_ms") or {}, summary.get("failover_ms") or {}
    ok = bool(summary.get("invariants_ok")) and complete
    rows = [
        ("throughput", _fmt(summary.get("throughput_rps"), " req/s")),
        ("latency p50 / p95 / p99",
         f"{_fmt(lat.get('p50'))} / {_fmt(lat.get('p95'))} / {_fmt(lat.get('p99'))} ms"),
        ("admitted vs limit envelope",
         f"{_fmt(summary.get('admitted_tokens'))} / {_fmt(summary.get('envelope_tokens'))} tokens"),
        ("over-admission", _fmt(summary.get("over_admission_pct"), " %")),
        ("worst window excess", _fmt(summary.get("worst_window_excess_tokens"), " tokens")),
        ("failover p50 / p99 / max", f"{_fmt(fo.get('p50'))} / {_fmt(fo.get('p99'))} / {_fmt(fo.get('max'))} ms"),
        ("token loss", _fmt(summary.get("token_loss"))),
        ("client errors", _fmt(summary.get("client_errors"))),
        ("cut at the run's end (not judged)", _fmt((summary.get("errors") or {}).get("cut_at_end"))),
        ("convergence after heal", _fmt(summary.get("convergence_ms"), " ms")),
        ("requests", _fmt(summary.get("requests"))),
    ]
    verdict = ("<b style='color:#15803d'>every invariant held</b>" if ok
               else "<b style='color:#b91c1c'>FAILED</b>")
    if not complete:
        verdict += f" — incomplete: {html.escape(incomplete_reason or 'stopped early')}"
    reasons = "".join(f"<li>{html.escape(str(r))}</li>" for r in summary.get("reasons") or [])
    body = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{html.escape(v)}</td></tr>"
                   for k, v in rows)
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    return (f"{head}<p>{verdict}</p>" + (f"<ul>{reasons}</ul>" if reasons else "")
            + f"<table>{body}</table>")


# ----------------------------------------------------------------------------- live dashboard
class LiveDashboard:
    """Widgets fed by ``run_drill``'s ``on_progress``; :meth:`finish` leaves static figures.

    ``live=None`` picks live charts unless :func:`headless`.  ``charts=False`` shows only the
    progress bar, Stop button and node table (for sweeps of many short runs).  Chart updates are
    throttled to one per ``min_update_s``; the progress bar follows every callback.
    """

    def __init__(self, scenario: Scenario, *, live: bool | None = None, charts: bool = True,
                 min_update_s: float = 0.45, title: str = "") -> None:
        import ipywidgets as w

        self.scenario = scenario
        self.title = title or scenario.name
        self.nodes = list(scenario.topology.node_ids)
        self.processes = [ROUTER, *self.nodes]  # where the drill scrapes in-flight and queue depth
        self.node_region = {n: scenario.topology.region_of(n) for n in self.nodes}
        self.duration_s = scenario.duration_s
        self.live = (not headless()) if live is None else live
        self.show_charts = charts
        self.min_update_s = min_update_s
        self.stop_event = asyncio.Event()
        self.stop_hook: Any = None  # set when the drill runs on another thread's loop
        self.updates = 0  # progress callbacks seen
        self.chart_updates = 0  # times the charts were redrawn
        self.finished = False
        self._last_chart = -math.inf
        self._last_print = -math.inf
        self._handle: Any = None
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="0.0 s",
                                        layout=w.Layout(width="320px"))
        self.status = w.HTML(value=f"<b>{html.escape(self.title)}</b>: starting the cluster ...")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop",
                                    tooltip="end the run now; results are kept and marked incomplete")
        self.stop_button.on_click(lambda _b: self.stop())
        self.health = w.HTML(value=self._health_html({}, {}))
        self.status.add_class("wb-status")
        self.chart: LiveChart | None = None
        self._sent_bins = 0  # complete bins of the run clock already sent to the chart
        self._markers = (0, 0)  # faults, ejections drawn as markers so far
        limit = scenario.limits[0]
        self._excess = BinnedExcess(limit.rate, limit.burst)
        self.allowance_tokens = limit.rate * checker.default_slack_s(scenario)
        if self.live and charts:
            self.chart = LiveChart(self._panels(list(scenario.topology.regions), self.nodes), x_max=self.duration_s)
        rows = [w.HBox([self.progress, self.stop_button, self.status]), self.health]
        if self.chart is not None:
            rows.append(self.chart)
        self.box = w.VBox(rows)

    # ------------------------------------------------------------------ lifecycle
    def display(self) -> LiveDashboard:
        from IPython.display import display

        self._handle = display(self.box, display_id=True)
        return self

    def stop(self) -> None:
        """What the Stop button does: end the run cleanly (results kept, marked incomplete)."""
        if self.stop_hook is not None:
            self.stop_hook()
        else:
            self.stop_event.set()
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping"

    def __call__(self, snapshot: dict[str, Any], live: LiveStats) -> None:
        self.on_progress(snapshot, live)

    def on_progress(self, snapshot: dict[str, Any], live: LiveStats) -> None:
        """``run_drill``'s progress callback: cheap widgets every time, charts when due."""
        if self.finished:
            return
        self.updates += 1
        t_s = float(snapshot.get("t_s", 0.0))
        self.progress.value = float(snapshot.get("progress", 0.0))
        left = max(0.0, self.duration_s - t_s)
        self.progress.description = f"{t_s:.1f} s"
        p99 = snapshot.get("p99_ms")
        router = snapshot.get("router") or {}
        line = (f"{left:.1f} s left · ok {snapshot.get('admitted_rps', 0):.0f}/s · 429 "
                f"{snapshot.get('denied_rps', 0):.0f}/s · shed {snapshot.get('shed_rps', 0):.0f}/s · other err "
                f"{snapshot.get('other_errors_rps', 0):.0f}/s · p99 "
                f"{'-' if p99 is None else f'{p99:.0f} ms'} · tokens {snapshot.get('admitted_tokens', 0)}"
                f"/{snapshot.get('envelope_tokens', 0):.0f}"
                + (f" · router in-flight {router['inflight']:.0f}" if router.get("inflight") is not None else "")
                + (" · ROUTER IN PANIC" if router.get("panic") else "")
                + (f" · ejections {snapshot['ejections']}" if snapshot.get("ejections") else "")
                + "".join(f" · failover {k} {v:.0f} ms" for k, v in (snapshot.get("failover_ms") or {}).items()))
        self.status.value = f"<b>{html.escape(self.title)}</b>: {html.escape(line)}"
        now = time.monotonic()
        if not self.live and now - self._last_print >= 2.0:  # headless: a line in the run's log
            self._last_print = now
            print(f"[{self.title}] {t_s:5.1f} s  {line}", file=sys.stdout, flush=True)
        if now - self._last_chart < self.min_update_s:
            return
        self._last_chart = now
        self.health.value = self._health_html(snapshot.get("node_states") or {},
                                              self._network_states(live, t_s),
                                              snapshot.get("out_of_rotation") or {})
        if self.chart is not None:
            self._extend_chart(live, t_s)

    def finish(self, result: Any, *, keep_widgets: bool = False) -> None:
        """Close the live widgets and leave the final state as static figures and the summary.

        ``keep_widgets`` (a wall screen, where the run ends after its cell did and new outputs are not
        shown): the verdict goes into the status widget and the live chart stays, frozen at the end.
        """
        self.finished = True
        rec: Recording = result.recording
        title = self.title + ("" if rec.complete else " (incomplete)")
        header = summary_html(result.summary, complete=rec.complete, incomplete_reason=rec.incomplete_reason,
                              title=title)
        header += f"<p style='color:#6b7280'>results: {html.escape(str(result.results_dir))}</p>"
        if keep_widgets:
            self.progress.value = 1.0
            self.stop_button.layout.display = "none"
            self.status.value = f"<b>{html.escape(title)}</b>: finished"
            self.health.value = header  # a full-width row above the chart
            return
        self._close_widgets(header)
        if self.show_charts:
            for _kind, fig in figures_for(rec, result.summary):
                show_figure(fig)

    def abort(self, error: BaseException) -> None:
        """The run raised: close the widgets and say why."""
        self.finished = True
        self._close_widgets(f"<p><b style='color:#b91c1c'>{html.escape(self.title)}: run failed</b>: "
                            f"{html.escape(error.__class__.__name__)}: {html.escape(str(error))}</p>")

    def _close_widgets(self, markup: str) -> None:
        bundle = {"text/html": markup, "text/plain": _strip_tags(markup)}
        if self._handle is not None:
            self._handle.update(bundle, raw=True)
        else:
            show_html(markup)
        for widget in _descendants(self.box):
            widget.close()
        self.chart = None

    # ------------------------------------------------------------------ drawing (no computing)
    def _network_states(self, live: LiveStats, t_s: float) -> dict[str, str]:
        spans = health_intervals(Recording(faults=list(live.faults)), self.nodes, self.node_region, t_s)
        return {n: (s[-1][2] if s else "up") for n, s in spans.items()}

    def _health_html(self, processes: Mapping[str, str], network: Mapping[str, str],
                     out_of_rotation: Mapping[str, str] | None = None) -> str:
        """One cell per node: its process and network state, and the router's view when it took the
        node out of rotation (``out: <evidence>``)."""
        colors = {"up": "#16a34a", "running": "#16a34a", "paused": "#d97706", "killed": "#dc2626",
                  "partitioned": "#9333ea", "stopped": "#6b7280", "exited": "#dc2626"}
        cells = []
        for node in self.nodes:
            proc = processes.get(node, "-")
            net = network.get(node, "up")
            state = net if net != "up" else ("up" if proc in ("running", "-") else proc)
            color = colors.get(state, "#6b7280")
            router = (out_of_rotation or {}).get(node)
            view = f" <small style='color:#b91c1c'>router: {html.escape(router)}</small>" if router else ""
            cells.append(f"<td style='padding:2px 8px'><span style='color:{color}'>&#9679;</span> "
                         f"{html.escape(node)} <small>{html.escape(state)}</small>{view}</td>")
        return "<table><tr>" + "".join(cells) + "</tr></table>"

    @staticmethod
    def _panels(regions: Sequence[str], nodes: Sequence[str] = ()) -> list[dict[str, Any]]:
        throughput = []
        for i, region in enumerate(regions):
            color = charts.REGION_COLORS[i % len(charts.REGION_COLORS)]
            throughput += [{"id": f"admitted:{region}", "name": region, "color": color, "dash": "solid"},
                           {"id": f"denied:{region}", "name": "429", "color": color, "dash": "dash", "width": 1,
                            "legend": False},
                           {"id": f"errors:{region}", "name": "errors", "color": color, "dash": "dot", "width": 2.5,
                            "legend": False}]
        return [
            {"title": "Throughput by client home region (req/s)", "series": throughput, "ymin": 0,
             "note": "solid admitted · dashed 429 · dotted errors"},
            {"title": "Latency from intended send time (ms)", "ymin": 0, "series": [
                {"id": "p50", "name": "p50", "color": "#2563eb", "dash": "solid"},
                {"id": "p95", "name": "p95", "color": "#d97706", "dash": "dash"},
                {"id": "p99", "name": "p99", "color": "#dc2626", "dash": "dot"}]},
            {"title": "Excess over the limit envelope (tokens; > 0 is over-admission)", "series": [
                {"id": "excess", "name": "worst window ending here", "color": "#2563eb", "dash": "solid", "width": 2},
                {"id": "allowance", "name": "checker's allowance", "color": "#dc2626", "dash": "dash"}]},
            *_overload_panels(nodes),
        ]

    def _extend_chart(self, live: LiveStats, t_s: float) -> None:
        """Send the bins completed since the last update (the current bin is still filling)."""
        assert self.chart is not None
        ejections = getattr(live, "ejections", [])
        if (len(live.faults), len(ejections)) != self._markers:
            self._markers = (len(live.faults), len(ejections))
            colors = charts.FAULT_COLORS
            self.chart.markers = [[f.t_s, f"{f.action} {f.target}".strip(), colors.get(f.action, "#6b7280")]
                                  for f in live.faults] + _ejection_markers(ejections)
        series = live.series(max(t_s, live.bin_s))
        done = min(len(series["t_s"]), int(t_s / live.bin_s))
        first = self._sent_bins
        if done <= first:
            return
        self._sent_bins = done
        cut = slice(first, done)
        values: dict[str, list[Any]] = {}
        for kind in ("admitted", "denied", "errors"):
            for region, column in series[f"{kind}_rps"].items():
                values[f"{kind}:{region}"] = column[cut]
        for pct in ("p50", "p95", "p99"):
            values[pct] = series[f"{pct}_ms"][cut]
        values["excess"] = self._excess.extend(series["t_s"][cut], series["admitted_tokens"][cut],
                                               series["envelope_tokens"][cut])
        values["allowance"] = [self.allowance_tokens] * (done - first)
        for key in ("offered", "served", "shed", "limited", "other_errors"):
            values[key] = series[f"{key}_rps"][cut]
        blank = [None] * (done - first)
        for kind, rows in series["processes"].items():
            for proc in self.processes:
                values[f"{kind}:{proc}"] = rows[proc][cut] if proc in rows else blank
        for node in self.nodes:
            row = series["health_check_ms"].get(node)
            values[f"check:{node}"] = row[cut] if row else blank
        self.chart.extend(series["t_s"][cut], values)
        self.chart_updates += 1


OVERLOAD_PANEL = 5  # the index of the health-check panel, where ejections are drawn as markers
_MAX_EJECTION_MARKERS = 60  # the latest ones: a flapping node must not bury the chart in labels


def _overload_panels(nodes: Sequence[str]) -> list[dict[str, Any]]:
    """The three overload panels: outcomes per second, in-flight and queue per process, health checks."""
    colors = {n: charts.REGION_COLORS[i % len(charts.REGION_COLORS)] for i, n in enumerate(nodes)}
    colors[ROUTER] = "#111827"
    procs = []
    for proc in [ROUTER, *nodes]:
        procs += [{"id": f"inflight:{proc}", "name": proc, "color": colors[proc], "dash": "solid"},
                  {"id": f"queue:{proc}", "name": "queue", "color": colors[proc], "dash": "dot", "legend": False}]
    return [
        {"title": "Offered vs served vs shed (req/s)", "ymin": 0,
         "note": "offered by send time, the others by answer time", "series": [
             {"id": "offered", "name": "offered", "color": "#6b7280", "dash": "dash"},
             {"id": "served", "name": "served (2xx)", "color": "#16a34a", "dash": "solid", "width": 2},
             {"id": "shed", "name": "shed (quick 503)", "color": "#d97706", "dash": "solid"},
             {"id": "limited", "name": "limited (429)", "color": "#2563eb", "dash": "dot"},
             {"id": "other_errors", "name": "other errors", "color": "#dc2626", "dash": "dot", "width": 2.5}]},
        {"title": "In-flight and queued requests per process", "ymin": 0, "series": procs,
         "note": "solid in-flight · dotted queue"},
        {"title": "Router's health checks (mean ms per scrape)", "ymin": 0,
         "note": "markers: ejections and their reasons",
         "series": [{"id": f"check:{n}", "name": n, "color": colors[n], "dash": "solid"} for n in nodes]},
    ]


def _ejection_markers(ejections: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """The latest ejections as markers on the health-check panel: who, why, and whether the cap refused."""
    out = []
    for e in list(ejections)[-_MAX_EJECTION_MARKERS:]:
        times = f" x{e['count']}" if e["count"] > 1 else ""
        label = (f"kept {e['node']} (cap): {e['reason']}" if e["refused"] else f"ejected {e['node']}: {e['reason']}")
        out.append([e["t_s"], label + times, "#9ca3af" if e["refused"] else "#dc2626", OVERLOAD_PANEL])
    return out


def _descendants(widget: Any) -> list[Any]:
    """A widget and every widget inside it (children first), to close them all."""
    out: list[Any] = []
    for child in getattr(widget, "children", ()):
        out += _descendants(child)
    return [*out, widget]


async def run_with_dashboard(scenario: Scenario, results_dir: str | os.PathLike[str] | None = None, *,
                             live: bool | None = None, charts: bool = True, title: str = "",
                             progress_interval_s: float = 0.25, **thresholds: Any) -> Any:
    """Run ``scenario`` with a live dashboard; leave static figures and the summary; return the result.

    ``thresholds`` go to ``run_drill`` (``max_failover_ms``, ``max_client_errors``).  The dashboard's
    Stop button (or interrupting the kernel) ends the run early: every process is reaped and the result
    is marked incomplete.  A run that raises closes the widgets, says why and re-raises.

    The drill runs in a process of its own (:class:`~workbench.drill_worker.DrillProcess`): redrawing
    the charts holds the kernel's interpreter for tens of milliseconds at a time, which would otherwise
    stall the load generator and the fault proxies and distort the figures being drawn.

    On a wall screen (:func:`wall_screen`) the run goes on in the background and this returns its
    ``asyncio.Task`` at once: Voila shows the page only when every cell has run.
    """
    from workbench.run.drill_worker import DrillProcess

    dashboard = LiveDashboard(scenario, live=live, charts=charts, title=title).display()
    drill = DrillProcess(scenario, results_dir, progress_interval_s=progress_interval_s, **thresholds)
    dashboard.stop_hook = drill.stop
    wall = wall_screen()

    async def run() -> Any:
        try:
            result = await drill.run(dashboard.on_progress)
        except BaseException as exc:
            dashboard.abort(exc)
            raise
        dashboard.finish(result, keep_widgets=wall)
        return result

    if wall:
        task = asyncio.ensure_future(run())
        _background.add(task)
        task.add_done_callback(_background.discard)
        return task
    return await run()
