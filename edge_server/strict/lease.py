"""A node's side of the floating lease: its requests, the voters' grants, and the share they give.

Every ``renew`` interval a node asks every voter; a voter answers with a *fraction* of the floating
budget.  A grant is valid from its arrival until ``send + L`` -- measured on the node's own monotonic
clock from the moment the *request* left, so a grant that took long to arrive, or a process that was
paused, can only shorten the lease, never stretch it.  The node's floating share at time ``t`` is

    phi(t) = sum over voters of (largest valid grant of that voter) / quorum

counted only when at least ``quorum`` voters of one epoch have a valid grant (the highest such
epoch wins).  A voter's grants never add up to more than ``quorum / members`` (see
``allocator.py``), and it counts each grant for ``L * (1 + rho) / (1 - rho)`` of its own clock, which
is at least as long as the node uses it, so the shares of all nodes never add up to more than 1.
A node cut off from a quorum has ``phi = 0`` within ``L``: it is fenced and keeps only its pinned
share.

Pure: ``now`` is always an argument.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from edge_server.strict.settings import StrictSettings

__all__ = ["Grant", "LeaseRequest", "NodeLease"]


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """A node asks one voter for (a renewal of) its floating share."""

    voter: str
    node: str
    incarnation: int
    req_id: int
    demand: float  # measured demand, in limits' rates (1.0 = one key's whole rate R)


@dataclass(frozen=True, slots=True)
class Grant:
    """A voter's answer.  ``fraction`` 0 with a ``reason`` is a refusal."""

    voter: str
    node: str
    incarnation: int
    req_id: int
    epoch: int
    quorum: int
    members: int
    fraction: float
    reason: str = ""


class _Held:
    __slots__ = ("end", "epoch", "fraction", "quorum", "start", "voter")

    def __init__(self, voter: str, epoch: int, quorum: int, fraction: float, start: float, end: float) -> None:
        self.voter, self.epoch, self.quorum = voter, epoch, quorum
        self.fraction, self.start, self.end = fraction, start, end


class NodeLease:
    """The grants one incarnation holds and the floating share ``phi(t)`` they add up to."""

    def __init__(self, node: str, incarnation: int, voters: Sequence[str], settings: StrictSettings) -> None:
        self.node, self.incarnation = node, incarnation
        self.voters = tuple(voters)
        self.settings = settings
        self._ids = itertools.count(1)
        self._sent: dict[int, float] = {}  # req_id -> our clock when the request left
        self._grants: list[_Held] = []
        self._last_request = -float("inf")
        self._cuts: list[float] = []  # sorted times where phi may change
        self._phis: list[float] = []  # phi on [cuts[i], cuts[i+1])
        self.refused: dict[str, int] = {}

    # ------------------------------------------------------------------ protocol

    def due(self, now: float) -> bool:
        return now - self._last_request >= self.settings.renew_s

    def requests(self, now: float, demand: float) -> list[LeaseRequest]:
        """One request per voter, stamped with ``now`` (the send time the lease is measured from)."""
        self._last_request = now
        out = []
        for voter in self.voters:
            req_id = next(self._ids)
            self._sent[req_id] = now
            out.append(LeaseRequest(voter, self.node, self.incarnation, req_id, max(0.0, demand)))
        horizon = now - self.settings.lease_s
        for req_id in [r for r, t in self._sent.items() if t < horizon]:
            del self._sent[req_id]
        return out

    def on_grant(self, grant: Grant, now: float) -> str:
        """Take a grant in; returns '' or the reason it was refused (counted in ``refused``)."""
        reason = ""
        sent = self._sent.get(grant.req_id)
        if grant.node != self.node or grant.incarnation != self.incarnation:
            reason = "wrong_incarnation"
        elif grant.voter not in self.voters:
            reason = "unknown_voter"
        elif sent is None:
            reason = "unknown_or_old_request"
        elif not (0.0 <= grant.fraction <= 1.0) or grant.quorum < 1 or grant.members < grant.quorum:
            reason = "malformed"
        elif grant.fraction == 0.0:
            reason = "refused_" + (grant.reason or "by_voter")
        elif sent + self.settings.lease_s <= now:
            reason = "expired"
        if reason:
            self.refused[reason] = self.refused.get(reason, 0) + 1
            return reason
        assert sent is not None
        self._sent.pop(grant.req_id)  # a duplicate of this grant is refused as unknown
        self._grants.append(_Held(grant.voter, grant.epoch, grant.quorum, grant.fraction,
                                  now, sent + self.settings.lease_s))
        self._rebuild_from(now)
        return ""

    def prune(self, now: float, horizon_s: float) -> None:
        """Forget grants that ended before ``now - horizon_s`` (older history counts as phi = 0).

        The step function keeps its cuts from the last one at or before that time: no forgotten grant
        is active there (each ended at a cut before it), so ``phi`` from there on is what it was."""
        cutoff = now - horizon_s
        keep = [g for g in self._grants if g.end >= cutoff]
        if len(keep) != len(self._grants):
            self._grants = keep
            j = max(0, bisect.bisect_right(self._cuts, cutoff) - 1)
            self._cuts, self._phis = self._cuts[j:], self._phis[j:]

    # ------------------------------------------------------------------ queries

    def _phi_at(self, t: float, grants: Sequence[_Held]) -> float:
        by_epoch: dict[int, dict[str, float]] = {}
        quorum: dict[int, int] = {}
        for g in grants:
            if g.start <= t < g.end:
                best = by_epoch.setdefault(g.epoch, {})
                best[g.voter] = max(best.get(g.voter, 0.0), g.fraction)
                quorum[g.epoch] = g.quorum
        for epoch in sorted(by_epoch, reverse=True):
            shares = by_epoch[epoch]
            if len(shares) >= quorum[epoch]:
                return min(1.0, sum(shares.values()) / quorum[epoch])
        return 0.0

    def _rebuild_from(self, since: float) -> None:
        """Recompute ``phi`` at and after ``since`` (a grant that arrived then changes nothing before).

        Only the grants ending after ``since`` can be active there.  Rebuilt whole, the step function
        cost O(grants x cuts) per grant -- a few dozen of each, 30 grants a second -- about 1 % of a
        busy strict node's CPU."""
        i = bisect.bisect_left(self._cuts, since)
        live = [g for g in self._grants if g.end > since]
        tail = sorted({t for g in live for t in (g.start, g.end) if t >= since})
        self._cuts = self._cuts[:i] + tail
        self._phis = self._phis[:i] + [self._phi_at(t, live) for t in tail]

    def steps(self) -> tuple[list[float], list[float]]:
        """``phi`` as a step function: ``phis[i]`` on ``[cuts[i], cuts[i + 1])``, 0 before ``cuts[0]``.

        Read-only.  The lists are replaced, never changed in place, when a grant comes in or is
        pruned: the table's hot path walks them itself instead of allocating :meth:`segments`.
        """
        return self._cuts, self._phis

    def phi(self, t: float) -> float:
        i = bisect.bisect_right(self._cuts, t) - 1
        return self._phis[i] if i >= 0 else 0.0

    def segments(self, a: float, b: float) -> list[tuple[float, float, float]]:
        """``(start, end, phi)`` pieces covering ``[a, b)``."""
        if b <= a:
            return []
        out = []
        t = a
        i = bisect.bisect_right(self._cuts, a)
        while t < b:
            nxt = self._cuts[i] if i < len(self._cuts) else b
            end = min(nxt, b)
            out.append((t, end, self.phi(t)))
            t = end
            i += 1
        return out

    def min_phi(self, a: float, b: float) -> float:
        pieces = self.segments(a, b)
        low = min((p for _s, _e, p in pieces), default=self.phi(a))
        return min(low, self.phi(b))

    def valid(self, t: float) -> bool:
        return self.phi(t) > 0.0

    def expires(self, now: float) -> float:
        """When phi next drops (inf if never scheduled), for ``/v1/state``-style views."""
        i = bisect.bisect_right(self._cuts, now)
        current = self.phi(now)
        for j in range(i, len(self._cuts)):
            if self._phis[j] < current:
                return self._cuts[j]
        return float("inf")

    def __repr__(self) -> str:
        return f"<NodeLease {self.node}#{self.incarnation} grants={len(self._grants)}>"
