"""Run the workbench's notebooks headless (papermill) with checked parameters, and record the run.

``run_notebook(path, {"duration_s": 8})`` checks every parameter against the notebook's tagged
``parameters`` cell (unknown name, wrong type) and against :meth:`Scenario.build` *before* a kernel
starts, runs the notebook in the project's kernel with a per-cell timeout and logs its output, keeps
the executed notebook whatever happens, and writes ``<out>.run.json`` next to it: parameters,
duration, ok, the failing cell and error, and the summaries found in the notebook's results folder.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.spec.scenario import Scenario, ScenarioError

__all__ = [
    "EXTRA_PARAMETERS",
    "KERNEL",
    "NotebookParameterError",
    "NotebookRun",
    "check_parameters",
    "export_html",
    "notebook_parameters",
    "run_notebook",
    "run_notebook_cli",
]

KERNEL = "rating-edge"  # installed by the Makefile; ``python3`` when it is missing
# Notebook-only parameters (thresholds, sweeps, study settings): not fields of Scenario.build.
EXTRA_PARAMETERS: dict[str, str] = {
    "max_failover_ms": "fail when failover p99 exceeds this (ms)",
    "max_client_errors": "fail when client errors exceed this",
    "max_convergence_ms": "convergence bound after a heal or restart (ms; None: 2 gossip intervals + 50 ms)",
    "max_over_admission_pct": "fail when over-admission exceeds this (%)",
    "bound_margin": "partition: allowed measured / predicted over-admission ratio",
    "sweep_gossip_ms": "tuning: gossip intervals to try (ms)",
    "sweep_burst": "tuning: bucket sizes to try (tokens)",
    "sweep_nodes_per_region": "tuning: node counts per region to try",
    "error_budget_pct": "fail when more than this share of requests are errors (%; CLI --error-budget)",
    "over_admission_budget_pct": "tuning: over-admission the recommended setting may cause (%)",
    "user_steps": "capacity: closed-loop user counts to try, in order",
    "p95_target_ms": "capacity: the latency target (P95, ms)",
    "modes": "partition: limiter modes run one after the other, comma-separated ('eventual,strict')",
    "sweep_lease_ms": "strict_vs_eventual: strict-mode leases to try (ms; each >= 3 gossip intervals)",
    "sweep_alpha": "strict_vs_eventual: pinned shares alpha to try (each in [0, 1])",
    "schedules_per_point": "strict_vs_eventual: random fault schedules simulated per setting (safety)",
}


class NotebookParameterError(ValueError):
    """A parameter the notebook does not declare, or of the wrong type; raised before anything runs."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"parameter '{name}': {message}")


@dataclass
class NotebookRun:
    """What one headless run of a notebook did."""

    notebook: str
    output: str
    parameters: dict[str, Any]
    ok: bool
    duration_s: float
    kernel: str
    failed_cell: int | None = None  # index among the output notebook's cells (papermill adds a banner cell)
    error: str = ""  # "ExceptionName: message" of the failing cell (or of papermill)
    failed_source: str = ""  # the failing cell's code
    size_bytes: int = 0  # of the executed notebook
    results_dir: str | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)  # one per summary.json found
    verdict: str = ""
    html: str | None = None
    record: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- parameters
def notebook_parameters(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The notebook's declared parameters: name -> {default (a value), help, type}."""
    import papermill as pm

    declared = pm.inspect_notebook(str(path))
    if not declared:
        raise NotebookParameterError("(parameters)", f"{path} has no cell tagged 'parameters'")
    out = {}
    for name, p in declared.items():
        try:
            default = ast.literal_eval(p["default"])
        except (ValueError, SyntaxError):
            default = p["default"]  # an expression: compared as text only
        out[name] = {"default": default, "help": p.get("help", ""), "type": type(default).__name__}
    return out


def _from_text(text: str, default: Any, name: str) -> Any:
    """Convert a command-line string to the type of the default (int, float, bool, list, ...)."""
    if isinstance(default, str):
        return text
    if text.strip().lower() in ("none", "null"):
        return None
    if isinstance(default, bool):
        if text.strip().lower() in ("true", "1", "yes"):
            return True
        if text.strip().lower() in ("false", "0", "no"):
            return False
        raise NotebookParameterError(name, f"expected true or false, got {text!r}")
    try:
        return json.loads(text)
    except ValueError:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text


def _type_ok(value: Any, default: Any) -> bool:
    if value is None or default is None:
        return True  # None defaults mean "off"; Scenario.build checks the value
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))


def check_parameters(path: str | os.PathLike[str], parameters: Mapping[str, Any], *,
                     from_text: bool = False) -> dict[str, Any]:
    """Check ``parameters`` against the notebook and the scenario; return them converted.

    Unknown names and values of another type than the notebook's default raise
    :class:`NotebookParameterError` naming the parameter; ``from_text`` converts command-line
    strings first (``"8"`` -> 8 for an int default).  The notebook's defaults merged with the values
    must then build a valid :class:`Scenario` (a :class:`ScenarioError` names the field otherwise).
    """
    declared = notebook_parameters(path)
    out: dict[str, Any] = {}
    for name, value in parameters.items():
        if name not in declared:
            raise NotebookParameterError(name, f"{Path(path).name} has no such parameter; known: "
                                         + ", ".join(declared))
        default = declared[name]["default"]
        if from_text and isinstance(value, str):
            value = _from_text(value, default, name)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, default):
            raise NotebookParameterError(name, f"expected {type(default).__name__} like the default "
                                         f"{default!r}, got {type(value).__name__} {value!r}")
        out[name] = value
    merged = {n: d["default"] for n, d in declared.items()} | out
    scenario_params = {n: v for n, v in merged.items() if n in Scenario.parameter_names()}
    for mode in _modes_run(merged):
        for swept, values in _swept(merged):
            for value in values:
                try:
                    Scenario.build(**scenario_params | ({} if mode is None else {"mode": mode})
                                   | ({} if swept is None else {swept: value}))
                except ScenarioError as exc:
                    name = exc.field if swept is None or exc.field != swept else _SWEEPS[swept]
                    raise NotebookParameterError(name, str(exc) + ("" if mode is None else f" (in {mode} mode)")
                                                 ) from None
    _check_strict_extras(merged)
    return out


# Sweep parameters of the notebooks -> the scenario field each value goes to (each value is checked).
_SWEEPS = {"gossip_interval_ms": "sweep_gossip_ms", "burst": "sweep_burst",
           "nodes_per_region": "sweep_nodes_per_region"}


def _swept(merged: Mapping[str, Any]) -> list[tuple[str | None, list[Any]]]:
    """``(scenario field, values)`` of every sweep the notebook declares, after ``(None, [None])``: the
    notebook's scenario as it stands.  A value of the wrong kind is left to :meth:`Scenario.build`."""
    out: list[tuple[str | None, list[Any]]] = [(None, [None])]
    for field_name, sweep in _SWEEPS.items():
        values = merged.get(sweep)
        if isinstance(values, list | tuple):
            out.append((field_name, list(values)))
        elif sweep in merged and values is not None:
            raise NotebookParameterError(sweep, f"expected a list of values, got {values!r}")
    return out


def _modes_run(merged: Mapping[str, Any]) -> list[str | None]:
    """The limiter modes the notebook runs its scenario in (None: the scenario's own ``mode``), so each is
    checked: ``modes`` (the partition notebook), strict and eventual for the strict study, else ``mode``."""
    from edge_server.config import MODES

    if "modes" in merged:
        modes = [m.strip() for m in str(merged["modes"]).split(",") if m.strip()]
        if not modes or any(m not in MODES for m in modes):
            raise NotebookParameterError("modes", f"expected a comma-separated list of {', '.join(MODES)}, "
                                         f"got {merged['modes']!r}")
        return list(modes)
    if "sweep_lease_ms" in merged:  # strict_vs_eventual runs its drills in both modes
        return list(MODES)
    return [None]


def _check_strict_extras(merged: Mapping[str, Any]) -> None:
    """The values of the strict study's extras (the lease and alpha sweeps, the schedules), checked as
    the strict core would check them, so a bad one is refused before a kernel starts."""
    from edge_server.strict.settings import StrictSettings, StrictSettingsError

    gossip = merged.get("gossip_interval_ms", Scenario.parameter_defaults()["gossip_interval_ms"])
    for name, key in (("sweep_lease_ms", "lease_ms"), ("sweep_alpha", "alpha")):
        values = merged.get(name)
        if values is None:
            continue
        if not values:
            raise NotebookParameterError(name, "expected at least one value")
        for value in values:
            try:
                StrictSettings(gossip_interval_ms=float(gossip), **{key: value})
            except (StrictSettingsError, TypeError, ValueError) as exc:
                raise NotebookParameterError(name, f"{value!r}: {exc}") from None
    count = merged.get("schedules_per_point")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise NotebookParameterError("schedules_per_point", f"expected an integer >= 0, got {count!r}")


# ----------------------------------------------------------------------------- running
def _kernel() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"


def _failure(nb: Any) -> tuple[int | None, str, str]:
    """The first cell whose outputs hold an error: (index in ``nb``, "Name: message", its source)."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return i, f"{out.get('ename', 'Error')}: {out.get('evalue', '')}", cell.get("source", "")
    return None, "", ""


def _read_failure(path: Path) -> tuple[int | None, str, str]:
    import nbformat

    try:
        return _failure(nbformat.read(path, as_version=4))
    except (OSError, ValueError):
        return None, "", ""


def _collect_runs(results_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(results_dir.rglob("summary.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        runs.append({"folder": str(path.parent), "invariants_ok": summary.get("invariants_ok"),
                     "complete": summary.get("complete"), "reasons": summary.get("reasons", []),
                     "summary": {k: summary.get(k) for k in (
                         "throughput_rps", "latency_ms", "over_admission_pct", "failover_ms",
                         "client_errors", "token_loss", "convergence_ms", "requests")}})
    return runs


def run_notebook(path: str | os.PathLike[str], parameters: Mapping[str, Any] | None = None,
                 out: str | os.PathLike[str] | None = None, cell_timeout: int = 600, *,
                 from_text: bool = False, html: bool = False, log_output: bool = True,
                 kernel: str | None = None) -> NotebookRun:
    """Run a notebook headless; keep the output notebook and write ``<out>.run.json`` next to it.

    Parameters are checked first (see :func:`check_parameters`); a bad one raises before any kernel
    or process starts.  ``results_dir`` defaults to ``<out stem>.results`` next to the output.  A
    failing notebook does not raise: the returned run has ``ok=False``, the failing cell and error.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    src = Path(path).resolve()
    if not src.is_file():
        raise NotebookParameterError("(notebook)", f"no such notebook: {path}")
    params = check_parameters(src, dict(parameters or {}), from_text=from_text)
    dst = Path(out).resolve() if out else src.with_name(f"{src.stem}.out.ipynb")
    dst.parent.mkdir(parents=True, exist_ok=True)
    declared = notebook_parameters(src)
    if "results_dir" in declared and params.get("results_dir") is None:
        params["results_dir"] = str(dst.with_name(f"{dst.stem}.results"))
    kernel_name = kernel or _kernel()
    started = time.monotonic()
    error, failed_cell, source = "", None, ""
    previous = os.environ.get("WORKBENCH_HEADLESS")
    os.environ["WORKBENCH_HEADLESS"] = "1"  # inherited by the kernel: no live chart widgets
    try:
        nb = pm.execute_notebook(str(src), str(dst), parameters=params, kernel_name=kernel_name,
                                 cwd=str(src.parent), log_output=log_output, progress_bar=False,
                                 execution_timeout=cell_timeout)
        failed_cell, error, source = _failure(nb)
    except PapermillExecutionError as exc:  # the saved notebook's indexes include papermill's banner cell
        failed_cell, _error, source = _read_failure(dst)
        error = f"{exc.ename}: {exc.evalue}"
    except Exception as exc:  # kernel died, timeout, ...: papermill has saved what ran
        error = f"{exc.__class__.__name__}: {exc}"
        failed_cell, _error, source = _read_failure(dst) if dst.exists() else (None, "", "")
    finally:
        if previous is None:
            os.environ.pop("WORKBENCH_HEADLESS", None)
        else:
            os.environ["WORKBENCH_HEADLESS"] = previous
    duration = time.monotonic() - started
    results_dir = params.get("results_dir")
    runs = _collect_runs(Path(results_dir)) if results_dir and Path(results_dir).is_dir() else []
    ok = not error and failed_cell is None
    broken = [r["folder"] for r in runs if not r["invariants_ok"]]
    verdict = ("pass" if ok else f"fail: cell {failed_cell}: {error}") + (
        f" ({len(broken)} of {len(runs)} runs broke an invariant the notebook tolerates)" if ok and broken else "")
    run = NotebookRun(notebook=str(src), output=str(dst), parameters=params, ok=ok, duration_s=round(duration, 2),
                      kernel=kernel_name, failed_cell=failed_cell, error=error, failed_source=source,
                      size_bytes=dst.stat().st_size if dst.exists() else 0, results_dir=results_dir, runs=runs,
                      verdict=verdict)
    if html and dst.exists():
        run.html = str(export_html(dst))
    record = dst.with_name(f"{dst.stem}.run.json")
    run.record = str(record)
    record.write_text(json.dumps(run.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    return run


_REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>", re.IGNORECASE)


def export_html(notebook: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """An executed notebook as one offline HTML page (code hidden; figures drawn by embedded plotly.js)."""
    import nbformat
    from nbconvert import HTMLExporter

    src = Path(notebook)
    exporter = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True)
    nb = nbformat.read(src, as_version=4)
    # The live widgets are closed before a cell ends; the state nbclient saved of them would only make
    # the page fetch a widget renderer from a CDN (nbconvert adds its loader when the state is there).
    nb.metadata.pop("widgets", None)
    body, _resources = exporter.from_notebook_node(nb)
    # The template links require.js, MathJax and a widget manager from CDNs; the figures carry their own
    # plotly.js and the live widgets are closed, so a page without those links is complete offline.
    body = _REMOTE_SCRIPT.sub("", body)
    dst = Path(out) if out else src.with_suffix(".html")
    dst.write_text(body, encoding="utf-8")
    return dst


def run_notebook_cli(args: argparse.Namespace) -> int:
    """``workbench run NOTEBOOK [-p NAME VALUE]... [-o OUT]``: 0 passed, 1 the notebook failed, 2 bad input."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill logs the cells' output
    pairs = getattr(args, "parameter", None) or []
    params: dict[str, Any] = {}
    for name, value in pairs:
        params[name] = value
    try:
        run = run_notebook(args.notebook, params, args.out, cell_timeout=args.cell_timeout, from_text=True,
                           html=bool(getattr(args, "html", False)))
    except NotebookParameterError as exc:
        print(f"workbench run: {exc}", file=sys.stderr)
        return 2
    size = f"{run.size_bytes / 1e6:.2f} MB"
    if run.ok:
        print(f"workbench run: {Path(run.notebook).name} passed in {run.duration_s:.1f} s -> {run.output} ({size})")
    else:
        print(f"workbench run: {Path(run.notebook).name} FAILED in {run.duration_s:.1f} s at cell "
              f"{run.failed_cell}: {run.error}", file=sys.stderr)
        if run.failed_source:
            print("  | " + "\n  | ".join(run.failed_source.splitlines()[-6:]), file=sys.stderr)
        print(f"workbench run: the output notebook is kept: {run.output}", file=sys.stderr)
    for r in run.runs:
        print(f"  {Path(r['folder']).name}: invariants {'held' if r['invariants_ok'] else 'BROKEN'}"
              + "".join(f"\n    ! {reason}" for reason in r["reasons"]))
    if run.html:
        print(f"html: {run.html}")
    print(f"record: {run.record}")
    return 0 if run.ok else 1
