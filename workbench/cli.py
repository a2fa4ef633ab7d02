"""``workbench`` command line: ``demo``, ``drill``, ``report`` (and ``run`` for notebooks).

``workbench demo`` is the main job: a 3-region cluster and the router on loopback, open-loop load at
1.5x the global limit from clients in every region, the busiest region killed at 10 s and restarted at
20 s, 30 s in all; a live progress line, a summary table, a results folder and an HTML report.  Exit
status 0 only when every invariant held; 1 when one did not; 2 for bad arguments; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from workbench.spec.parameters import PARAMETERS, check_strict
from workbench.spec.scenario import Scenario, ScenarioError

__all__ = ["main"]

DEMO = {"name": "demo", "duration_s": 30.0, "rate": 100.0, "burst": 100.0, "load_rps": 150.0,
        "tenants": 1, "route": "invoke", "arrival": "poisson", "region_weights": "eu=3,us=2,ap=1",
        "kill_region_at_s": 10.0, "restart_region_at_s": 20.0, "skill_median_ms": 20.0, "skill_p99_ms": 120.0}
DEMO_MAX_FAILOVER_MS = 800.0  # the reference case study's claim; our target is far below
# The demo kills a region under load on the invoke route: the skill calls in flight on it fail (a skill
# call is not idempotent, so the router does not run it twice), a handful in ~4,400 requests.  The demo
# states a 0.5 % budget for them (printed in its summary); --error-budget overrides it.
DEMO_ERROR_BUDGET_PCT = 0.5


class Progress:
    """One refreshing status line on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._last_plain = 0.0

    def __call__(self, snap: dict[str, Any], _live: Any) -> None:
        width = 24
        done = int(snap["progress"] * width)
        bar = "#" * done + "-" * (width - done)
        states = snap["node_states"]
        down = [n for n, s in states.items() if s not in ("running",)]
        p99 = snap["p99_ms"]
        line = (f"[{bar}] {snap['t_s']:5.1f}s  ok {snap['admitted_rps']:6.1f}/s  429 {snap['denied_rps']:6.1f}/s  "
                f"err {snap['errors_rps']:5.1f}/s  p99 {'-' if p99 is None else f'{p99:.0f}'}ms  "
                f"tokens {snap['admitted_tokens']}/{snap['envelope_tokens']:.0f}"
                + (f"  down: {','.join(down)}" if down else "")
                + "".join(f"  failover {k} {v:.0f}ms" for k, v in snap["failover_ms"].items()))
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
        elif time.monotonic() - self._last_plain > 5:
            self._last_plain = time.monotonic()
            print(line, file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}{unit}"
    return f"{value}{unit}"


def summary_table(summary: dict[str, Any]) -> str:
    lat, fo = summary.get("latency_ms", {}), summary.get("failover_ms", {})
    rows = [
        ("throughput", _fmt(summary.get("throughput_rps"), " req/s")),
        ("latency p50 / p95 / p99", f"{_fmt(lat.get('p50'))} / {_fmt(lat.get('p95'))} / {_fmt(lat.get('p99'))} ms"),
        ("admitted vs limit",
         f"{_fmt(summary.get('admitted_tokens'))} / {_fmt(summary.get('envelope_tokens'))} tokens"),
        ("over-admission", _fmt(summary.get("over_admission_pct"), " %")),
        ("failover p50 / p99 / max", f"{_fmt(fo.get('p50'))} / {_fmt(fo.get('p99'))} / {_fmt(fo.get('max'))} ms"),
        ("token loss", _fmt(summary.get("token_loss"))),
        ("client errors", f"{_fmt(summary.get('client_errors'))} ({_fmt(summary.get('retried_errors'))} of "
         f"{_fmt(summary.get('retried_requests'))} requests the router retried)"),
        ("errors vs budget", f"{_fmt((summary.get('errors') or {}).get('rate_pct'))} % of "
         f"{_fmt(summary.get('requests'))} requests (budget {_fmt(summary.get('error_budget_pct'))} %)"),
        ("convergence after heal", _fmt(summary.get("convergence_ms"), " ms")),
        ("load generator", ("on schedule" if summary.get("generator_valid") is not False else "BEHIND SCHEDULE")
         + f" (own lag p99 {_fmt(summary.get('generator_lag_p99_ms'))} ms)"),
        ("invariants", "held" if summary.get("invariants_ok") else "VIOLATED"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    for reason in summary.get("reasons", []):
        lines.append(f"  ! {reason}")
    return "\n".join(lines)


def _use_uvloop() -> None:
    """The load generator keeps its schedule to twice the rate on uvloop (benchmarks/bench_loadgen.py)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _parse_value(text: str) -> Any:
    """Flag values: JSON when it parses (numbers, null, lists, dicts), else the string itself."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


async def _run(scenario: Scenario, out: Path, report: Path | None, *, max_failover_ms: float | None,
               max_client_errors: int | None, quiet: bool, error_budget_pct: float | None = None) -> int:
    from workbench.run.drill import run_drill
    from workbench.ui.report import write_report

    progress = None if quiet else Progress()
    print(f"workbench: {scenario.name}: {len(scenario.topology.node_ids)} nodes in "
          f"{len(scenario.topology.regions)} regions, {scenario.mode} mode, {scenario.duration_s:g} s, "
          f"results in {out}", file=sys.stderr)
    try:
        result = await run_drill(scenario, out, on_progress=progress, max_failover_ms=max_failover_ms,
                                 max_client_errors=max_client_errors,
                                 **({} if error_budget_pct is None else {"error_budget_pct": error_budget_pct}))
    finally:
        if progress:
            progress.done()
    print(summary_table(result.summary))
    if report is not None:
        path = write_report([out], report, title=f"{scenario.name} — Rating Edge drill")
        print(f"report: {path}")
    print(f"results: {out}")
    return 0 if result.ok else 1


def _error_budget(text: str) -> float:
    """``--error-budget PCT``: a percentage of all requests in [0, 100]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100, got {text!r}") from None
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a percentage between 0 and 100, got {text!r}")
    return value


def _error_budget_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--error-budget", type=_error_budget, metavar="PCT",
                   help="fail when more than PCT %% of all requests are errors (default 0.1)")


def _drill_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--scenario", help="scenario file (TOML, YAML or JSON; flat parameters or nested form)")
    p.add_argument("--out", help="results folder (default: results/<name>-<time>)")
    p.add_argument("--json", dest="json_path", help="write the summary as JSON to this path")
    p.add_argument("--report", help="write the HTML report here (default: <out>/report.html)")
    p.add_argument("--max-failover-ms", type=float, help="fail when failover p99 exceeds this")
    p.add_argument("--max-client-errors", type=int, help="fail when client errors exceed this")
    _error_budget_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    group = p.add_argument_group("scenario parameters (override the file; see Scenario.build)")
    for param, (default, meaning) in PARAMETERS.items():
        group.add_argument(f"--{param.replace('_', '-')}", dest=f"p_{param}", metavar="V",
                           help=f"{meaning} (default {default!r})")
    return p


def _scenario_from(args: argparse.Namespace, base: dict[str, Any]) -> Scenario:
    params = dict(base)
    if args.scenario:
        file_scenario = Scenario.from_file(args.scenario)
        overrides = {k[2:]: _parse_value(v) for k, v in vars(args).items() if k.startswith("p_") and v is not None}
        if not overrides:
            check_strict(file_scenario)  # a nested file skips Scenario.build's checks
            return file_scenario
        raise ScenarioError("--scenario", "either a scenario file or parameter flags, not both")
    for key, value in vars(args).items():
        if key.startswith("p_") and value is not None:
            params[key[2:]] = _parse_value(value)
    return Scenario.build(**params)


def main(argv: list[str] | None = None) -> int:
    """The command line; a module missing from the install is one line naming what to install (exit 2)."""
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        from workbench.extras import missing_message

        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "")
        print(missing_message(command, exc), file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="Operations workbench for the Rating API Edge.")
    sub = parser.add_subparsers(dest="command", required=True)
    _drill_parser(sub, "demo", "the main job: 3 regions, 1.5x load, kill the busiest region at 10 s, restart at 20 s")
    _drill_parser(sub, "drill", "run any scenario from flags or a file")
    rep = sub.add_parser("report", help="one self-contained HTML dashboard from results folders")
    rep.add_argument("results", nargs="+", help="results folders (the first is the baseline)")
    rep.add_argument("-o", "--out", default="report.html")
    run = sub.add_parser("run", help="run a notebook headless (papermill) with parameters")
    run.add_argument("notebook")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    run.add_argument("-o", "--out")
    run.add_argument("--cell-timeout", type=int, default=600)
    run.add_argument("--html", action="store_true", help="also export the executed notebook to HTML")
    _error_budget_flag(run)
    from workbench.run.simulate import add_arguments as simulate_arguments

    simulate_arguments(sub.add_parser("simulate", help="the real limiter core on a simulated network in virtual "
                                      "time: random fault schedules, each judged against its bound"))
    from workbench.ui import dashboard

    dashboard.add_arguments(sub.add_parser("dashboard", help="serve a notebook with Voila: a live wall screen, "
                                           "no code cells (needs the notebooks extra)"))
    args = parser.parse_args(argv)
    if args.command == "dashboard":
        return dashboard.main(args)

    if args.command == "simulate":
        from workbench.run.simulate import main as simulate_main

        return simulate_main(args)

    if args.command == "report":
        from workbench.ui.report import ReportError, write_report

        try:
            path = write_report(args.results, args.out)
        except ReportError as exc:
            print(f"workbench report: {exc}", file=sys.stderr)
            return 2
        print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.command == "run":
        from workbench.run.notebooks import run_notebook_cli

        if args.error_budget is not None:  # the notebook's own parameter (refused if it has none)
            args.parameter.append(["error_budget_pct", repr(args.error_budget)])
        return run_notebook_cli(args)

    try:
        scenario = _scenario_from(args, DEMO if args.command == "demo" else {})
    except ScenarioError as exc:
        print(f"workbench {args.command}: {exc}", file=sys.stderr)
        return 2
    if scenario.faults_backend == "netns":
        from workbench.run.faults.netns import unavailable_reason

        if (why := unavailable_reason()) is not None:
            print(f"workbench {args.command}: scenario field 'faults_backend': 'netns' {why}; "
                  "use 'proxy' (no privileges needed)", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else Path(scenario.results_dir or "results") / (
        f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    report = Path(args.report) if args.report else out / "report.html"
    max_failover = args.max_failover_ms
    error_budget = args.error_budget
    if args.command == "demo":
        max_failover = DEMO_MAX_FAILOVER_MS if max_failover is None else max_failover
        error_budget = DEMO_ERROR_BUDGET_PCT if error_budget is None else error_budget
    _use_uvloop()
    try:
        status = asyncio.run(_run(scenario, out, report, max_failover_ms=max_failover,
                                  max_client_errors=args.max_client_errors, quiet=args.quiet,
                                  error_budget_pct=error_budget))
    except KeyboardInterrupt:
        print(f"\nworkbench: interrupted; every process was reaped, partial results in {out} (marked incomplete)",
              file=sys.stderr)
        return 130
    except Exception as exc:  # a cluster that would not start, a port taken, ...
        print(f"workbench {args.command}: {exc}", file=sys.stderr)
        return 1
    if args.json_path:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        Path(args.json_path).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
