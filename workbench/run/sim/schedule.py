"""Fault schedules for the simulator: the fault type it runs, their validation, and random schedules.

A schedule is a :class:`~workbench.spec.scenario.Scenario` (topology, limits, load, the faults a real
drill can apply) plus the faults only the simulator can express: ``duplicate`` and ``reorder`` of
gossip messages, ``skew`` of a node's clock and ``restart_wiped`` (a restart that lost its data
directory).  Both kinds become one list of :class:`SimFault`, ordered by :func:`normalize` so that a
schedule read back from a file runs exactly as it did when it was drawn.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workbench.spec.parts import fault_fields
from workbench.spec.scenario import (
    ACTIONS,
    DEFAULT_REGIONS,
    ROUTER,
    FaultAction,
    LimitSpec,
    LoadSpec,
    Scenario,
    ScenarioError,
    Topology,
)

__all__ = [
    "SIM_ACTIONS",
    "SIM_ONLY",
    "UNDONE",
    "SimFault",
    "check_fault",
    "check_faults",
    "normalize",
    "random_schedule",
    "sim_faults_of",
    "with_faults",
]

SIM_ONLY = ("duplicate", "reorder", "skew", "restart_wiped")
SIM_ACTIONS = ACTIONS + SIM_ONLY
_TARGETED = ("kill", "pause", "resume", "restart", "restart_wiped", "skew", "blackhole")
UNDONE = ("partition", "blackhole", "latency", "loss", "duplicate", "reorder")  # what duration_s > 0 undoes
_KEYS = ("at_s", "action", "target", "groups", "link", "ms", "jitter_ms", "pct", "duration_s")


@dataclass(frozen=True)
class SimFault:
    """One step of a simulated fault timeline (the fields of a FaultAction, with looser values).

    ``ms`` is the added delay (latency), the longest hold-back (reorder) or the clock offset from
    true time, negative allowed (skew).  ``pct`` is the share of messages lost, duplicated or
    reordered.  ``duration_s`` > 0 undoes a timed fault after that long.
    """

    at_s: float
    action: str
    target: str = ""
    groups: tuple[tuple[str, ...], ...] = ()
    link: tuple[str, ...] = ()
    ms: float = 0.0
    jitter_ms: float = 0.0
    pct: float = 0.0
    duration_s: float = 0.0

    @property
    def sim_only(self) -> bool:
        return self.action in SIM_ONLY

    @classmethod
    def from_action(cls, f: FaultAction) -> SimFault:
        return cls(f.at_s, f.action, f.target, f.groups, f.link, f.ms, f.jitter_ms, f.pct, f.duration_s)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> SimFault:
        if not isinstance(raw, Mapping):
            raise ScenarioError(where, "a table of fault fields", raw)
        for key in raw:
            if key not in _KEYS:
                raise ScenarioError(f"{where}.{key}", "one of " + ", ".join(_KEYS) + " (unknown key)")
        for key in ("at_s", "action"):
            if key not in raw:
                raise ScenarioError(f"{where}.{key}", "a value (missing)")
        kw = dict(raw)
        for key in ("at_s", "ms", "jitter_ms", "pct", "duration_s"):
            if key in kw:
                value = kw[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ScenarioError(f"{where}.{key}", "a finite number", value)
                kw[key] = float(value)
        for key in ("target", "action"):
            if key in kw and not isinstance(kw[key], str):
                raise ScenarioError(f"{where}.{key}", "a string", kw[key])
        groups = kw.get("groups", ())
        if isinstance(groups, str) or not isinstance(groups, Sequence) or any(
                isinstance(g, str) or not isinstance(g, Sequence) or not g for g in groups):
            raise ScenarioError(f"{where}.groups", "a list of non-empty lists of regions / node ids", groups)
        kw["groups"] = tuple(tuple(g) for g in groups)
        link = kw.get("link", ())
        if isinstance(link, str) or not isinstance(link, Sequence) or len(link) not in (0, 2):
            raise ScenarioError(f"{where}.link", "two ends [a, b] or [] for every link", link)
        kw["link"] = tuple(link)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return fault_fields(self)

    def to_action(self) -> FaultAction:
        """The drill's form (only for actions a drill can apply)."""
        return FaultAction(**{k: v for k, v in self.to_dict().items()})


def with_faults(scenario: Scenario, faults: Sequence[SimFault]) -> Scenario:
    """``scenario`` whose own faults are the drill-expressible ones of ``faults``."""
    return dataclasses.replace(scenario, faults=tuple(f.to_action() for f in faults if not f.sim_only))


def normalize(faults: Iterable[SimFault]) -> list[SimFault]:
    """The order the simulator applies faults in: by time, drill faults before simulator-only ones at
    the same instant, otherwise as given -- the order a schedule file restores."""
    return sorted(faults, key=lambda f: (f.at_s, f.sim_only))


def sim_faults_of(scenario: Scenario, extra: Iterable[SimFault] = ()) -> list[SimFault]:
    """The scenario's own faults and the simulator-only ``extra``, in :func:`normalize` order."""
    return normalize([SimFault.from_action(f) for f in scenario.faults] + list(extra))


def check_faults(faults: Sequence[SimFault], topology: Topology, duration_s: float, *,
                 label: str = "sim_faults", source: str | None = None) -> None:
    """Refuse unknown actions, names that are not in ``topology``, times past the run and bad values.

    Raises :class:`ScenarioError` naming ``<label>[i].<field>``.
    """
    for i, f in enumerate(faults):
        check_fault(f, topology, duration_s, f"{label}[{i}]", source)


def check_fault(f: SimFault, topology: Topology, duration_s: float, where: str, source: str | None = None) -> None:
    """:func:`check_faults` for one fault; errors name ``<where>.<field>``."""
    known = set(topology.regions) | set(topology.node_ids)

    def bad(field: str, expected: str, got: Any) -> ScenarioError:
        return ScenarioError(f"{where}.{field}", expected, got, source)

    if f.action not in SIM_ACTIONS:
        raise bad("action", "one of " + ", ".join(SIM_ACTIONS), f.action)
    if not 0 <= f.at_s <= duration_s:
        raise bad("at_s", f"a time between 0 and duration_s ({duration_s:g})", f.at_s)
    if f.duration_s < 0:
        raise bad("duration_s", "a number >= 0", f.duration_s)
    if f.action in _TARGETED:
        allowed = known if f.action in SIM_ONLY or f.action == "blackhole" else known | {ROUTER}
        if f.target not in allowed:
            raise bad("target", "a region or node id of the topology; known: " + ", ".join(sorted(allowed)),
                      f.target)
    elif f.target:
        raise bad("target", f"no target for {f.action}", f.target)
    if (f.action == "partition") != bool(f.groups):
        raise bad("groups", f"{'groups' if f.action == 'partition' else 'no groups'} for {f.action}",
                  [list(g) for g in f.groups])
    for name in [m for g in f.groups for m in g] + list(f.link):
        if name not in known | {ROUTER}:
            raise bad("groups" if f.groups else "link",
                      "a region, node id or 'router' of the topology; known: " + ", ".join(sorted(known)), name)
    seen: set[str] = set()
    for g in f.groups:
        for name in g:
            members = set(topology.resolve(name)) or {ROUTER}
            if members & seen:
                raise bad("groups", "each node in at most one group", [list(x) for x in f.groups])
            seen |= members
    if f.action in ("loss", "duplicate", "reorder") and not 0 < f.pct <= 100:
        raise bad("pct", f"a percentage in (0, 100] for {f.action}", f.pct)
    if f.action in ("latency", "reorder") and not f.ms > 0:
        raise bad("ms", f"a delay > 0 for {f.action}", f.ms)
    if f.action != "skew" and (f.ms < 0 or f.jitter_ms < 0):
        raise bad("ms", "a number >= 0", f.ms)


# ----------------------------------------------------------------------------- random schedules
def _r(x: float) -> float:
    return round(x, 3)


def random_schedule(rng: random.Random, *, index: int = 0, duration_s: float = 30.0,
                    max_faults: int = 6) -> tuple[Scenario, list[SimFault]]:
    """Draw one schedule: a small cluster, one global limit, open-loop load and 1..max_faults faults.

    The load stays modest (1.5-4x the limit of each key, at most a few hundred arrivals per second) so a
    thousand 30 s schedules fit in a minute; the faults cover every action the simulator knows.
    """
    regions = rng.sample(DEFAULT_REGIONS[:4], rng.choice((2, 3, 3, 3, 4)))
    per_region = {r: 1 for r in regions}
    if len(regions) < 4 and rng.random() < 0.25:
        per_region[rng.choice(regions)] = 2
    topo = Topology(per_region, gossip_interval_ms=rng.choice((100.0, 200.0, 200.0, 250.0)))
    nodes = list(topo.node_ids)
    rate = rng.choice((10.0, 10.0, 20.0, 50.0))
    burst = max(1.0, rate * rng.choice((0.05, 0.5, 1.0, 1.0, 2.0)))  # small bursts found the debt-floor bug
    tenants = rng.choice((1, 1, 1, 2))
    # every key asked for 1.5-4x its limit: a core that over-admits has demand to over-admit with
    load = LoadSpec(mode="open", rate_rps=_r(rate * tenants * rng.uniform(1.5, 4.0)), arrival="poisson",
                    region_weights={r: float(rng.randint(1, 4)) for r in regions}, tenants=tenants, route="check")
    faults: list[SimFault] = []
    horizon = duration_s - 1.0
    for _ in range(rng.randint(1, max_faults)):
        at = _r(rng.uniform(0.5, horizon))
        kind = rng.choice(("partition", "partition", "blackhole", "kill", "restart", "pause", "latency", "loss",
                           "duplicate", "reorder", "skew", "heal"))
        node = rng.choice(nodes)
        if kind == "partition" and len(nodes) >= 2:
            k = rng.randint(2, min(4, len(nodes)))
            shuffled = rng.sample(nodes, len(nodes))
            groups = [shuffled[i::k] for i in range(k)]
            faults.append(SimFault(at, "partition", groups=tuple(tuple(sorted(g)) for g in groups),
                                   duration_s=_r(rng.uniform(0.3, 8.0))))
        elif kind == "blackhole":
            target = rng.choice(nodes + regions)
            faults.append(SimFault(at, "blackhole", target, duration_s=_r(rng.uniform(0.3, 8.0))))
        elif kind == "kill":
            faults.append(SimFault(at, "kill", node))
            if rng.random() < 0.8:
                again = _r(min(horizon, at + rng.uniform(0.2, 6.0)))
                faults.append(SimFault(again, rng.choice(("restart", "restart_wiped")), node))
        elif kind == "restart":
            faults.append(SimFault(at, rng.choice(("restart", "restart_wiped")), node))
        elif kind == "pause":
            faults.append(SimFault(at, "pause", node))
            faults.append(SimFault(_r(min(horizon, at + rng.uniform(0.2, 5.0))), "resume", node))
        elif kind in ("latency", "loss", "duplicate", "reorder"):
            link: tuple[str, ...] = () if rng.random() < 0.4 or len(nodes) < 2 else tuple(rng.sample(nodes, 2))
            span = _r(rng.uniform(0.5, 10.0))
            if kind == "latency":
                faults.append(SimFault(at, "latency", link=link, ms=_r(rng.uniform(5, 150)),
                                       jitter_ms=_r(rng.uniform(0, 40)), duration_s=span))
            elif kind == "loss":
                faults.append(SimFault(at, "loss", link=link, pct=_r(rng.uniform(5, 60)), duration_s=span))
            elif kind == "duplicate":
                faults.append(SimFault(at, "duplicate", link=link, pct=_r(rng.uniform(5, 50)), duration_s=span))
            else:
                faults.append(SimFault(at, "reorder", link=link, pct=_r(rng.uniform(5, 50)),
                                       ms=_r(rng.uniform(5, 150)), duration_s=span))
        elif kind == "skew":
            faults.append(SimFault(at, "skew", node, ms=_r(rng.uniform(-3000, 3000))))
        else:
            faults.append(SimFault(at, "heal"))
    faults = normalize(faults)
    scenario = Scenario(name=f"sim-{index}", topology=topo, limits=(LimitSpec("*", rate, burst),), load=load,
                        faults=tuple(f.to_action() for f in faults if not f.sim_only),
                        duration_s=duration_s, seed=rng.getrandbits(62), mode="eventual")
    return scenario, faults
