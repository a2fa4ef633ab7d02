"""The flat parameters of a drill (what notebooks, the CLI and papermill set) and how they become a Scenario.

Every name here is a keyword of :meth:`workbench.spec.scenario.Scenario.build`; a test checks that each
notebook's ``parameters`` cell uses only these names (plus the notebook-only ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edge_server.config import STRICT_MIN_REGIONS, StrictConfig
from edge_server.strict.settings import MIN_LEASE_GOSSIPS, StrictSettingsError
from workbench.spec.parts import (
    DEFAULT_REGIONS,
    FaultAction,
    LimitSpec,
    LoadSpec,
    ScenarioError,
    SkillSpec,
    Topology,
    _fault_from_dict,
    _int,
    _num,
)

if TYPE_CHECKING:
    from workbench.spec.scenario import Scenario

__all__ = ["PARAMETERS", "build_scenario", "check_strict"]

# Flat parameters of Scenario.build: name -> (default, meaning).  Notebooks' papermill parameter
# cells and the CLI's flags use exactly these names (tests compare them), so keep them flat scalars.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "name": ("drill", "label of the run, used in results folder names"),
    "seed": (1, "seed of every random choice (arrivals, keys, skill latency, jitter)"),
    "duration_s": (30.0, "length of the run, seconds; every fault must happen by then"),
    "mode": ("eventual", "limiter mode of the nodes: 'eventual' or 'strict' (needs at least 3 regions)"),
    "regions": (3, "number of regions, named from region_names or eu, us, ap, sa, af, oc, r7, ..."),
    "region_names": ("", "comma-separated region names (overrides the defaults; count must match regions)"),
    "nodes_per_region": (1, "edge nodes in each region"),
    "region_latency_ms": (None, "None: the default latency table; a number: that latency between every pair"),
    "gossip_interval_ms": (20.0, "delta gossip period of every node, ms"),
    "replicate": (True, "ship every node's audit trail to a node of the next region (the check reads the replicas)"),
    "health_interval_ms": (100.0, "router's active health check period, ms"),
    "rate": (100.0, "global token rate per tenant, tokens/s"),
    "burst": (100.0, "global bucket size per tenant, tokens"),
    "limit_pattern": ("*", "glob of limiter keys the limit applies to"),
    "load_mode": ("open", "'open' (arrival rate) or 'closed' (users with think time)"),
    "load_rps": (150.0, "open loop: total arrivals per second over all regions"),
    "arrival": ("poisson", "open loop: 'constant' or 'poisson' inter-arrival gaps"),
    "users": (50, "closed loop: concurrent users over all regions"),
    "think_ms": (0.0, "closed loop: pause between a reply and the next request"),
    "region_weights": (None, "None: equal; else {region: weight} or 'eu=2,us=1' (missing regions get 0)"),
    "tenants": (1, "number of tenants (limiter keys)"),
    "key_dist": ("uniform", "'uniform' or 'zipf' choice of tenant per request"),
    "zipf_s": (1.1, "zipf exponent"),
    "cost": (1, "tokens per request"),
    "route": ("invoke", "'invoke' (skill call) or 'check' (/v1/limits/check)"),
    "processes": (1, "load generator processes"),
    "skill_median_ms": (50.0, "simulated skill median latency, ms"),
    "skill_p99_ms": (200.0, "simulated skill 99th percentile latency, ms"),
    "skill_error_rate": (0.0, "fraction of skill calls that fail (502)"),
    "skill_cpu_us": (0.0, "CPU burned per skill call, microseconds"),
    "skill_answer_bytes": (0, "size of the skill's LLM-like JSON answer, bytes (0: the bare rating, ~100 B)"),
    "kill_region_at_s": (None, "time to SIGKILL kill_region (None: no kill)"),
    "kill_region": ("", "region or node id to kill; '' = the busiest region (highest weight, first on ties)"),
    "restart_region_at_s": (None, "time to restart what kill_region_at_s killed (None: never)"),
    "pause_at_s": (None, "time to SIGSTOP pause_target (None: no pause)"),
    "pause_target": ("", "region or node id to pause; '' = the busiest region"),
    "resume_at_s": (None, "time to SIGCONT the paused target (None: never)"),
    "partition_at_s": (None, "time to partition (None: no partition)"),
    "partition_groups": ("", "sides as 'eu|us,ap' ('|' between sides, ',' within); '' = every region alone"),
    "blackhole_at_s": (None, "time to blackhole blackhole_region: its links drop traffic silently (None: none)"),
    "blackhole_region": ("", "region or node id to blackhole; '' = the busiest region"),
    "heal_at_s": (None, "time to heal every partition and blackhole (None: never)"),
    "latency_at_s": (None, "time to add latency on latency_link (None: none)"),
    "latency_link": ("", "two ends 'eu,us' (regions, node ids or router); '' = every link"),
    "latency_add_ms": (100.0, "added delay, ms"),
    "latency_jitter_ms": (0.0, "added jitter, ms"),
    "latency_duration_s": (0.0, "remove the latency after this long (0: until heal)"),
    "loss_at_s": (None, "time to start dropping on loss_link (None: none)"),
    "loss_link": ("", "two ends 'eu,us'; '' = every link"),
    "loss_pct": (10.0, "percent of chunks dropped"),
    "loss_duration_s": (0.0, "stop the loss after this long (0: until heal)"),
    "faults": (None, "extra timeline steps, a list of FaultAction dicts"),
    "faults_backend": ("proxy", "'proxy' (userspace fault proxies, no privileges) or 'netns' (a network "
                       "namespace per process, cuts as kernel routes; needs root and ip netns)"),
    "results_dir": (None, "where results go (None: the caller decides)"),
}
_FLAT = {"limits.rate": "rate", "limits.burst": "burst", "limits.pattern": "limit_pattern",
         "load.mode": "load_mode", "load.rate_rps": "load_rps", "topology.gossip_interval_ms": "gossip_interval_ms",
         "topology.replicate": "replicate",
         "topology.nodes_per_region": "region_names"}  # nested field -> flat parameter, for build's errors
def _split(name: str, text: Any, sep: str) -> list[str]:
    if not isinstance(text, str):
        raise ScenarioError(name, f"a '{sep}'-separated string", text)
    return [part.strip() for part in text.split(sep) if part.strip()]


def _weights(value: Any, regions: Sequence[str]) -> dict[str, float]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        out: dict[str, float] = {}
        for part in _split("region_weights", value, ","):
            region, eq, weight = part.partition("=")
            try:
                out[region.strip()] = float(weight) if eq else math.nan
            except ValueError:
                raise ScenarioError("region_weights", "'region=weight,...'", value) from None
            if not eq or math.isnan(out[region.strip()]):
                raise ScenarioError("region_weights", "'region=weight,...'", value)
        value = out
    if not isinstance(value, Mapping):
        raise ScenarioError("region_weights", "a mapping region -> weight or 'eu=2,us=1'", value)
    return {r: value.get(r, 0.0) for r in regions} | dict(value)


def _flat_name(nested: str) -> str | None:
    """The flat parameter of :meth:`Scenario.build` that a nested field came from, if any."""
    if nested in PARAMETERS or nested in _FLAT:
        return _FLAT.get(nested, nested)
    head, _, rest = nested.partition(".")
    if head == "load":
        return "region_weights" if rest.startswith("region_weights") else rest if rest in PARAMETERS else None
    if head == "skill":
        return f"skill_{rest}"
    return None


def check_strict(scenario: Scenario) -> None:
    """A strict scenario the nodes would refuse raises :class:`ScenarioError` (for a scenario file in the
    nested form, which :meth:`Scenario.build` did not see).  Not part of the scenario's own checks: the
    simulator also runs strict mode on 2-region schedules, which real nodes refuse."""
    if scenario.mode == "strict":
        _strict_refusals(len(scenario.topology.regions), scenario.topology.gossip_interval_ms)


def _strict_refusals(regions: int, gossip_interval_ms: Any) -> None:
    """What the nodes' config parser refuses in strict mode, refused here already: a drill or notebook
    stops at its parameters instead of at a node that will not start (exit 2, not 1)."""
    if regions < STRICT_MIN_REGIONS:
        raise ScenarioError("regions", f"at least {STRICT_MIN_REGIONS} regions in strict mode (one voter each: "
                            "a quorum of regions must survive the loss of one)", regions)
    gossip = _num("gossip_interval_ms", gossip_interval_ms, positive=True)
    lease_ms = StrictConfig().lease_ms  # the nodes' default [strict] table
    try:
        StrictConfig().settings(gossip)
    except StrictSettingsError:
        raise ScenarioError("gossip_interval_ms", f"at most {lease_ms / MIN_LEASE_GOSSIPS:g} ms in strict mode (the "
                            f"nodes' lease of {lease_ms:g} ms must outlive {MIN_LEASE_GOSSIPS} gossip intervals)",
                            gossip) from None


def build_scenario(cls: type[Scenario], params: Mapping[str, Any]) -> Scenario:
    """``Scenario.build``: flat parameters to a validated scenario; errors name the flat parameter."""
    try:
        return _build(cls, dict(params))
    except ScenarioError as exc:
        flat = _flat_name(exc.field)
        if flat is None:
            raise
        raise ScenarioError(flat, exc.expected, exc.got) from None


def _build(cls: type[Scenario], params: dict[str, Any]) -> Scenario:
    for key in params:
        if key not in PARAMETERS:
            raise ScenarioError(key, "a parameter of Scenario.build (unknown key); known: "
                                + ", ".join(PARAMETERS))
    p = {name: default for name, (default, _doc) in PARAMETERS.items()} | params
    count = _int("regions", p["regions"], minimum=1, maximum=64)
    names = _split("region_names", p["region_names"], ",") if p["region_names"] else [
        DEFAULT_REGIONS[i] if i < len(DEFAULT_REGIONS) else f"r{i + 1}" for i in range(count)]
    if len(names) != count or len(set(names)) != count:
        raise ScenarioError("region_names", f"{count} distinct names (regions = {count})", p["region_names"])
    per_region = _int("nodes_per_region", p["nodes_per_region"], minimum=1, maximum=64)
    if p["mode"] == "strict":
        _strict_refusals(count, p["gossip_interval_ms"])
    flat_ms = p["region_latency_ms"]
    matrix = {} if flat_ms is None else {
        a: {b: _num("region_latency_ms", flat_ms) for b in names if b != a} for a in names}
    topology = Topology(dict.fromkeys(names, per_region), matrix, p["gossip_interval_ms"], p["replicate"])
    weights = _weights(p["region_weights"], names)
    load = LoadSpec(mode=p["load_mode"], rate_rps=p["load_rps"], arrival=p["arrival"], users=p["users"],
                    think_ms=p["think_ms"], region_weights=weights, tenants=p["tenants"],
                    key_dist=p["key_dist"], zipf_s=p["zipf_s"], cost=p["cost"], route=p["route"],
                    processes=p["processes"])
    busiest = max(names, key=lambda r: (load.region_weights.get(r, 1.0), -names.index(r)))
    faults: list[FaultAction] = []

    def at(key: str) -> float | None:
        return None if p[key] is None else _num(key, p[key])

    def step(key: str, action: str, names: Mapping[str, str] = MappingProxyType({}), **kw: Any) -> None:
        """Add one timeline step; errors name the flat parameter (``names``: fault field -> flat)."""
        if (t := at(key)) is not None:
            try:
                fault = FaultAction(t, action, **kw)
                fault.check_against(topology, _num("duration_s", p["duration_s"], positive=True), 0)
            except ScenarioError as exc:
                raise ScenarioError(names.get(exc.field.rpartition(".")[2], key), exc.expected, exc.got) from None
            faults.append(fault)

    def link(key: str) -> tuple[str, ...]:
        ends = _split(key, p[key], ",")
        if len(ends) not in (0, 2):
            raise ScenarioError(key, "two ends 'a,b' or '' for every link", p[key])
        return tuple(ends)

    killed = p["kill_region"] or busiest
    paused = p["pause_target"] or busiest
    groups = [tuple(_split("partition_groups", side, ",")) for side in _split("partition_groups",
                                                                                p["partition_groups"], "|")]
    step("kill_region_at_s", "kill", {"target": "kill_region"}, target=killed)
    step("restart_region_at_s", "restart", {"target": "kill_region"}, target=killed)
    step("pause_at_s", "pause", {"target": "pause_target"}, target=paused)
    step("resume_at_s", "resume", {"target": "pause_target"}, target=paused)
    step("partition_at_s", "partition", {"groups": "partition_groups"},
         groups=groups or [(r,) for r in names])
    step("blackhole_at_s", "blackhole", {"target": "blackhole_region"}, target=p["blackhole_region"] or busiest)
    step("heal_at_s", "heal")
    step("latency_at_s", "latency", {"link": "latency_link", "ms": "latency_add_ms",
                                     "jitter_ms": "latency_jitter_ms", "duration_s": "latency_duration_s"},
         link=link("latency_link"), ms=p["latency_add_ms"], jitter_ms=p["latency_jitter_ms"],
         duration_s=p["latency_duration_s"])
    step("loss_at_s", "loss", {"link": "loss_link", "pct": "loss_pct", "duration_s": "loss_duration_s"},
         link=link("loss_link"), pct=p["loss_pct"], duration_s=p["loss_duration_s"])
    extra = p["faults"] or []
    if not isinstance(extra, Sequence) or isinstance(extra, str):
        raise ScenarioError("faults", "a list of fault dicts", extra)
    faults.extend(_fault_from_dict(item, i) for i, item in enumerate(extra))
    return cls(name=p["name"], topology=topology,
               limits=(LimitSpec(p["limit_pattern"], p["rate"], p["burst"]),), load=load,
               skill=SkillSpec(p["skill_median_ms"], p["skill_p99_ms"], p["skill_error_rate"],
                               p["skill_cpu_us"], p["skill_answer_bytes"]),
               faults=tuple(faults), duration_s=p["duration_s"], seed=p["seed"], mode=p["mode"],
               health_interval_ms=p["health_interval_ms"], results_dir=p["results_dir"],
               faults_backend=p["faults_backend"])
