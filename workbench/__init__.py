"""Operations workbench for the Rating API Edge: launch clusters, inject load and faults, check invariants.

The public facade that notebooks and scripts import.  Data flows one way through the sub-packages:
``spec`` (what to run) -> ``run`` (processes, faults, load; writes history) -> ``history`` (the record
types and the results folder) -> ``check`` (pure verdicts over a history) -> ``ui`` (drawing only).
Names are resolved lazily so ``import workbench`` (and the CLI) does not pull in plotly or aiohttp.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Scenario": "workbench.spec.scenario",
    "ScenarioError": "workbench.spec.parts",
    "Recording": "workbench.history.recording",
    "RecordingError": "workbench.history.recording",
    "run_drill": "workbench.run.drill",
    "DrillResult": "workbench.run.drill",
    "simulate": "workbench.run.simulate",
    "summarize": "workbench.check.checker",
    "run_with_dashboard": "workbench.ui.widgets",
    "render_report": "workbench.ui.report",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
