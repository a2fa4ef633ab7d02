"""Outages from the applied faults: which nodes the clients could not reach, from when to when.

One :class:`Outage` per fault that takes nodes away from the clients: ``kill`` (until those nodes
are restarted), ``pause`` (until resumed), ``blackhole`` of a region or node (until ``heal``, its
timed ``end_blackhole``, or the run's end) and a ``partition`` whose groups name the router (every
node not on the router's side, until ``heal`` / ``end_partition``).  :class:`OutageLog` is fed one
fault at a time, so the live view and the final verdict build the very same outages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from workbench.history import FaultRecord
from workbench.spec.scenario import ROUTER, Topology

__all__ = ["OUTAGE_ACTIONS", "Outage", "OutageLog", "build_log"]

OUTAGE_ACTIONS = ("kill", "pause", "blackhole", "partition")
_NETWORK_HEALS = {"heal": ("blackhole", "partition"), "end_partition": ("partition",),
                  "end_blackhole": ("blackhole",)}


@dataclass
class Outage:
    """Nodes the clients could not reach during ``[start_s, end_s)``; ``end_s`` is inf while open."""

    kind: str  # kill, pause, blackhole, partition
    target: str  # the fault's target as recorded (region, node id, partition label)
    start_s: float
    nodes: frozenset[str]
    regions: tuple[str, ...]  # the regions of those nodes: whose clients are affected
    end_s: float = math.inf
    waiting: set[str] = field(default_factory=set)  # nodes not yet back (kill / pause)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.target} at {self.start_s:.3f}s"

    def covers(self, node: str, t_s: float) -> bool:
        return node in self.nodes and self.start_s <= t_s < self.end_s


class OutageLog:
    """Outages built incrementally from fault records in the order they were applied."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.outages: list[Outage] = []
        self.network_cuts = 0  # partitions / blackholes still in force (any kind, router or not)
        self._cuts: dict[str, int] = {"partition": 0, "blackhole": 0}

    def _nodes(self, target: str) -> tuple[str, ...]:
        try:
            return self.topology.resolve(target) if target else ()
        except KeyError:
            return ()

    def _regions(self, nodes: frozenset[str]) -> tuple[str, ...]:
        return tuple(r for r in self.topology.regions if any(n in nodes for n in self.topology.nodes_of(r)))

    def _open(self, kind: str, target: str, t_s: float, nodes: frozenset[str]) -> None:
        if nodes:
            self.outages.append(Outage(kind, target, t_s, nodes, self._regions(nodes), waiting=set(nodes)))

    def add(self, f: FaultRecord) -> None:
        """Apply one fault record (faults must come in time order)."""
        action = f.action
        if action in ("kill", "pause"):
            self._open(action, f.target, f.t_s, frozenset(self._nodes(f.target)))
        elif action in ("restart", "resume"):
            back = set(self._nodes(f.target))
            for o in self.outages:
                if o.kind == ("kill" if action == "restart" else "pause") and o.end_s == math.inf:
                    o.waiting -= back
                    if not o.waiting:
                        o.end_s = f.t_s
        elif action == "blackhole":
            self._cuts["blackhole"] += 1
            self._open("blackhole", f.target, f.t_s, frozenset(self._nodes(f.target)))
        elif action == "partition":
            self._cuts["partition"] += 1
            groups = (f.detail or {}).get("groups") or []
            router_side = next((g for g in groups if ROUTER in g), None)
            if router_side is not None:
                reachable = {n for m in router_side for n in self._nodes(m)}
                cut = frozenset(n for n in self.topology.node_ids if n not in reachable)
                self._open("partition", f.target, f.t_s, cut)
        elif action in _NETWORK_HEALS:
            kinds = _NETWORK_HEALS[action]
            for kind in kinds:
                self._cuts[kind] = 0
            for o in self.outages:
                if o.kind in kinds and o.end_s == math.inf and (
                        action == "heal" or o.kind == "partition" or not f.target or f.target == o.target):
                    o.end_s = f.t_s
        self.network_cuts = sum(self._cuts.values())

    def down(self, node: str, t_s: float) -> bool:
        """Whether clients could not reach ``node`` at ``t_s``."""
        return any(o.covers(node, t_s) for o in self.outages)

    def region_down(self, region: str, t_s: float) -> bool:
        """Every node of ``region`` is down at ``t_s``."""
        nodes = self.topology.nodes_of(region) if region in self.topology.nodes_per_region else ()
        return bool(nodes) and all(self.down(n, t_s) for n in nodes)

    def down_at_end(self, node: str, kinds: tuple[str, ...] = ("kill", "pause")) -> Outage | None:
        """The outage of one of ``kinds`` that still holds ``node`` at the run's end, if any."""
        return next((o for o in reversed(self.outages)
                     if o.kind in kinds and o.end_s == math.inf and node in o.nodes), None)

    def last_death(self, node: str) -> float | None:
        """When ``node`` last went down by a kill or a pause (None: never)."""
        return max((o.start_s for o in self.outages if o.kind in ("kill", "pause") and node in o.nodes),
                   default=None)


def build_log(faults: list[FaultRecord], topology: Topology) -> OutageLog:
    """Every fault of a finished run, in time order."""
    log = OutageLog(topology)
    for f in sorted(faults, key=lambda f: f.t_s):
        log.add(f)
    return log

