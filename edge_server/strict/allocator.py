"""The allocation quorum: one voter per region grants floating shares and reclaims them.

**Why no consensus on the request path.**  A voter of an epoch with ``n`` members and quorum
``m = n // 2 + 1`` never grants more than ``m / n`` of the floating budget in total, and a node's
share is ``sum(grants) / m``.  Summing over nodes, the shares are at most ``n * (m / n) / m = 1``,
whatever each voter knows about the others: no two voters need to agree on a table, and a voter
answers a request from its own ledger alone.  A node with grants from fewer than ``m`` voters has no
floating share at all, so a minority is fenced.

**Reclaim.**  A voter counts a grant for ``L * (1 + rho) / (1 - rho)`` of its own clock from the
moment it granted it -- longer than the node, which measures ``L`` from the earlier moment its request
left, can use it.  A dead or cut-off node simply stops renewing; its ledger entries run out and the
headroom goes to the nodes that still ask.  Shares follow measured demand, and a decrease takes
effect before the matching increase because the old, larger grant stays in the ledger until it runs
out.

**Incarnations.**  A newer incarnation of a node is *adopted* only once the current one has been
silent for ``L * (1 + rho) / (1 - rho)``: no request of it heard and no grant of it counted.  Until
then a request of the newer one is refused (``old_incarnation_lease``) and changes nothing -- so a
message that merely *claims* a newer incarnation cannot fence a live node, and a really restarted
node gets nothing until every grant of its old incarnation has run out.  Once adopted, the old
incarnation is refused (``old_incarnation``).

**What survives a restart.**  :meth:`Voter.pending_ledger` hands the caller a JSON document of what
a restarted voter must remember -- epoch, members, the proposal it accepted, the adopted incarnation
of every node, and for every node with a live grant an upper bound of its share -- whenever one of
those grew; the caller makes it durable *before* the messages of that step leave (write-ahead).
:meth:`Voter.restore` starts from it: every saved grant counts again for a whole
``L * (1 + rho) / (1 - rho)`` from the restart (the time spent down is unknown), so the voter may
grant the rest of its capacity at once and never overlaps a grant it made before.  A voter with no
document (first start, or its data directory lost) grants nothing for that long instead.

**Membership.**  A voter silent for ``voter_dead`` is voted out (and a returning one voted back in)
by a new epoch: the lowest-named live member proposes ``(epoch + 1, members)``; every member of the
current epoch accepts at most one proposal per epoch and stops granting for the current epoch when
it accepts; a majority of accepts commits it.  Every valid lease of the old epoch holds a grant from
some accepting member made before it accepted, hence before the commit, so members of the new
epoch grant only ``L * (1 + rho) / (1 - rho)`` after they learn the commit (one commit round plus
the reclaim wait).  Known limit: two proposals for the same epoch that split the votes leave the
membership where it is (the old epoch keeps working for whoever still reaches its quorum).

Pure: every method takes ``now`` (the voter's own monotonic clock) and returns messages.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_server.strict.lease import Grant, LeaseRequest
from edge_server.strict.settings import StrictSettings

__all__ = ["LEDGER_VERSION", "Accept", "Commit", "Hello", "LedgerError", "Propose", "Voter", "VoterMessage",
           "quorum_of"]

LEDGER_VERSION = 1  # the "v" of a saved voter ledger; another value is refused (the voter then waits)
BOUND_STEPS = 32  # a saved share is rounded up to 1/32: a small rise needs no new write


class LedgerError(ValueError):
    """A saved voter ledger that cannot be used (garbled, another version, another cluster)."""


def quorum_of(members: int) -> int:
    return members // 2 + 1


@dataclass(frozen=True, slots=True)
class Hello:
    """Heartbeat between voters; carries the sender's committed epoch so laggards catch up."""

    sender: str
    epoch: int
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Propose:
    sender: str
    epoch: int  # the new epoch
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Accept:
    sender: str
    epoch: int
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Commit:
    sender: str
    epoch: int
    members: tuple[str, ...]


VoterMessage = Hello | Propose | Accept | Commit


class _Entry:
    __slots__ = ("fraction", "incarnation", "until")

    def __init__(self, incarnation: int, fraction: float, until: float) -> None:
        self.incarnation, self.fraction, self.until = incarnation, fraction, until


class Voter:
    """One region's voter.  Addressed by ``voter_id``; talks to the other voters by messages."""

    def __init__(self, voter_id: str, voters: Sequence[str], nodes: Sequence[str], settings: StrictSettings,
                 *, now: float, restarted: bool = False) -> None:
        if voter_id not in voters:
            raise ValueError(f"voter {voter_id!r} is not one of {list(voters)}")
        if len(set(voters)) != len(voters) or not voters:
            raise ValueError("voters must be distinct and at least one")
        self.voter_id = voter_id
        self.all_voters = tuple(sorted(voters))
        self.nodes = frozenset(nodes)
        self.settings = settings
        self.epoch = 1
        self.members: tuple[str, ...] = self.all_voters
        # Epoch 1 of a new cluster starts with nothing granted anywhere.  A restarted voter has lost
        # its ledger: it grants nothing until every grant it may have made has run out.
        self.grants_from = now + settings.reclaim_s if restarted else now
        self.frozen_for: tuple[int, tuple[str, ...]] | None = None  # accepted, not yet committed
        self._accepts: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._proposing: tuple[int, tuple[str, ...]] | None = None
        self._ledger: dict[str, list[_Entry]] = {}
        self._incarnation: dict[str, int] = {}
        self._demand: dict[str, tuple[float, float]] = {}  # node -> (demand, heard at)
        self._inc_heard: dict[str, float] = {}  # node -> when a request of its adopted incarnation came
        self._heard: dict[str, float] = {v: now for v in self.all_voters}
        self.refused: dict[str, int] = {}
        self.restored = False  # started from a saved ledger
        self._saved_bounds: dict[str, tuple[int, float]] = {}  # node -> (incarnation, share) on disk
        self._dirty = True  # something a restart must remember changed since the last save

    # ------------------------------------------------------------------ grants

    @property
    def quorum(self) -> int:
        return quorum_of(len(self.members))

    @property
    def incarnations(self) -> dict[str, int]:
        """Node -> the incarnation this voter adopted (for state views and tests)."""
        return dict(self._incarnation)

    @property
    def capacity(self) -> float:
        return self.quorum / len(self.members)

    def _refuse(self, req: LeaseRequest, reason: str) -> Grant:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return Grant(self.voter_id, req.node, req.incarnation, req.req_id, self.epoch, self.quorum,
                     len(self.members), 0.0, reason)

    def _usage(self, now: float, skip: str | None = None) -> float:
        total = 0.0
        for node, entries in self._ledger.items():
            live = [e for e in entries if e.until > now]
            self._ledger[node] = live
            if node != skip and live:
                total += max(e.fraction for e in live)
        return total

    def on_request(self, req: LeaseRequest, now: float) -> Grant:
        """Grant a share from this voter's own ledger, or refuse with a reason."""
        if req.voter != self.voter_id:
            return self._refuse(req, "wrong_voter")
        if req.node not in self.nodes:
            return self._refuse(req, "unknown_node")
        if not (req.demand >= 0.0) or req.demand == float("inf"):
            return self._refuse(req, "bad_demand")
        known = self._incarnation.get(req.node, -1)
        if req.incarnation < known:
            return self._refuse(req, "old_incarnation")
        if req.incarnation > known:
            # Adopt a newer incarnation only once the current one is silent and holds no grant here:
            # a claim alone must not fence a live node, and the old lease may still be in use.
            heard = self._inc_heard.get(req.node, -math.inf)
            if now - heard < self.settings.reclaim_s or any(
                    e.until > now for e in self._ledger.get(req.node, [])):
                return self._refuse(req, "old_incarnation_lease")
            self._incarnation[req.node] = req.incarnation
            self._dirty = True
        self._inc_heard[req.node] = now
        self._demand[req.node] = (req.demand, now)
        if self.voter_id not in self.members:
            return self._refuse(req, "not_a_member")
        if self.frozen_for is not None:
            return self._refuse(req, "changing_epoch")
        if now < self.grants_from:
            return self._refuse(req, "epoch_settling")
        entries = [e for e in self._ledger.get(req.node, []) if e.until > now]
        target = self.capacity * self._weight(req.node, now)
        headroom = self.capacity - self._usage(now, skip=req.node)
        fraction = max(0.0, min(target, headroom, 1.0))
        if fraction <= 0.0:
            return self._refuse(req, "no_headroom")
        entries.append(_Entry(req.incarnation, fraction, now + self.settings.reclaim_s))
        self._ledger[req.node] = entries
        saved_inc, saved = self._saved_bounds.get(req.node, (-1, 0.0))
        if saved_inc != req.incarnation or fraction > saved:
            self._dirty = True  # the saved bound no longer covers this grant: save before it leaves
        return Grant(self.voter_id, req.node, req.incarnation, req.req_id, self.epoch, self.quorum,
                     len(self.members), fraction)

    def withdraw(self, grant: Grant, reason: str) -> Grant:
        """Turn a grant that must not leave (its ledger could not be saved) into a refusal.  Its entry
        stays in the ledger: counting a grant nobody holds costs headroom, never safety."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return dataclasses.replace(grant, fraction=0.0, reason=reason)

    def _weight(self, node: str, now: float) -> float:
        """The node's share of recent demand; every asking node keeps a small floor so that an idle
        one can serve its first requests.  Nodes not heard within a lease do not count."""
        fresh = {n: d for n, (d, t) in self._demand.items() if now - t <= self.settings.lease_s}
        top = max(fresh.values(), default=0.0)
        floor = max(top * 0.02, 1e-9)
        weights = {n: max(d, floor) for n, d in fresh.items()}
        total = sum(weights.values())
        return weights.get(node, floor) / total if total > 0 else 1.0

    def ledger(self, now: float) -> dict[str, float]:
        """Node -> the share this voter still counts for it (for state views and tests)."""
        self._usage(now)
        return {n: max(e.fraction for e in es) for n, es in self._ledger.items() if es}

    # ------------------------------------------------------------------ membership

    def tick(self, now: float) -> list[tuple[str, VoterMessage]]:
        """Heartbeats, and a membership proposal when the live voters differ from the members."""
        out: list[tuple[str, VoterMessage]] = [
            (v, Hello(self.voter_id, self.epoch, self.members)) for v in self.all_voters if v != self.voter_id]
        self._heard[self.voter_id] = now
        live = tuple(v for v in self.all_voters if now - self._heard.get(v, -1e18) <= self.settings.voter_dead_s)
        if (self.voter_id in self.members and self.frozen_for is None and live != self.members
                and live and live[0] == self.voter_id
                and len(set(live) & set(self.members)) >= self.quorum):
            proposal = (self.epoch + 1, live)
            self._proposing = proposal
            self._accepts = {}
            out += [(v, Propose(self.voter_id, *proposal)) for v in self.members]
        elif self._proposing is not None and self._proposing[0] == self.epoch + 1:
            out += [(v, Propose(self.voter_id, *self._proposing)) for v in self.members]  # retry
        return out

    def on_message(self, msg: VoterMessage, now: float) -> list[tuple[str, VoterMessage]]:
        if msg.sender not in self.all_voters:
            self.refused["unknown_voter"] = self.refused.get("unknown_voter", 0) + 1
            return []
        self._heard[msg.sender] = now
        if isinstance(msg, Hello):
            if msg.epoch > self.epoch:
                self._adopt(msg.epoch, msg.members, now)
            return []
        if isinstance(msg, Propose):
            if msg.epoch != self.epoch + 1 or self.voter_id not in self.members:
                return []
            if self.frozen_for is None:
                self.frozen_for = (msg.epoch, msg.members)  # from now on: no grant for this epoch
                self._dirty = True  # saved before the accept leaves
            if self.frozen_for == (msg.epoch, msg.members):
                return [(msg.sender, Accept(self.voter_id, msg.epoch, msg.members))]
            return []
        if isinstance(msg, Accept):
            if self._proposing != (msg.epoch, msg.members) or msg.epoch != self.epoch + 1:
                return []
            if msg.sender in self.members:
                self._accepts[msg.sender] = (msg.epoch, msg.members)
            if len(self._accepts) >= self.quorum:
                targets = sorted(set(self.all_voters))
                self._adopt(msg.epoch, msg.members, now)
                return [(v, Commit(self.voter_id, msg.epoch, msg.members)) for v in targets if v != self.voter_id]
            return []
        if isinstance(msg, Commit):
            if msg.epoch > self.epoch:
                self._adopt(msg.epoch, msg.members, now)
            return []
        return []

    def _adopt(self, epoch: int, members: tuple[str, ...], now: float) -> None:
        """A committed epoch: no grant until every lease of the old epoch has run out."""
        self.epoch = epoch
        self.members = tuple(sorted(members))
        self.frozen_for = None
        self._proposing = None
        self._accepts = {}
        self._ledger = {}
        self.grants_from = now + self.settings.reclaim_s
        self._dirty = True

    # ------------------------------------------------------------------ what survives a restart

    def pending_ledger(self, now: float) -> dict[str, Any] | None:
        """The document to make durable before this step's messages leave, or None if the last one
        saved still covers everything a restart must remember.  Call :meth:`saved` once it is."""
        if not self._dirty:
            return None
        held: dict[str, tuple[int, float]] = {}
        for node, entries in self._ledger.items():
            live = [e for e in entries if e.until > now]
            if live:
                held[node] = (max(e.incarnation for e in live), max(e.fraction for e in live))
        # Each saved share is rounded up (so a small rise needs no write), but the roundings share
        # only the free capacity: the saved shares never add up to more than the voter may grant.
        spare = max(0.0, self.capacity - sum(f for _i, f in held.values())) / max(1, len(held))
        granted = {node: [inc, f + min(spare, math.ceil(f * BOUND_STEPS) / BOUND_STEPS - f)]
                   for node, (inc, f) in held.items()}
        return {"v": LEDGER_VERSION, "voter": self.voter_id, "voters": list(self.all_voters),
                "epoch": self.epoch, "members": list(self.members),
                "frozen_for": None if self.frozen_for is None else [self.frozen_for[0], list(self.frozen_for[1])],
                "settling": now < self.grants_from, "incarnations": dict(self._incarnation), "granted": granted}

    def saved(self, doc: Mapping[str, Any]) -> None:
        """``doc`` (from :meth:`pending_ledger`) is durable."""
        self._saved_bounds = {n: (int(g[0]), float(g[1])) for n, g in doc["granted"].items()}
        self._dirty = False

    @classmethod
    def restore(cls, doc: Any, voter_id: str, voters: Sequence[str], nodes: Sequence[str],
                settings: StrictSettings, *, now: float) -> Voter:
        """A voter restarted from its saved ledger.  Every saved grant counts again for
        ``L (1 + rho) / (1 - rho)`` from ``now``; raises :class:`LedgerError` naming what is wrong."""
        v = cls(voter_id, voters, nodes, settings, now=now)
        try:
            _check_ledger(doc, v)
            v.epoch = doc["epoch"]
            v.members = tuple(sorted(doc["members"]))
            frozen = doc["frozen_for"]
            v.frozen_for = None if frozen is None else (frozen[0], tuple(frozen[1]))
            v._incarnation = {n: i for n, i in doc["incarnations"].items() if n in v.nodes}
            for node, (inc, share) in doc["granted"].items():
                v._ledger[node] = [_Entry(inc, float(share), now + settings.reclaim_s)]
                v._inc_heard[node] = now
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise LedgerError(f"saved voter ledger: {exc}") from None
        v.grants_from = now + settings.reclaim_s if doc["settling"] else now
        v.restored = True
        v.saved(doc)
        return v

    def __repr__(self) -> str:
        return (f"<Voter {self.voter_id} epoch={self.epoch} members={list(self.members)} "
                f"frozen={self.frozen_for is not None}>")


def _check_ledger(doc: Any, v: Voter) -> None:
    """Raise ``ValueError`` unless ``doc`` is a saved ledger of voter ``v`` in this cluster."""
    def _int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(doc, dict) or doc.get("v") != LEDGER_VERSION:
        raise ValueError(f"'v' is not {LEDGER_VERSION}")
    if doc.get("voter") != v.voter_id or doc.get("voters") != list(v.all_voters):
        raise ValueError(f"written by voter {doc.get('voter')!r} of voters {doc.get('voters')!r}, "
                         f"not {v.voter_id!r} of {list(v.all_voters)}")
    members = doc.get("members")
    if not _int(doc.get("epoch")) or not isinstance(members, list) or not members \
            or not set(members) <= set(v.all_voters):
        raise ValueError("'epoch' or 'members' is not an epoch of this cluster's voters")
    frozen = doc.get("frozen_for")
    if frozen is not None and not (isinstance(frozen, list) and len(frozen) == 2 and _int(frozen[0])
                                   and isinstance(frozen[1], list) and set(frozen[1]) <= set(v.all_voters)):
        raise ValueError("'frozen_for' is not null or [epoch, members]")
    if not isinstance(doc.get("settling"), bool):
        raise ValueError("'settling' is not a boolean")
    incs, granted = doc.get("incarnations"), doc.get("granted")
    if not isinstance(incs, dict) or not all(_int(i) for i in incs.values()):
        raise ValueError("'incarnations' is not {node: incarnation}")
    if not isinstance(granted, dict) or not all(
            isinstance(g, list) and len(g) == 2 and _int(g[0]) and isinstance(g[1], int | float)
            and not isinstance(g[1], bool) and 0.0 <= g[1] <= 1.0 for g in granted.values()):
        raise ValueError("'granted' is not {node: [incarnation, share in [0, 1]]}")
