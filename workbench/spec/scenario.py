"""The single input of a drill: a frozen, validated scenario spec.

A scenario comes from flat keyword arguments (notebook / papermill parameters, CLI flags) through
:meth:`Scenario.build`, from its nested dict form (:meth:`Scenario.from_dict`, the exact inverse of
:meth:`Scenario.to_dict`) or from a TOML / YAML file holding either form.  Everything downstream
(cluster file, load, faults, checker) reads this object and nothing else, so a bad value is refused
here with a :class:`ScenarioError` that names the field, before any process starts.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_server.config import (
    MODES,
    AuditConfig,
    ClusterConfig,
    LimitRule,
    NodeSpec,
    RegionSpec,
    RouterConfig,
    SkillConfig,
)
from edge_server.config_dump import dump_cluster, write_cluster
from workbench.spec.parameters import PARAMETERS, build_scenario
from workbench.spec.parts import (
    _LOAD_KEYS,
    _SKILL_KEYS,
    ACTIONS,
    DEFAULT_REGIONS,
    FAULTS_BACKENDS,
    ROUTER,
    FaultAction,
    LimitSpec,
    LoadSpec,
    ScenarioError,
    SkillSpec,
    Topology,
    _choice,
    _fault_from_dict,
    _int,
    _num,
    _only,
    _set,
    default_latency_ms,
)

__all__ = [
    "ACTIONS",
    "DEFAULT_REGIONS",
    "PARAMETERS",
    "ROUTER",
    "SKILL_NAME",
    "FaultAction",
    "LimitSpec",
    "LoadSpec",
    "Scenario",
    "ScenarioError",
    "SkillSpec",
    "Topology",
    "default_latency_ms",
]

_TOP_KEYS = ("name", "seed", "duration_s", "mode", "health_interval_ms", "results_dir", "faults_backend",
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
    faults_backend: str = "proxy"  # "proxy" (userspace fault proxies) or "netns" (namespaces, kernel routes)

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
        _choice("faults_backend", self.faults_backend, FAULTS_BACKENDS)
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
        return tuple(PARAMETERS)

    @staticmethod
    def parameter_defaults() -> dict[str, Any]:
        return {name: default for name, (default, _doc) in PARAMETERS.items()}

    @classmethod
    def build(cls, **params: Any) -> Scenario:
        """Build from flat keyword parameters (see ``workbench.spec.parameters.PARAMETERS``).

        Errors name the flat parameter (``rate``, ``kill_region_at_s``), not the nested field.
        """
        return build_scenario(cls, params)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Scenario:
        """The inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys are refused."""
        raw = _only("", raw, _TOP_KEYS)
        kw: dict[str, Any] = {k: raw[k] for k in ("name", "seed", "duration_s", "mode", "health_interval_ms",
                                                  "results_dir", "faults_backend") if k in raw}
        if "topology" in raw:
            t = _only("topology", raw["topology"], ("nodes_per_region", "latency_ms", "gossip_interval_ms",
                                                     "replicate"))
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
            "faults_backend": self.faults_backend, "topology": self.topology.to_dict(),
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

    def cluster_config(self, node_ports: Mapping[str, int], *, router_port: int, secret: str,
                       audit_dir: str | os.PathLike[str], host: str = "127.0.0.1",
                       node_hosts: Mapping[str, str] | None = None) -> ClusterConfig:
        """The nodes' own config (``edge_server.config``) for this scenario and the given ports."""
        missing = [n for n in self.topology.node_ids if n not in node_ports]
        if missing:
            raise ScenarioError("node_ports", "a port for every node; missing " + ", ".join(missing))
        regions = tuple(
            RegionSpec(region, tuple(NodeSpec(nid, region, (node_hosts or {}).get(nid, host),
                                              _int("node_ports." + nid, node_ports[nid], minimum=1, maximum=65535))
                                     for nid in self.topology.nodes_of(region)))
            for region in self.topology.regions)
        s = self.skill
        return ClusterConfig(
            source=f"<scenario {self.name}>", secret=secret.encode(),
            gossip_interval_ms=float(self.topology.gossip_interval_ms), mode=self.mode, regions=regions,
            limits=tuple(LimitRule(x.pattern, float(x.rate), float(x.burst)) for x in self.limits),
            api_keys=self.api_keys(),
            skill=SkillConfig(name=SKILL_NAME, kind="simulated", median_ms=float(s.median_ms),
                              p99_ms=float(s.p99_ms), error_rate=float(s.error_rate), cpu_us=float(s.cpu_us),
                              answer_bytes=int(s.answer_bytes)),
            audit_dir=Path(audit_dir), audit=AuditConfig(replicate=self.topology.replicate),
            max_keys=max(100_000, 2 * self.load.tenants),
            router=RouterConfig(host=host, port=_int("router_port", router_port, minimum=0, maximum=65535),
                                health_interval_ms=float(self.health_interval_ms),
                                latency_ms={a: dict(row) for a, row in self.topology.latency_ms.items() if row}))

    def cluster_toml(self, node_ports: Mapping[str, int], *, router_port: int, secret: str,
                     audit_dir: str | os.PathLike[str], host: str = "127.0.0.1",
                     node_hosts: Mapping[str, str] | None = None) -> str:
        """The cluster file (docs/CONTRACT.md) for this scenario: :meth:`cluster_config`, written by the
        nodes' own writer (``edge_server.config.dump_cluster``, the inverse of their parser)."""
        return dump_cluster(self.cluster_config(node_ports, router_port=router_port, secret=secret,
                                                audit_dir=audit_dir, host=host, node_hosts=node_hosts))

    def write_cluster_file(self, path: str | os.PathLike[str], node_ports: Mapping[str, int], *,
                           router_port: int, secret: str, audit_dir: str | os.PathLike[str],
                           host: str = "127.0.0.1", node_hosts: Mapping[str, str] | None = None) -> Path:
        """Write :meth:`cluster_toml` to ``path`` (parents created) and return the path."""
        return write_cluster(path, self.cluster_config(node_ports, router_port=router_port, secret=secret,
                                                       audit_dir=audit_dir, host=host, node_hosts=node_hosts))
