"""Run every benchmark in turn (one at a time: they would disturb each other's figures), then write
one HTML report with every chart at benchmarks/results/report.html (report-quick.html for --quick).

Each script runs in its own process and cleans up its own children; a script that overruns its time
budget gets SIGTERM (its cleanup runs), then SIGKILL.  plotly.js is embedded once in the report.

Targets are reported, never failed on (benchmarks/README.md, "Targets"): every script's targets go to
benchmarks/results/targets.json (targets-quick.json), and only a full run prints their summary.  This
exits non-zero only when a script really failed: it crashed, overran its budget, or wrote no valid
results file.

Usage: .venv/bin/python benchmarks/run_all.py [--quick] [--only bench_redis.py,...] [--report-only] [--lock FILE]

``--lock FILE`` holds an exclusive ``flock`` on FILE while each script runs (not between scripts), so other
benchmark runs on a shared machine that take the same lock wait for the script in progress instead of
disturbing it, and the whole run still goes through in one command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import html
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))

from benchmarks._targets import classify, summary_table  # noqa: E402

# script -> (results name, time budget s full, time budget s quick)
BENCHMARKS: dict[str, tuple[str, int, int]] = {
    "bench_core.py": ("bench_core", 300, 60),
    "bench_node.py": ("bench_node", 300, 60),
    "bench_accuracy.py": ("bench_accuracy", 240, 60),
    "bench_memory.py": ("bench_memory", 180, 60),
    "bench_proxy.py": ("proxy", 180, 40),
    "bench_loadgen.py": ("loadgen", 240, 40),
    "bench_ceiling.py": ("bench_ceiling", 300, 60),
    "bench_redis.py": ("bench_redis", 300, 90),
    "bench_outage.py": ("bench_outage", 300, 120),
    "bench_capacity.py": ("bench_capacity", 900, 90),
    "bench_reference.py": ("bench_reference", 300, 90),
    "bench_scale.py": ("bench_scale", 600, 90),
    "bench_staleness.py": ("bench_staleness", 480, 90),
    "bench_failover.py": ("failover", 360, 90),
    "bench_report.py": ("report_render", 240, 60),
    "bench_simulate.py": ("simulate", 300, 60),
    "bench_blackhole.py": ("blackhole", 300, 120),
    "bench_overload.py": ("overload", 900, 150),
    "bench_audit.py": ("bench_audit", 900, 120),
    "bench_strict_core.py": ("bench_strict_core", 300, 90),
    "bench_strict_node.py": ("strict_node", 300, 90),
    "bench_live.py": ("live", 300, 120),
    "bench_shed.py": ("shed", 300, 60),
    "bench_heap_churn.py": ("bench_heap_churn", 300, 60),
    "bench_audit_backlog.py": ("bench_audit_backlog", 300, 120),
    # a script run again in another mode: the key is the command line after the interpreter
    "bench_audit.py --replication": ("bench_audit_replication", 300, 120),
    "bench_audit.py --soak 1800": ("bench_audit_soak", 2100, 120),
}

# Run by ``make bench`` only: their quick modes take minutes of their own (drills past capacity, a soak,
# JupyterLab in a browser), which ``make test`` cannot afford; each has its own tests under tests/.
FULL_ONLY = {"bench_blackhole.py", "bench_overload.py", "bench_audit.py", "bench_strict_core.py",
             "bench_strict_node.py", "bench_live.py", "bench_shed.py", "bench_heap_churn.py",
             "bench_audit_backlog.py", "bench_audit.py --replication", "bench_audit.py --soak 1800"}


# extra arguments in quick mode, to keep the whole quick run near 4 minutes on 2 busy cores (253 s measured)
QUICK_ARGS: dict[str, list[str]] = {
    "bench_core.py": ["--keys", "20000", "--decisions", "50000", "--repeats", "1"],
    "bench_node.py": ["--duration", "1"],
    "bench_accuracy.py": ["--duration", "3"],
    "bench_report.py": ["--opens", "1", "--duration-s", "4"],
}


# extra arguments in full mode (the rows the README quotes were measured with them)
FULL_ARGS: dict[str, list[str]] = {
    "bench_core.py": ["--repeats", "2"],
    "bench_node.py": ["--duration", "6", "--repeats", "4"],
    "bench_accuracy.py": ["--duration", "20"],
    "bench_loadgen.py": ["--tries", "1"],
    "bench_audit_backlog.py": ["--warm", "15", "--stall", "30", "--after", "15"],
    "bench_audit.py --replication": ["--rounds", "4", "--duration", "10"],
}


def results_path(name: str, quick: bool) -> Path:
    return RESULTS / f"{name}{'-quick' if quick else ''}.json"


@contextlib.contextmanager
def held(lock: Path | None) -> Any:
    """An exclusive flock on ``lock`` for the block (nothing when None): other runs taking it wait."""
    if lock is None:
        yield
        return
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
            time.sleep(2.0)  # flock is not fair: without a pause we would take it back before a waiter wakes


def run_one(script: str, args: list[str], budget: int) -> int:
    """Run one benchmark with a time budget; SIGTERM then SIGKILL when it overruns or we are stopped."""
    path, *fixed = script.split()  # a key may carry the script's mode ("bench_audit.py --soak 1800")
    proc = subprocess.Popen([sys.executable, str(HERE / path), *fixed, *args], cwd=HERE.parent)
    try:
        return proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        print(f"{script}: over its {budget} s budget, stopping it", file=sys.stderr, flush=True)
        return 124
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


# ------------------------------------------------------------------------------------ report


def _derived_charts(name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Charts for results files that do not carry their own (the older benchmarks)."""
    import plotly.graph_objects as go

    from benchmarks._plots import fig_json

    figs = doc.get("figures", {})
    out: dict[str, Any] = {}
    if name == "bench_node" and "summary" in figs:
        s = figs["summary"]
        fig = go.Figure(go.Bar(x=list(s), y=[v["requests_per_s"] for v in s.values()],
                               text=[f"p99 {v['p99_ms']:.1f} ms" for v in s.values()], textposition="outside"))
        fig.update_layout(title="One node vs hello-world (wrk)", yaxis_title="req/s", template="plotly_white")
        out["node"] = fig_json(fig)
    if name == "failover" and isinstance(doc.get("figure"), str):
        out["failover"] = json.loads(doc["figure"])
    if name == "bench_accuracy" and "scenarios" in figs:
        fig = go.Figure()
        for sc, r in figs["scenarios"].items():
            fig.add_scatter(y=r.get("admitted_per_second_audit", []), name=sc)
        fig.add_hline(y=figs.get("R", 100), line_dash="dash", annotation_text="R")
        fig.update_layout(title="Admitted tokens per second (audit), 3 nodes at 2x load", xaxis_title="second",
                          yaxis_title="tokens/s", template="plotly_white")
        out["accuracy"] = fig_json(fig)
    return out


def _reference_table(doc: dict[str, Any]) -> str:
    rows = doc.get("figures", {}).get("rows", [])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(k)))}</td>" for k in ("row", "reference", "target", "ours"))
        + f"<td>{'-' if r.get('met') is None else ('PASS' if r['met'] else 'MISS')}</td></tr>" for r in rows)
    return ("<table><tr><th>row</th><th>reference</th><th>target</th><th>ours</th><th>met</th></tr>"
            f"{body}</table>") if rows else ""


def write_report(quick: bool) -> Path:
    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    parts = [f"<h1>Rating Edge benchmarks{' (quick)' if quick else ''}</h1>",
             f"<p class='muted'>written {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}; figures from one "
             "shared 2-core machine are ratios first: compare rows measured in one batch.</p>"]
    chart_id = 0
    for script, (name, _full, _quick) in BENCHMARKS.items():
        path = results_path(name, quick)
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if not path.exists():
            parts.append(f"<p class='bad'>no results ({html.escape(path.name)} missing)</p>")
            continue
        try:
            doc = json.loads(path.read_text())
        except ValueError as exc:
            parts.append(f"<p class='bad'>unreadable results: {html.escape(str(exc))}</p>")
            continue
        mach = doc.get("machine", {})
        load = mach.get("load_average_1_5_15") or doc.get("load_average")
        what = f"{doc.get('command', script)} — {doc.get('date', '')} — load average {load}"
        parts.append(f"<p class='muted'>{html.escape(what)}</p>")
        if name == "bench_reference":
            parts.append(_reference_table(doc))
        charts = dict(doc.get("charts") or {}) | _derived_charts(name, doc)
        for chart in charts.values():
            chart_id += 1
            fig = pio.from_json(json.dumps(chart))
            parts.append("<div class='card'>" + pio.to_html(fig, include_plotlyjs=False, full_html=False,
                                                             div_id=f"chart-{chart_id}",
                                                             config={"displaylogo": False, "responsive": True})
                         + "</div>")
        figures = {k: v for k, v in (doc.get("figures") or doc).items() if k not in ("runs", "charts")}
        text = json.dumps(figures, indent=1, default=str)
        if len(text) > 60_000:
            text = text[:60_000] + "\n... (see the JSON file)"
        parts.append(f"<details><summary>figures</summary><pre>{html.escape(text)}</pre></details>")
    css = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}.muted{color:#6b7280}"
           ".bad{color:#dc2626}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px}"
           ".card{margin:1em 0}pre{font-size:11px;max-height:400px;overflow:auto}")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Rating Edge benchmarks</title>"
            f"<style>{css}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>")
    out = RESULTS / f"report{'-quick' if quick else ''}.html"
    out.write_text(page, encoding="utf-8")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark in its quick mode (about 4 minutes)")
    parser.add_argument("--only", default="", help="comma-separated scripts to run (default: all)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the HTML report")
    parser.add_argument("--lock", type=Path, default=None,
                        help="hold an exclusive flock on this file while each script runs (shared machines)")
    args = parser.parse_args()

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    wanted = [s for s in args.only.split(",") if s] or [s for s in BENCHMARKS if not (args.quick and s in FULL_ONLY)]
    unknown = [s for s in wanted if s not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    started = time.time()
    runs: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    if not args.report_only:
        with contextlib.suppress(OSError):
            print(f"load average before: {os.getloadavg()}", flush=True)
        for script in wanted:
            name, full, quick = BENCHMARKS[script]
            t = time.time()
            extra = ["--quick", *QUICK_ARGS.get(script, [])] if args.quick else FULL_ARGS.get(script, [])
            print(f"\n=== {script} {' '.join(extra)}", flush=True)
            with held(args.lock):
                t = time.time()  # the script's own time, not the wait for the lock
                rc = run_one(script, extra, quick if args.quick else full)
            timings[script] = round(time.time() - t, 1)
            status, why, targets = classify(rc, results_path(name, args.quick), t)
            runs[script] = {"status": status, "exit_code": rc, "why": why, "seconds": timings[script],
                            "results": results_path(name, args.quick).name, "targets": targets}
            if status == "failed":
                print(f"{script}: FAILED ({why})", file=sys.stderr, flush=True)
    report = write_report(args.quick)
    print(f"\ntimings (s): {json.dumps(timings)}; total {time.time() - started:.0f} s")
    print(f"report: {report}")
    failed = [s for s, r in runs.items() if r["status"] == "failed"]
    if runs:
        path = write_targets(runs, args.quick, started)
        if args.quick:  # a quick run says nothing about the figures: they are not worth reading
            print(f"targets: see {path.name} (only a full run prints them)")
        else:
            from benchmarks._procs import table

            print("\ntargets (reported, never failed on):\n" + summary_table(runs, table))
            print(f"-> {path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def write_targets(runs: dict[str, dict[str, Any]], quick: bool, started: float) -> Path:
    """Every script's status and targets of this run, in one results file."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"targets{'-quick' if quick else ''}.json"
    for run in runs.values():
        run.setdefault("date", dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"))
    if len(runs) < len(BENCHMARKS):  # an --only run updates its scripts' rows and keeps the others' (dated)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            runs = {**json.loads(path.read_text(encoding="utf-8")).get("runs", {}), **runs}
    doc = {"benchmark": "targets", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
           "command": " ".join([".venv/bin/python", "benchmarks/run_all.py", *sys.argv[1:]]), "quick": quick,
           "elapsed_s": round(time.time() - started, 1),
           "met": sum(1 for r in runs.values() for t in r["targets"] if t.get("met") is True),
           "missed": sum(1 for r in runs.values() for t in r["targets"] if t.get("met") is False),
           "failed": [s for s, r in runs.items() if r["status"] == "failed"], "runs": runs}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    sys.exit(main())
