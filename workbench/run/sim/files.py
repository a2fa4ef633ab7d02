"""Schedule files: a scenario as TOML that ``Scenario.from_file`` reads (so ``workbench drill --scenario``
runs it on real processes), with the simulator-only faults kept in comment lines that a drill ignores
and ``workbench simulate --scenario`` reads back::

    # sim-fault = {at_s = 3.5, action = "skew", target = "eu-1", ms = -1200.0}
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from workbench.run.sim.schedule import SimFault, check_fault, normalize, sim_faults_of, with_faults
from workbench.spec.scenario import Scenario, ScenarioError

__all__ = ["SIM_FAULT_PREFIX", "read_schedule", "schedule_toml", "write_schedule"]

SIM_FAULT_PREFIX = "# sim-fault = "
_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def _value(v: Any) -> str:
    """A TOML value: JSON's strings and numbers are valid TOML; tables become inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v).replace("\x7f", "\\u007f")
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def schedule_toml(scenario: Scenario, faults: Iterable[SimFault], notes: Iterable[str] = ()) -> str:
    """The file text: notes and simulator-only faults as comments, then the nested scenario whose own
    faults are the drill-expressible ones of ``faults``."""
    faults = normalize(faults)
    doc = with_faults(scenario, faults).to_dict()
    lines = [f"# {line}" if line else "#" for line in notes]
    sim_only = [f for f in faults if f.sim_only]
    if sim_only:
        lines.append("# Simulator-only faults: a real drill drops them (workbench simulate --scenario reads them):")
        lines += [SIM_FAULT_PREFIX + _value(f.to_dict()) for f in sim_only]
    lines.append("")
    tables = [k for k, v in doc.items() if isinstance(v, Mapping)]
    for k, v in doc.items():
        if v is None or k in tables:
            continue
        if isinstance(v, list):  # limits, faults: one inline table a line
            lines.append(f"{_key(k)} = [\n" + "".join(f"  {_value(x)},\n" for x in v) + "]")
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    for table in tables:
        lines += ["", f"[{_key(table)}]"] + [f"{_key(k)} = {_value(v)}" for k, v in doc[table].items()]
    return "\n".join(lines) + "\n"


def write_schedule(path: str | os.PathLike[str], scenario: Scenario, faults: Iterable[SimFault],
                   notes: Iterable[str] = ()) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(schedule_toml(scenario, faults, notes), encoding="utf-8")
    return out


def read_schedule(path: str | os.PathLike[str]) -> tuple[Scenario, list[SimFault]]:
    """The scenario and every fault (its own and the simulator-only ones), in the order they ran.

    Raises :class:`ScenarioError` naming the file and the field for anything wrong.
    """
    source = os.fspath(path)
    scenario = Scenario.from_file(path)
    extra: list[SimFault] = []
    if Path(path).suffix == ".toml":
        text = Path(path).read_text(encoding="utf-8")
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.startswith(SIM_FAULT_PREFIX):
                continue
            where = f"sim-fault (line {lineno})"
            try:
                raw = tomllib.loads("f = " + line[len(SIM_FAULT_PREFIX):])["f"]
            except tomllib.TOMLDecodeError as exc:
                raise ScenarioError(where, f"an inline table of fault fields ({exc})", source=source) from None
            try:
                fault = SimFault.from_dict(raw, where)
                check_fault(fault, scenario.topology, scenario.duration_s, where, source)
                extra.append(fault)
            except ScenarioError as exc:
                raise ScenarioError(exc.field, exc.expected, exc.got, source) from None
            except TypeError as exc:
                raise ScenarioError(where, f"fault fields ({exc})", source=source) from None
    return scenario, sim_faults_of(scenario, extra)
