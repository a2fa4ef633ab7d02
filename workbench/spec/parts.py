"""The parts of a scenario: topology, limits, load, skill and fault actions, each frozen and validated.

Validation errors are :class:`ScenarioError` naming the nested field; :mod:`workbench.spec.parameters`
renames them to the flat parameter, :mod:`workbench.spec.scenario` assembles the whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "ACTIONS",
    "DEFAULT_REGIONS",
    "FAULTS_BACKENDS",
    "TARGETED",
    "UNDONE",
    "FaultAction",
    "LimitSpec",
    "LoadSpec",
    "ScenarioError",
    "SkillSpec",
    "Topology",
    "default_latency_ms",
    "fault_fields",
]

DEFAULT_REGIONS = ("eu", "us", "ap", "sa", "af", "oc")
ACTIONS = ("partition", "heal", "blackhole", "latency", "loss", "kill", "pause", "resume", "restart")
TARGETED = ("kill", "pause", "resume", "restart", "blackhole")  # actions that name a target
UNDONE = ("latency", "loss", "partition", "blackhole")  # actions that duration_s > 0 undoes
FAULTS_BACKENDS = ("proxy", "netns")  # how network faults are made: userspace proxies, or kernel routes
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
    replicate: bool = True  # every node's audit trail to one node of the next region ([audit] replicate)

    def __post_init__(self) -> None:
        if not isinstance(self.nodes_per_region, Mapping) or not self.nodes_per_region:
            raise ScenarioError("topology.nodes_per_region", "a non-empty mapping region -> node count",
                                self.nodes_per_region)
        counts = {_name("topology.nodes_per_region", r): _int(f"topology.nodes_per_region.{r}", n, minimum=1)
                  for r, n in self.nodes_per_region.items()}
        if not isinstance(self.replicate, bool):
            raise ScenarioError("topology.replicate", "true or false", self.replicate)
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
                "gossip_interval_ms": self.gossip_interval_ms, "replicate": self.replicate}


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
    honor_retry_after: bool = True  # closed loop: after a 503 / 429 with Retry-After, wait that long
    client: str = "aiohttp"  # the generator's HTTP client: "aiohttp", or "lean" (workbench.run.load.lean)

    def __post_init__(self) -> None:
        _choice("load.mode", self.mode, ("open", "closed"))
        if not isinstance(self.honor_retry_after, bool):
            raise ScenarioError("load.honor_retry_after", "true or false", self.honor_retry_after)
        _choice("load.arrival", self.arrival, ("constant", "poisson"))
        _choice("load.client", self.client, ("aiohttp", "lean"))
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
    answer_bytes: int = 0  # about this many bytes of LLM-like JSON answer (0: the bare rating)

    def __post_init__(self) -> None:
        if isinstance(self.answer_bytes, bool) or not isinstance(self.answer_bytes, int) or not (
                0 <= self.answer_bytes <= 1_000_000):
            raise ScenarioError("skill.answer_bytes", "an integer between 0 and 1000000", self.answer_bytes)
        _set(self, median_ms=_num("skill.median_ms", self.median_ms),
             p99_ms=_num("skill.p99_ms", self.p99_ms),
             error_rate=_num("skill.error_rate", self.error_rate, maximum=1.0),
             cpu_us=_num("skill.cpu_us", self.cpu_us))
        if self.p99_ms < self.median_ms:
            raise ScenarioError("skill.p99_ms", f"a number >= skill.median_ms ({self.median_ms:g})", self.p99_ms)


@dataclass(frozen=True)
class FaultAction:
    """One step of the fault timeline, applied ``at_s`` seconds after the run starts.

    ``target`` (kill, pause, resume, restart) is a region, a node id or ``"router"``; for blackhole a
    region or node id, every link to and from whose nodes (the router's included) then drops traffic
    silently.  ``groups`` (partition) lists sides; one group is cut off from everything else.  ``link``
    (latency, loss) names two ends (regions, node ids or ``"router"``); empty means every link.
    ``duration_s`` > 0 undoes a latency / loss / partition / blackhole after that long; ``heal``
    undoes every partition and blackhole.
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
        needs_target = self.action in TARGETED
        if needs_target != bool(self.target):
            raise ScenarioError("faults.target", f"{'a' if needs_target else 'no'} target for {self.action}",
                                self.target)
        if (self.action == "partition") != bool(self.groups):
            raise ScenarioError("faults.groups", f"{'groups' if self.action == 'partition' else 'no groups'} "
                                f"for {self.action}", [list(g) for g in self.groups])
        if self.action == "blackhole" and self.target == ROUTER:
            raise ScenarioError("faults.target", "a region or node id for blackhole (the router's clients "
                                "reach it directly; blackhole its regions instead)", self.target)
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
        return fault_fields(self)


def fault_fields(fault: Any) -> dict[str, Any]:
    """The set fields of a fault step (a drill's :class:`FaultAction` or a simulator's fault, which share
    these field names) as a plain dict: ``at_s`` and ``action`` always, the rest only when set."""
    out: dict[str, Any] = {"at_s": fault.at_s, "action": fault.action}
    if fault.target:
        out["target"] = fault.target
    if fault.groups:
        out["groups"] = [list(g) for g in fault.groups]
    if fault.link:
        out["link"] = list(fault.link)
    for key in ("ms", "jitter_ms", "pct", "duration_s"):
        if getattr(fault, key):
            out[key] = getattr(fault, key)
    return out


_FAULT_KEYS = ("at_s", "action", "target", "groups", "link", "ms", "jitter_ms", "pct", "duration_s")
_LOAD_KEYS = tuple(LoadSpec.__dataclass_fields__)
_SKILL_KEYS = tuple(SkillSpec.__dataclass_fields__)


def _fault_from_dict(raw: Any, index: int) -> FaultAction:
    raw = _only(f"faults[{index}]", raw, _FAULT_KEYS)
    for key in ("at_s", "action"):
        if key not in raw:
            raise ScenarioError(f"faults[{index}].{key}", "a value (missing)")
    try:
        return FaultAction(**raw)
    except ScenarioError as exc:
        raise ScenarioError(exc.field.replace("faults.", f"faults[{index}].", 1), exc.expected, exc.got) from None
