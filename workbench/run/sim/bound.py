"""The over-admission a correct ``eventual`` core may show under a given fault schedule, in tokens.

Derivation (one key, rate ``R``, burst ``B``; ``N`` nodes, gossip interval ``g``; the core's unseen-spend
share ``s = max(B/N, 4 R g)``; ``d`` = the longest time from a grant to its merge at a peer):

Take any window ``[a, t]`` and let node ``i`` be the node that admitted the last request of it.  Its
level is at most ``B`` at ``a``, gains at most ``R (t - a)`` of refill, loses its own grants and every
peer grant it merged, and is ``>= 0`` right after admitting at ``t``.  Every peer grant of ``[a, t]`` is
merged by ``t`` except what is still in flight, so

    admitted[a, t]  <=  B + R (t - a)  +  sum over peers j of unseen_j->i(t)  (+ what the debt floor cut)

1. **Steady state.**  ``unseen_j->i`` is at most ``s`` while ``i`` is live to ``j`` (the core's cap) and at
   most what ``j`` spends in ``d``: ``(N - 1) * max(s, R d)`` with ``d = max(g, round trip) + delay``.
   The nominal formula ``R (g + delay)`` assumes the load is spread so the peers' in-flight spend adds up
   to one stream at ``R``; a node refills at the *global* rate, so N - 1 peers each spending their
   refill before hearing of the others can reach ``(N - 1) R d`` -- the derived bound keeps that.
2. **Partitions** into ``k`` sides for ``P`` seconds: each extra side enforces alone from its own level
   (at most ``B``) plus ``R P`` of refill, until the first gossip after the heal reaches it (the failure
   back-off, at most 1 s, plus ``d``): ``(k - 1) (B + R (P + 1 s + d))``.  A lossy link counts as cut for
   its whole duration (a run of lost messages looks like a partition once the peer times out); a
   blackholed region or node is a side of its own.
3. **Kill / pause** of a node: its unseen spend is frozen (peers learn it late or never): ``s`` each.
   Back from its own silence, a node takes no debt from its peers' spends of it (``BucketTable.merge``):
   what that forgives is the refill its level lost to the cap while stopped, not an admission; the
   peers' own excess of that time is in the other terms.
4. **Restart with its data**: the chain of step 1 restarts at the boot, so one more steady term, plus
   the unseen spend of the dead process: ``(N - 1) max(s, R d) + s``.  **Without its data**
   (``restart_wiped``) the node starts full (``+ B``) and, if its clock is behind its old generation,
   spends up to ``s`` in a generation its peers ignore until it adopts its old entry (``+ s``).
5. **Clock skew**: a node whose clock steps forward by ``J`` refills ``R J`` at once (at most ``B``) and
   may see its peers as silent for a moment (``+ s``); stepping back only delays refill.  Two clocks
   more than ``edge_server.wire.MAX_SKEW_S`` (30 s) apart refuse each other's gossip as stale: that
   pair counts as cut (term 2) for as long as it lasts.
   Duplicated and reordered gossip add nothing (the replay guard refuses them; deltas are cumulative);
   reordering's hold-back counts in ``delay``.

The bound is the sum of every term; a schedule fails when a key's worst window excess exceeds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_server.wire import MAX_SKEW_S
from workbench.run.sim.network import BASE_DELAY_S, BASE_JITTER_S
from workbench.run.sim.schedule import UNDONE, SimFault
from workbench.spec.scenario import ROUTER, Scenario

__all__ = ["BACKOFF_S", "SKEW_MARGIN_S", "Bound", "StrictBound", "eventual_bound"]

BACKOFF_S = 1.0  # edge_server.gossip: a peer that failed 10 times is retried at most every second
SKEW_MARGIN_S = 1.0  # clocks this close to the replay guard's limit may already be refused (delay, jitter)


@dataclass
class Bound:
    """Schedule facts the bound needs; :meth:`terms` evaluates it for one limit."""

    nodes: int
    gossip_s: float
    delay_s: float  # longest one-way delay of a message on any link
    timeout_s: float  # a push's answer timeout
    cut_seconds: float = 0.0  # sum over time of (sides - 1) x seconds, lossy links counted as cut
    cut_episodes: list[int] = field(default_factory=list)  # most sides of each episode
    partition_seconds: float = 0.0  # the same for real partitions only (the nominal formula)
    kills: int = 0  # kills and pauses of running nodes
    restarts: int = 0
    wiped: int = 0
    skew_steps_s: list[float] = field(default_factory=list)  # forward clock steps

    @property
    def staleness_s(self) -> float:
        return max(self.gossip_s, min(2 * self.delay_s, self.timeout_s)) + self.delay_s

    def share(self, rate: float, burst: float) -> float:
        """``edge_server.token_bucket``'s unseen-spend share for this cluster."""
        return max(burst / self.nodes, rate * 4 * self.gossip_s)

    def terms(self, rate: float, burst: float) -> dict[str, float]:
        s = self.share(rate, burst)
        d = self.staleness_s
        steady = (self.nodes - 1) * max(s, rate * d)
        return {
            "steady": steady,
            "partitions": rate * self.cut_seconds
            + sum((k - 1) * (burst + rate * (BACKOFF_S + d)) for k in self.cut_episodes),
            "kills_pauses": self.kills * s,
            "restarts": self.restarts * (steady + s) + self.wiped * (steady + 2 * s + burst),
            "skew": sum(min(burst, rate * j) + s for j in self.skew_steps_s),
        }

    def tokens(self, rate: float, burst: float) -> float:
        return sum(self.terms(rate, burst).values())

    def nominal(self, rate: float, burst: float) -> float:
        """The issue's formula: ``R (g + delay) + sum (k - 1) R P`` over real partitions."""
        return rate * (self.gossip_s + self.delay_s) + rate * self.partition_seconds


class StrictBound(Bound):
    """Strict mode's bound: zero.  No allowance over the plain envelope ``B + R (t - s)``, whatever the
    schedule (``docs/strict-mode.md``, "Why it is safe")."""

    def __init__(self) -> None:
        super().__init__(nodes=1, gossip_s=0.0, delay_s=0.0, timeout_s=0.0)

    def terms(self, rate: float, burst: float) -> dict[str, float]:
        return {"strict": 0.0}

    def nominal(self, rate: float, burst: float) -> float:
        return 0.0


def _components(nodes: Sequence[str], up: set[str], cut: set[tuple[str, str]]) -> int:
    """Sides holding at least one running node, in the graph of links that are not cut."""
    seen: set[str] = set()
    sides = 0
    for start in nodes:
        if start in seen:
            continue
        stack, members = [start], []
        seen.add(start)
        while stack:
            a = stack.pop()
            members.append(a)
            for b in nodes:
                if b not in seen and (a, b) not in cut:
                    seen.add(b)
                    stack.append(b)
        sides += any(m in up for m in members)
    return sides


def eventual_bound(scenario: Scenario, faults: Sequence[SimFault]) -> Bound:
    """Sweep the schedule's timeline and collect what :class:`Bound` needs."""
    topo = scenario.topology
    nodes = list(topo.node_ids)
    g = topo.gossip_interval_ms / 1000.0
    bound = Bound(len(nodes), g, BASE_DELAY_S + BASE_JITTER_S, max(0.5, 10 * g))

    def members(name: str) -> set[str]:
        return set() if name == ROUTER else set(topo.resolve(name))

    def pairs(f: SimFault) -> list[tuple[str, str]]:
        if not f.link:
            return [(a, b) for a in nodes for b in nodes if a != b]
        a, b = members(f.link[0]), members(f.link[1])
        return [(x, y) for x in nodes for y in nodes if x != y and ((x in a and y in b) or (x in b and y in a))]

    steps: list[tuple[float, int, str, SimFault]] = []
    for i, f in enumerate(faults):
        steps.append((f.at_s, i, "do", f))
        if f.duration_s > 0 and f.action in UNDONE:
            steps.append((f.at_s + f.duration_s, i, "undo", f))
    steps.sort(key=lambda s: (s[0], s[1]))
    state = dict.fromkeys(nodes, "up")
    cuts: dict[int, set[tuple[str, str]]] = {}  # fault step -> the links it holds cut
    lossy: dict[tuple[str, str], float] = {}
    extra: dict[tuple[str, str], float] = {}  # added delay per link
    hold: dict[tuple[str, str], float] = {}  # reorder hold-back per link
    offsets = dict.fromkeys(nodes, 0.0)
    t_prev = 0.0
    episode = 0

    def close_segment(t: float) -> None:
        nonlocal episode
        span = t - t_prev
        if span <= 0:
            return
        up = {n for n, s in state.items() if s == "up"}
        part_cut = set().union(*cuts.values())
        clock_cut = {(a, b) for a in nodes for b in nodes if abs(offsets[a] - offsets[b]) > MAX_SKEW_S - SKEW_MARGIN_S}
        k_all = _components(nodes, up, part_cut | set(lossy) | clock_cut)
        k_part = _components(nodes, up, part_cut)
        if k_all >= 2:
            bound.cut_seconds += (k_all - 1) * span
            episode = max(episode, k_all)
        elif episode:
            bound.cut_episodes.append(episode)
            episode = 0
        if k_part >= 2:
            bound.partition_seconds += (k_part - 1) * span

    end = (scenario.duration_s, len(faults), "end", SimFault(scenario.duration_s, "heal"))
    for t, i, what, f in [*steps, end]:
        t = min(t, scenario.duration_s)
        close_segment(t)
        t_prev = t
        if what == "end":
            break
        a = f.action
        if what == "undo":
            cuts.pop(i, None)
            for p in pairs(f) if a not in ("partition", "blackhole") else []:
                {"loss": lossy, "latency": extra, "reorder": hold}.get(a, {}).pop(p, None)
            continue
        if a in ("kill", "pause"):
            for n in sorted(members(f.target)):
                if state[n] == "up":
                    bound.kills += 1
                    state[n] = "down" if a == "kill" else "paused"
                elif a == "kill":
                    state[n] = "down"
        elif a == "resume":
            for n in members(f.target):
                if state[n] == "paused":
                    state[n] = "up"
        elif a in ("restart", "restart_wiped"):
            for n in members(f.target):
                state[n] = "up"
                if a == "restart":
                    bound.restarts += 1
                else:
                    bound.wiped += 1
        elif a == "skew":
            for n in members(f.target):
                step = f.ms / 1000.0 - offsets[n]
                offsets[n] = f.ms / 1000.0
                if step > 0:
                    bound.skew_steps_s.append(step)
        elif a == "partition":
            owner = {n: gi for gi, grp in enumerate(f.groups) for m in grp for n in members(m)}
            cuts[i] = {(x, y) for x in nodes for y in nodes if x != y and owner.get(x, -1) != owner.get(y, -1)}
        elif a == "blackhole":
            held = members(f.target)
            cuts[i] = {(x, y) for x in nodes for y in nodes if x != y and (x in held or y in held)}
        elif a == "heal":
            cuts = {}
        elif a == "loss":
            for p in pairs(f):
                lossy[p] = f.pct
        elif a == "latency":
            for p in pairs(f):
                extra[p] = (f.ms + f.jitter_ms) / 1000.0
        elif a == "reorder":
            for p in pairs(f):
                hold[p] = f.ms / 1000.0
        worst = max((extra.get(p, 0.0) + hold.get(p, 0.0) for p in set(extra) | set(hold)), default=0.0)
        bound.delay_s = max(bound.delay_s, BASE_DELAY_S + BASE_JITTER_S + worst)
    if episode:
        bound.cut_episodes.append(episode)
    return bound
