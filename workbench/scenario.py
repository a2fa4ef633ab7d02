"""The single input of a drill: a frozen, validated scenario spec.

A scenario comes from flat keyword arguments (notebook / papermill parameters, CLI flags) through
:meth:`Scenario.build`, from its nested dict form (:meth:`Scenario.from_dict`, the exact inverse of
:meth:`Scenario.to_dict`) or from a TOML / YAML file holding either form.  Everything downstream
(cluster file, load, faults, checker) reads this object and nothing else, so a bad value is refused
here with a :class:`ScenarioError` that names the field, before any process starts.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from edge_server.config import MODES

__all__ = [
    "ACTIONS",
    "DEFAULT_REGIONS",
    "FaultAction",
    "LimitSpec",
    "LoadSpec",
    "Scenario",
    "ScenarioError",
    "SkillSpec",
    "Topology",
    "default_latency_ms",
]

DEFAULT_REGIONS = ("eu", "us", "ap", "sa", "af", "oc")
ACTIONS = ("partition", "heal", "latency", "loss", "kill", "pause", "resume", "restart")
ROUTER = "router"  # a fault target / link end naming the router process
_DEFAULT_LATENCY = {  # one-way-ish round trips between regions, ms; unlisted pairs get 200
    ("eu", "us"): 80, ("eu", "ap"): 150, ("us", "ap"): 120, ("eu", "sa"): 190, ("us", "sa"): 120,
    ("ap", "sa"): 300, ("eu", "af"): 90, ("us", "af"): 200, ("ap", "af"): 250, ("sa", "af"): 280,
    ("eu", "oc"): 250, ("us", "oc"): 150, ("ap", "oc"): 110, ("sa", "oc"): 310, ("af", "oc"): 300,
}
_MISSING: Any = object()


class ScenarioError(ValueError):
    """A scenario field has a wrong type, an impossible value or names something that does not exist."""

    def __init__(self, field: str, expected: str, got: Any = _MISSING, source: str | None = None) -> None:
        self.field, self.expected, self.got, self.source = field, expected, got, source
        shown = "" if got is _MISSING else f", got {got!r}"
        where = f"{source}: " if source else ""
        super().__init__(f"{where}scenario field '{field}': expected {expected}{shown}")


def default_latency_ms(a: str, b: str) -> float:
    """The default latency between two regions (0 within a region, 200 for unknown pairs)."""
    if a == b:
        return 0.0
    return float(_DEFAULT_LATENCY.get((a, b), _DEFAULT_LATENCY.get((b, a), 200)))


# ----------------------------------------------------------------------------- value checks
def _num(name: str, value: Any, *, minimum: float | None = 0.0, positive: bool = False,
         maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(name, "a finite number", value)
    if positive and not value > 0:
        raise ScenarioError(name, "a number > 0", value)
    if minimum is not None and value < minimum:
        raise ScenarioError(name, f"a number >= {minimum:g}", value)
    if maximum is not None and value > maximum:
        raise ScenarioError(name, f"a number <= {maximum:g}", value)
    return float(value)


def _int(name: str, value: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(name, "an integer", value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ScenarioError(name, f"an integer {bound}", value)
    return value


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ScenarioError(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def _name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in " \t\n\"'\\[]{}=,|*?"):
        raise ScenarioError(name, "a non-empty name without spaces, quotes, brackets or glob characters", value)
    return value


def _set(obj: Any, **values: Any) -> None:
    """Normalise fields of a frozen dataclass in ``__post_init__``."""
    for key, value in values.items():
        object.__setattr__(obj, key, value)


def _only(name: str, raw: Any, known: Sequence[str]) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ScenarioError(name, "a table / mapping", raw)
    for key in raw:
        if key not in known:
            raise ScenarioError(f"{name}.{key}" if name else str(key),
                                "one of " + ", ".join(known) + " (unknown key)")
    return raw


# ----------------------------------------------------------------------------- parts
@dataclass(frozen=True)
class Topology:
    """Regions, their nodes and the latency between them.  Node ids are ``<region>-<n>``, n from 1."""

    nodes_per_region: Mapping[str, int]  # region name -> node count, in region order
    latency_ms: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # full off-diagonal matrix
    gossip_interval_ms: float = 20.0  # delta gossip period of every node

    def __post_init__(self) -> None:
        if not isinstance(self.nodes_per_region, Mapping) or not self.nodes_per_region:
            raise ScenarioError("topology.nodes_per_region", "a non-empty mapping region -> node count",
                                self.nodes_per_region)
        counts = {_name("topology.nodes_per_region", r): _int(f"topology.nodes_per_region.{r}", n, minimum=1)
                  for r, n in self.nodes_per_region.items()}
        if not isinstance(self.latency_ms, Mapping):
            raise ScenarioError("topology.latency_ms", "a mapping region -> region -> ms", self.latency_ms)
        matrix: dict[str, dict[str, float]] = {r: {} for r in counts}
        for src, row in self.latency_ms.items():
            if src not in counts:
                raise ScenarioError(f"topology.latency_ms.{src}", "a region of the topology", src)
            if not isinstance(row, Mapping):
                raise ScenarioError(f"topology.latency_ms.{src}", "a mapping region -> ms", row)
            for dst, ms in row.items():
                if dst not in counts or dst == src:
                    raise ScenarioError(f"topology.latency_ms.{src}.{dst}", "another region of the topology", dst)
                matrix[src][dst] = _num(f"topology.latency_ms.{src}.{dst}", ms)
        for src in counts:  # fill gaps: the reverse direction if given, else the default table
            for dst in counts:
                if dst != src and dst not in matrix[src]:
                    matrix[src][dst] = matrix[dst].get(src, default_latency_ms(src, dst))
        _set(self, nodes_per_region=MappingProxyType(counts),
             latency_ms=MappingProxyType({r: MappingProxyType(row) for r, row in matrix.items()}),
             gossip_interval_ms=_num("topology.gossip_interval_ms", self.gossip_interval_ms, positive=True))

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(self.nodes_per_region)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(nid for r in self.regions for nid in self.nodes_of(r))

    def nodes_of(self, region: str) -> tuple[str, ...]:
        return tuple(f"{region}-{i}" for i in range(1, self.nodes_per_region[region] + 1))

    def region_of(self, node_id: str) -> str:
        for r in self.regions:
            if node_id in self.nodes_of(r):
                return r
        raise KeyError(node_id)

    def resolve(self, target: str) -> tuple[str, ...]:
        """Node ids that a target (region name or node id) stands for; ``()`` for the router."""
        if target in self.nodes_per_region:
            return self.nodes_of(target)
        if target in self.node_ids:
            return (target,)
        if target == ROUTER:
            return ()
        raise KeyError(target)

    def to_dict(self) -> dict[str, Any]:
        return {"nodes_per_region": dict(self.nodes_per_region),
                "latency_ms": {r: dict(row) for r, row in self.latency_ms.items()},
                "gossip_interval_ms": self.gossip_interval_ms}


@dataclass(frozen=True)
class LimitSpec:
    """One limit rule: first matching glob wins; rate and burst are global across the cluster."""

    pattern: str = "*"  # fnmatch glob over the limiter key (the tenant for invoke)
    rate: float = 100.0  # tokens per second
    burst: float = 100.0  # bucket size, tokens

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ScenarioError("limits.pattern", "a non-empty glob", self.pattern)
        _set(self, rate=_num("limits.rate", self.rate, positive=True),
             burst=_num("limits.burst", self.burst, minimum=1.0))


@dataclass(frozen=True)
class LoadSpec:
    """The traffic shape: open loop (arrival rate) or closed loop (users with think time)."""

    mode: str = "open"  # "open": arrivals at rate_rps regardless of replies; "closed": users wait
    rate_rps: float = 150.0  # open loop: total arrivals per second over all regions
    arrival: str = "poisson"  # open loop: "constant" spacing or "poisson" (exponential gaps)
    users: int = 50  # closed loop: concurrent users over all regions
    think_ms: float = 0.0  # closed loop: pause between a reply and the user's next request
    region_weights: Mapping[str, float] = field(default_factory=dict)  # home region -> share; {} = equal
    tenants: int = 1  # distinct limiter keys (tenants), named tenant-0000 ...
    key_dist: str = "uniform"  # how requests pick a tenant: "uniform" or "zipf"
    zipf_s: float = 1.1  # zipf exponent; tenant-0000 is the hottest
    cost: int = 1  # tokens per request
    route: str = "invoke"  # "invoke" (/v1/skills/{skill}/invoke) or "check" (/v1/limits/check)
    processes: int = 1  # generator processes (one per core helps past ~4k req/s)

    def __post_init__(self) -> None:
        _choice("load.mode", self.mode, ("open", "closed"))
        _choice("load.arrival", self.arrival, ("constant", "poisson"))
        _choice("load.key_dist", self.key_dist, ("uniform", "zipf"))
        _choice("load.route", self.route, ("invoke", "check"))
        if not isinstance(self.region_weights, Mapping):
            raise ScenarioError("load.region_weights", "a mapping region -> weight", self.region_weights)
        weights = {r: _num(f"load.region_weights.{r}", w) for r, w in self.region_weights.items()}
        if weights and not sum(weights.values()) > 0:
            raise ScenarioError("load.region_weights", "at least one weight > 0", dict(weights))
        _set(self, rate_rps=_num("load.rate_rps", self.rate_rps, positive=True),
             users=_int("load.users", self.users, minimum=1),
             think_ms=_num("load.think_ms", self.think_ms),
             region_weights=MappingProxyType(weights),
             tenants=_int("load.tenants", self.tenants, minimum=1),
             zipf_s=_num("load.zipf_s", self.zipf_s, positive=True),
             cost=_int("load.cost", self.cost, minimum=1),
             processes=_int("load.processes", self.processes, minimum=1, maximum=256))

    def tenant_names(self) -> tuple[str, ...]:
        return tuple(f"tenant-{i:04d}" for i in range(self.tenants))


@dataclass(frozen=True)
class SkillSpec:
    """The simulated skill behind every node: lognormal latency, optional errors and CPU work."""

    median_ms: float = 50.0
    p99_ms: float = 200.0
    error_rate: float = 0.0  # fraction of calls that fail with 502 (tokens still spent)
    cpu_us: float = 0.0  # CPU burned per call

    def __post_init__(self) -> None:
        _set(self, median_ms=_num("skill.median_ms", self.median_ms),
             p99_ms=_num("skill.p99_ms", self.p99_ms),
             error_rate=_num("skill.error_rate", self.error_rate, maximum=1.0),
             cpu_us=_num("skill.cpu_us", self.cpu_us))
        if self.p99_ms < self.median_ms:
            raise ScenarioError("skill.p99_ms", f"a number >= skill.median_ms ({self.median_ms:g})", self.p99_ms)


@dataclass(frozen=True)
class FaultAction:
    """One step of the fault timeline, applied ``at_s`` seconds after the run starts.

    ``target`` (kill, pause, resume, restart) is a region, a node id or ``"router"``.  ``groups``
    (partition) lists sides; one group is cut off from everything else.  ``link`` (latency, loss)
    names two ends (regions, node ids or ``"router"``); empty means every link.  ``duration_s`` > 0
    undoes a latency / loss / partition after that long; ``heal`` undoes every network fault.
    """

    at_s: float
    action: str
    target: str = ""
    groups: tuple[tuple[str, ...], ...] = ()
    link: tuple[str, ...] = ()
    ms: float = 0.0  # latency: delay added to each chunk
    jitter_ms: float = 0.0  # latency: +- uniform jitter
    pct: float = 0.0  # loss: percent of chunks dropped
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        _choice("faults.action", self.action, ACTIONS)
        if not isinstance(self.target, str):
            raise ScenarioError("faults.target", "a region, node id or 'router'", self.target)
        groups = self.groups
        if not isinstance(groups, Sequence) or isinstance(groups, str) or any(
                not isinstance(g, Sequence) or isinstance(g, str) or not g for g in groups):
            raise ScenarioError("faults.groups", "a list of non-empty lists of regions / node ids", groups)
        link = self.link
        if isinstance(link, str) or not isinstance(link, Sequence) or len(link) not in (0, 2):
            raise ScenarioError("faults.link", "two ends [a, b] or [] for every link", link)
        _set(self, at_s=_num("faults.at_s", self.at_s), groups=tuple(tuple(g) for g in groups),
             link=tuple(link), ms=_num("faults.ms", self.ms), jitter_ms=_num("faults.jitter_ms", self.jitter_ms),
             pct=_num("faults.pct", self.pct, maximum=100.0), duration_s=_num("faults.duration_s", self.duration_s))
        needs_target = self.action in ("kill", "pause", "resume", "restart")
        if needs_target != bool(self.target):
            raise ScenarioError("faults.target", f"{'a' if needs_target else 'no'} target for {self.action}",
                                self.target)
        if (self.action == "partition") != bool(self.groups):
            raise ScenarioError("faults.groups", f"{'groups' if self.action == 'partition' else 'no groups'} "
                                f"for {self.action}", [list(g) for g in self.groups])
        if self.action == "latency" and not self.ms > 0:
            raise ScenarioError("faults.ms", "a delay > 0 for latency", self.ms)
        if self.action == "loss" and not self.pct > 0:
            raise ScenarioError("faults.pct", "a percentage in (0, 100] for loss", self.pct)

    def check_against(self, topology: Topology, duration_s: float, index: int) -> None:
        """Refuse names that do not exist in ``topology`` and times past the run."""
        known = set(topology.regions) | set(topology.node_ids) | {ROUTER}
        where = f"faults[{index}]"
        if self.at_s > duration_s:
            raise ScenarioError(f"{where}.at_s", f"a time <= duration_s ({duration_s:g})", self.at_s)
        for label, names in (("target", [self.target] if self.target else []),
                             ("groups", [m for g in self.groups for m in g]), ("link", list(self.link))):
            for name in names:
                if name not in known:
                    raise ScenarioError(f"{where}.{label}", "a region, node id or 'router' of the topology; known: "
                                        + ", ".join(sorted(known)), name)
        members = [n for g in self.groups for m in g for n in (topology.resolve(m) or (ROUTER,))]
        if len(members) != len(set(members)):
            raise ScenarioError(f"{where}.groups", "each node in at most one group", [list(g) for g in self.groups])

    def to_dict(self) -> dict[str, Any]:
        """Only what is set, so timelines stay readable in files and notebooks."""
        out: dict[str, Any] = {"at_s": self.at_s, "action": self.action}
        if self.target:
            out["target"] = self.target
        if self.groups:
            out["groups"] = [list(g) for g in self.groups]
        if self.link:
            out["link"] = list(self.link)
        for key in ("ms", "jitter_ms", "pct", "duration_s"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


_FAULT_KEYS = ("at_s", "action", "target", "groups", "link", "ms", "jitter_ms", "pct", "duration_s")
_LOAD_KEYS = tuple(LoadSpec.__dataclass_fields__)
_SKILL_KEYS = tuple(SkillSpec.__dataclass_fields__)
_TOP_KEYS = ("name", "seed", "duration_s", "mode", "health_interval_ms", "results_dir",
             "topology", "limits", "load", "skill", "faults")

SKILL_NAME = "rating"  # the {skill} of /v1/skills/{skill}/invoke in every generated cluster file


@dataclass(frozen=True)
class Scenario:
    """Everything a drill needs; the only input of the cluster, load, faults and checker.

    Immutable (its mappings are read-only views) but not hashable; compare with ``==``.
    """

    name: str = "drill"
    topology: Topology = field(default_factory=lambda: Topology(dict.fromkeys(DEFAULT_REGIONS[:3], 1)))
    limits: tuple[LimitSpec, ...] = (LimitSpec(),)
    load: LoadSpec = field(default_factory=LoadSpec)
    skill: SkillSpec = field(default_factory=SkillSpec)
    faults: tuple[FaultAction, ...] = ()  # sorted by time (stable)
    duration_s: float = 30.0
    seed: int = 1
    mode: str = "eventual"  # limiter mode of every node
    health_interval_ms: float = 100.0  # router's active health checks
    results_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\\0"):
            raise ScenarioError("name", "a non-empty label without path separators", self.name)
        for label, value, kind in (("topology", self.topology, Topology), ("load", self.load, LoadSpec),
                                   ("skill", self.skill, SkillSpec)):
            if not isinstance(value, kind):
                raise ScenarioError(label, f"a {kind.__name__}", value)
        if not isinstance(self.limits, Sequence) or not self.limits or not all(
                isinstance(x, LimitSpec) for x in self.limits):
            raise ScenarioError("limits", "a non-empty list of LimitSpec", self.limits)
        if not isinstance(self.faults, Sequence) or not all(isinstance(x, FaultAction) for x in self.faults):
            raise ScenarioError("faults", "a list of FaultAction", self.faults)
        _choice("mode", self.mode, MODES)
        if self.results_dir is not None and not isinstance(self.results_dir, str | os.PathLike):
            raise ScenarioError("results_dir", "a path or None", self.results_dir)
        _set(self, limits=tuple(self.limits), faults=tuple(sorted(self.faults, key=lambda f: f.at_s)),
             duration_s=_num("duration_s", self.duration_s, positive=True),
             seed=_int("seed", self.seed, minimum=-(2**63)),
             health_interval_ms=_num("health_interval_ms", self.health_interval_ms, positive=True),
             results_dir=None if self.results_dir is None else os.fspath(self.results_dir))
        for region in self.load.region_weights:
            if region not in self.topology.nodes_per_region:
                raise ScenarioError(f"load.region_weights.{region}", "a region of the topology; known: "
                                    + ", ".join(self.topology.regions), region)
        for i, fault in enumerate(self.faults):
            fault.check_against(self.topology, self.duration_s, i)

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def parameter_names() -> tuple[str, ...]:
        """The flat names :meth:`build` accepts (what a notebook's parameters cell may set)."""
        from workbench.parameters import PARAMETERS

        return tuple(PARAMETERS)

    @staticmethod
    def parameter_defaults() -> dict[str, Any]:
        from workbench.parameters import PARAMETERS

        return {name: default for name, (default, _doc) in PARAMETERS.items()}

    @classmethod
    def build(cls, **params: Any) -> Scenario:
        """Build from flat keyword parameters (see ``workbench.parameters.PARAMETERS``).

        Errors name the flat parameter (``rate``, ``kill_region_at_s``), not the nested field.
        """
        from workbench.parameters import build_scenario  # it imports this module

        return build_scenario(cls, params)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Scenario:
        """The inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are refused."""
        raw = _only("", raw, _TOP_KEYS)
        kw: dict[str, Any] = {k: raw[k] for k in ("name", "seed", "duration_s", "mode", "health_interval_ms",
                                                  "results_dir") if k in raw}
        if "topology" in raw:
            t = _only("topology", raw["topology"], ("nodes_per_region", "latency_ms", "gossip_interval_ms"))
            if "nodes_per_region" not in t:
                raise ScenarioError("topology.nodes_per_region", "a mapping region -> node count (missing)")
            kw["topology"] = Topology(**t)
        if "limits" in raw:
            if not isinstance(raw["limits"], Sequence) or isinstance(raw["limits"], str):
                raise ScenarioError("limits", "a list of {pattern, rate, burst}", raw["limits"])
            kw["limits"] = tuple(LimitSpec(**_only("limits", x, ("pattern", "rate", "burst")))
                                 for x in raw["limits"])
        if "load" in raw:
            kw["load"] = LoadSpec(**_only("load", raw["load"], _LOAD_KEYS))
        if "skill" in raw:
            kw["skill"] = SkillSpec(**_only("skill", raw["skill"], _SKILL_KEYS))
        if "faults" in raw:
            if not isinstance(raw["faults"], Sequence) or isinstance(raw["faults"], str):
                raise ScenarioError("faults", "a list of fault tables", raw["faults"])
            kw["faults"] = tuple(_fault_from_dict(x, i) for i, x in enumerate(raw["faults"]))
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Scenario:
        """Read a TOML, YAML or JSON file holding either the flat parameters or the nested dict form."""
        p, source = Path(path), os.fspath(path)
        try:
            text = p.read_text(encoding="utf-8")
            if p.suffix == ".toml":
                raw = tomllib.loads(text)
            elif p.suffix in (".yaml", ".yml"):
                raw = yaml.safe_load(text) or {}
            elif p.suffix == ".json":
                raw = json.loads(text)
            else:
                raise ScenarioError("(file)", "a .toml, .yaml, .yml or .json file", p.suffix, source)
        except FileNotFoundError:
            raise ScenarioError("(file)", "an existing file", source, source) from None
        except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ScenarioError("(syntax)", f"valid {p.suffix[1:].upper()} ({exc})", source=source) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ScenarioError("(file)", f"a readable UTF-8 file ({exc})", source=source) from None
        if not isinstance(raw, Mapping):
            raise ScenarioError("(document)", "a table / mapping at the top", type(raw).__name__, source)
        try:
            if any(k in raw for k in ("topology", "limits", "load", "skill")):
                return cls.from_dict(raw)
            return cls.build(**raw)
        except ScenarioError as exc:
            raise ScenarioError(exc.field, exc.expected, exc.got, source) from None
        except TypeError as exc:  # a nested table with the wrong shape
            raise ScenarioError("(document)", f"the scenario layout ({exc})", source=source) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON / TOML / YAML-friendly data; ``Scenario.from_dict(s.to_dict()) == s``."""
        return {
            "name": self.name, "seed": self.seed, "duration_s": self.duration_s, "mode": self.mode,
            "health_interval_ms": self.health_interval_ms, "results_dir": self.results_dir,
            "topology": self.topology.to_dict(),
            "limits": [{"pattern": x.pattern, "rate": x.rate, "burst": x.burst} for x in self.limits],
            "load": {k: dict(v) if isinstance(v, Mapping) else v
                     for k, v in ((k, getattr(self.load, k)) for k in _LOAD_KEYS)},
            "skill": {k: getattr(self.skill, k) for k in _SKILL_KEYS},
            "faults": [f.to_dict() for f in self.faults],
        }

    # ------------------------------------------------------------------ derived
    def api_keys(self) -> dict[str, str]:
        """Bearer API key -> tenant, the same in the cluster file and the load generator."""
        return {f"key-{t}": t for t in self.load.tenant_names()}

    def limit_for(self, key: str) -> LimitSpec | None:
        """The first limit whose glob matches ``key`` (the nodes' own rule)."""
        import fnmatch

        return next((x for x in self.limits if fnmatch.fnmatchcase(key, x.pattern)), None)

    def cluster_toml(self, node_ports: Mapping[str, int], *, router_port: int, secret: str,
                     audit_dir: str | os.PathLike[str], host: str = "127.0.0.1",
                     node_hosts: Mapping[str, str] | None = None) -> str:
        """The cluster file (docs/CONTRACT.md) for this scenario and the given ports."""
        missing = [n for n in self.topology.node_ids if n not in node_ports]
        if missing:
            raise ScenarioError("node_ports", "a port for every node; missing " + ", ".join(missing))
        q = _toml_str
        lines = ["[cluster]", f"secret = {q(secret)}", f"gossip_interval_ms = {self.topology.gossip_interval_ms!r}",
                 f"mode = {q(self.mode)}", f"audit_dir = {q(os.fspath(audit_dir))}",
                 f"max_keys = {max(100_000, 2 * self.load.tenants)}", ""]
        for region in self.topology.regions:
            lines += ["[[regions]]", f"name = {q(region)}"]
            for nid in self.topology.nodes_of(region):
                node_host = (node_hosts or {}).get(nid, host)
                lines += ["[[regions.nodes]]", f"id = {q(nid)}", f"host = {q(node_host)}",
                          f"port = {_int('node_ports.' + nid, node_ports[nid], minimum=1, maximum=65535)}"]
            lines.append("")
        for limit in self.limits:
            lines += ["[[limits]]", f"pattern = {q(limit.pattern)}", f"rate = {limit.rate!r}",
                      f"burst = {limit.burst!r}", ""]
        lines.append("[api_keys]")
        lines += [f"{q(k)} = {q(t)}" for k, t in self.api_keys().items()]
        s = self.skill
        lines += ["", "[skill]", f"name = {q(SKILL_NAME)}", 'kind = "simulated"', f"median_ms = {s.median_ms!r}",
                  f"p99_ms = {s.p99_ms!r}", f"error_rate = {s.error_rate!r}", f"cpu_us = {s.cpu_us!r}", ""]
        matrix = ", ".join(f"{q(a)} = {{ " + ", ".join(f"{q(b)} = {ms!r}" for b, ms in row.items()) + " }"
                           for a, row in self.topology.latency_ms.items() if row)
        lines += ["[router]", f"host = {q(host)}",
                  f"port = {_int('router_port', router_port, minimum=0, maximum=65535)}",
                  f"health_interval_ms = {self.health_interval_ms!r}", f"latency_ms = {{ {matrix} }}", ""]
        return "\n".join(lines)

    def write_cluster_file(self, path: str | os.PathLike[str], node_ports: Mapping[str, int], *,
                           router_port: int, secret: str, audit_dir: str | os.PathLike[str],
                           host: str = "127.0.0.1", node_hosts: Mapping[str, str] | None = None) -> Path:
        """Write :meth:`cluster_toml` to ``path`` (parents created) and return the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.cluster_toml(node_ports, router_port=router_port, secret=secret, audit_dir=audit_dir,
                                         host=host, node_hosts=node_hosts), encoding="utf-8")
        return out


def _fault_from_dict(raw: Any, index: int) -> FaultAction:
    raw = _only(f"faults[{index}]", raw, _FAULT_KEYS)
    for key in ("at_s", "action"):
        if key not in raw:
            raise ScenarioError(f"faults[{index}].{key}", "a value (missing)")
    try:
        return FaultAction(**raw)
    except ScenarioError as exc:
        raise ScenarioError(exc.field.replace("faults.", f"faults[{index}].", 1), exc.expected, exc.got) from None


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are all valid TOML; DEL must be escaped too)."""
    return json.dumps(value).replace("\x7f", "\\u007f")



def __getattr__(name: str) -> Any:
    """``PARAMETERS`` moved to :mod:`workbench.parameters`; still importable from here."""
    if name == "PARAMETERS":
        from workbench.parameters import PARAMETERS

        return PARAMETERS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
