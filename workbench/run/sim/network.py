"""The simulated network between nodes: per-link delay, jitter, loss, duplication, reordering and cuts.

Every directed node-to-node link has its own state.  A message is a callback scheduled at its
delivery time; a cut or a lost message is simply never delivered (the sender's timeout notices, as an
HTTP client would).  The router is not a node: a partition that places ``"router"`` in a group cuts it
from the nodes outside that group, which only the routing of client requests sees.

Base delay: the real drill runs every node on loopback behind fault proxies, where a gossip POST takes
a few milliseconds (HTTP, scheduling, merge); the simulator gives every message ``base_delay_s`` plus a
uniform jitter of up to ``base_jitter_s``.  The topology's latency matrix only steers the router (as
in a drill), so it adds nothing here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from workbench.run.sim.clock import Scheduler

__all__ = ["BASE_DELAY_S", "BASE_JITTER_S", "Link", "Network"]

BASE_DELAY_S = 0.002  # one-way delay of a gossip message on loopback through a proxy
BASE_JITTER_S = 0.003


class Link:
    """The fault state of one directed link."""

    __slots__ = ("added_s", "cut", "dup_pct", "jitter_s", "loss_pct", "reorder_pct", "reorder_s")

    def __init__(self) -> None:
        self.cut = False
        self.loss_pct = 0.0
        self.added_s = 0.0
        self.jitter_s = 0.0
        self.dup_pct = 0.0
        self.reorder_pct = 0.0
        self.reorder_s = 0.0


class Network:
    """Delivers node-to-node messages on the scheduler, drawing every random choice from ``rng``."""

    def __init__(self, sched: Scheduler, rng: random.Random, nodes: Iterable[str], *,
                 base_delay_s: float = BASE_DELAY_S, base_jitter_s: float = BASE_JITTER_S) -> None:
        self.sched = sched
        self.rng = rng
        self.nodes = tuple(nodes)
        self.base_delay_s = base_delay_s
        self.base_jitter_s = base_jitter_s
        self.links = {(a, b): Link() for a in self.nodes for b in self.nodes if a != b}
        self._cuts: dict[int, tuple[set[tuple[str, str]], set[str]]] = {}  # fault step -> what it holds cut
        self._router_blocked: set[str] = set()  # nodes the router cannot reach
        self.sent = self.delivered = self.dropped = self.duplicated = self.reordered = 0

    # ------------------------------------------------------------------ delivery
    def send(self, src: str, dst: str, fn: Callable[..., Any], *args: Any) -> None:
        """Deliver ``fn(*args)`` at ``dst`` after the link's delay, unless the link drops it."""
        self.sent += 1
        link = self.links[(src, dst)]
        if link.cut:
            self.dropped += 1
            return
        rand = self.rng.random
        if link.loss_pct and rand() * 100.0 < link.loss_pct:
            self.dropped += 1
            return
        delay = self.base_delay_s + rand() * self.base_jitter_s + link.added_s
        if link.jitter_s:
            delay += rand() * link.jitter_s
        if link.reorder_pct and rand() * 100.0 < link.reorder_pct:
            delay += rand() * link.reorder_s  # held back: later messages overtake it
            self.reordered += 1
        self.delivered += 1
        self.sched.after(delay, fn, *args)
        if link.dup_pct and rand() * 100.0 < link.dup_pct:
            self.duplicated += 1
            self.sched.after(delay + rand() * max(link.reorder_s, 2 * self.base_jitter_s), fn, *args)

    def router_reaches(self, node: str) -> bool:
        return node not in self._router_blocked

    # ------------------------------------------------------------------ faults
    def cut(self, step: int, pairs: set[tuple[str, str]], router_blocked: set[str]) -> None:
        """Hold ``pairs`` (directed links) cut, and the router cut from ``router_blocked``, for one fault
        step; a link stays cut while any step holds it (as the drill's nemesis does)."""
        self._cuts[step] = (pairs, router_blocked)
        self._recut()

    def uncut(self, step: int) -> None:
        self._cuts.pop(step, None)
        self._recut()

    def heal(self) -> None:
        """The ``heal`` action: lift every partition and blackhole (latency, loss, duplication and
        reordering stay, as on the drill's proxies)."""
        self._cuts.clear()
        self._recut()

    def _recut(self) -> None:
        held: set[tuple[str, str]] = set()
        blocked: set[str] = set()
        for pairs, router in self._cuts.values():
            held |= pairs
            blocked |= router
        for pair, link in self.links.items():
            link.cut = pair in held
        self._router_blocked = blocked

    def partition_pairs(self, groups: list[set[str]], router_in: int | None) -> tuple[set[tuple[str, str]], set[str]]:
        """What a partition into ``groups`` cuts: links between groups (nodes named in no group form one
        more group) and, when the router is in a group, the router from every node outside it."""
        owner = {node: i for i, group in enumerate(groups) for node in group}
        pairs = {p for p in self.links if owner.get(p[0], -1) != owner.get(p[1], -1)}
        blocked = set() if router_in is None else {n for n in self.nodes if owner.get(n, -1) != router_in}
        return pairs, blocked

    def blackhole_pairs(self, nodes: set[str]) -> tuple[set[tuple[str, str]], set[str]]:
        """Every link to and from ``nodes``, the router's included."""
        return {p for p in self.links if p[0] in nodes or p[1] in nodes}, set(nodes)

    def select(self, a: set[str] | None, b: set[str] | None) -> list[Link]:
        """Links between two node sets, both directions; ``None`` for both means every link."""
        if a is None or b is None:
            return list(self.links.values())
        return [link for (x, y), link in self.links.items() if (x in a and y in b) or (x in b and y in a)]
