"""Targets: every figure a benchmark aims at is *reported* (met / missed, with the figure), never a failure.

A shared 2-core machine makes any timing or throughput figure drift by machine and by hour, so a missed
target must not turn ``make test`` or a quick run red.  The convention (see benchmarks/README.md):

- a script puts its targets in its results file as ``targets: [{name, target, op, goal, measured, unit,
  met}]`` (build each with :func:`target`; ``met`` is None when nothing was measured);
- it exits 0 whether its targets were met or missed, and non-zero only for a real failure: a crash, a
  server that never got ready, invalid data;
- ``run_all.py`` collects every script's targets into ``results/targets[-quick].json`` and prints the
  summary only in full mode (``make bench``).

:func:`classify` is how ``run_all.py`` judges one script's run; scripts that still exit 1 on a missed
target (an older convention) are recognised by their fresh results file and are not counted as failed.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "OPS",
    "check_targets",
    "classify",
    "legacy_targets",
    "summary_table",
    "target",
    "targets_of",
]

EXIT_OK = 0  # met or missed: the run itself worked
EXIT_FAILED = 1  # a crash, a server that never got ready, invalid data
_LEGACY_MISSED_EXIT = 1  # what older scripts return for a missed target (told apart by their results file)

OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
}
_KEYS = {"name", "target", "op", "goal", "measured", "unit", "met"}


def target(name: str, measured: float | None, op: str, goal: float, unit: str = "") -> dict[str, Any]:
    """One target as the results file holds it; ``met`` is None when ``measured`` is None (not measured)."""
    if op not in OPS:
        raise ValueError(f"target {name!r}: op must be one of {', '.join(OPS)}, got {op!r}")
    if measured is not None and isinstance(measured, float) and math.isnan(measured):
        measured = None
    met = None if measured is None else bool(OPS[op](measured, goal))
    shown = f"{goal:,}" if isinstance(goal, int) else f"{goal:g}"
    return {"name": name, "target": f"{op} {shown}{(' ' + unit) if unit else ''}", "op": op, "goal": goal,
            "measured": measured, "unit": unit, "met": met}


def check_targets(raw: Any, source: str = "targets") -> list[dict[str, Any]]:
    """``raw`` if it is a well-formed targets list; a ValueError naming the entry and key otherwise."""
    if not isinstance(raw, list):
        raise ValueError(f"{source}: expected a list of targets, got {type(raw).__name__}")
    for i, t in enumerate(raw):
        if not isinstance(t, Mapping):
            raise ValueError(f"{source}[{i}]: expected a table, got {type(t).__name__}")
        missing = _KEYS - set(t)
        if missing:
            raise ValueError(f"{source}[{i}]: missing {', '.join(sorted(missing))}")
        if not isinstance(t["name"], str) or not t["name"]:
            raise ValueError(f"{source}[{i}].name: expected a non-empty string, got {t['name']!r}")
        if t["met"] not in (True, False, None):
            raise ValueError(f"{source}[{i}].met: expected true, false or null, got {t['met']!r}")
        if t["op"] not in OPS:
            raise ValueError(f"{source}[{i}].op: expected one of {', '.join(OPS)}, got {t['op']!r}")
    return list(raw)


def legacy_targets(figures: Any, prefix: str = "") -> list[dict[str, Any]]:
    """Targets of a results file written before the convention: boolean ``pass*`` / ``meets_target``
    figures (nested too) and ``rows`` with ``met``; the figure itself is not known there."""
    out: list[dict[str, Any]] = []
    if isinstance(figures, Mapping):
        for key, value in figures.items():
            path = f"{prefix}{key}"
            if (key.startswith("pass") or key.startswith("meets_target")) and isinstance(value, bool):
                out.append({"name": path, "target": "as the script states", "op": "==", "goal": True,
                            "measured": None, "unit": "", "met": value})
            elif key.startswith("meets_target") and isinstance(value, Mapping):
                out += [{"name": f"{path}.{k}", "target": "as the script states", "op": "==", "goal": True,
                         "measured": None, "unit": "", "met": v} for k, v in value.items() if isinstance(v, bool)]
            elif key == "rows" and isinstance(value, list):
                out += [{"name": str(r.get("row", i)), "target": str(r.get("target", "")), "op": "==",
                         "goal": True, "measured": r.get("ours"), "unit": "", "met": r.get("met")}
                        for i, r in enumerate(value) if isinstance(r, Mapping) and "met" in r]
            elif isinstance(value, Mapping) and key not in ("charts",):
                out += legacy_targets(value, prefix=f"{path}.")
    return out


def targets_of(doc: Mapping[str, Any], source: str = "results") -> list[dict[str, Any]]:
    """The targets of one results document: its ``targets`` list, or what :func:`legacy_targets` finds."""
    if "targets" in doc and isinstance(doc["targets"], list):
        return check_targets(doc["targets"], f"{source}: targets")
    return legacy_targets(doc["figures"] if isinstance(doc.get("figures"), Mapping) else doc)


def classify(rc: int, results: Path, started: float) -> tuple[str, str, list[dict[str, Any]]]:
    """Judge one script's run: ("ok" | "missed" | "failed", why, its targets).

    "missed" is a run that worked and missed at least one target; "failed" is a crash (or a run over
    its budget), no results file written by this run, or a results file that is not valid.  An exit
    status of 1 with a fresh, valid results file that records a missed target is the older
    missed-target convention: "missed", not "failed".
    """
    if not results.exists():
        return "failed", f"exit {rc}; {results.name} not written", []
    if results.stat().st_mtime < started - 1:
        return "failed", f"exit {rc}; {results.name} is stale (not written by this run)", []
    try:
        doc = json.loads(results.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("figures", {}), dict):
            raise ValueError("not a results document (a table with figures)")
        targets = targets_of(doc, results.name)
    except ValueError as exc:
        return "failed", f"exit {rc}; invalid results: {exc}", []
    missed = [t for t in targets if t.get("met") is False]
    if rc == EXIT_OK:
        return ("missed" if missed else "ok"), f"{len(missed)} of {len(targets)} targets missed", targets
    if rc == _LEGACY_MISSED_EXIT and missed:
        return "missed", f"exit 1 for {len(missed)} missed target(s) (older convention; not a failure)", targets
    return "failed", f"exit {rc}" + (" (over its time budget)" if rc == 124 else ""), targets


def summary_table(runs: Mapping[str, Mapping[str, Any]], fmt: Callable[[Iterable[Iterable[Any]], list[str]], str]
                  ) -> str:
    """The target summary ``make bench`` prints: one row per target, met / missed with the figure."""
    rows = []
    for script, run in runs.items():
        for t in run.get("targets", []):
            measured = t.get("measured")
            shown = "-" if measured is None else (f"{measured:g}" if isinstance(measured, float) else str(measured))
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t.get("met")]
            rows.append([script, t["name"], t.get("target", ""), f"{shown} {t.get('unit', '')}".strip(), verdict])
    return fmt(rows, ["script", "target", "goal", "measured", "verdict"]) if rows else "(no targets reported)"
