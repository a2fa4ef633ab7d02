"""An in-memory strict cluster: StrictTables and Voters over one message queue, in virtual time.

It is the smallest thing that runs the core as a cluster, for the property tests and the strict-core
benchmark: every process has its own clock (drift within ``rho``, set per process), every message is
encoded, signed and decoded through ``wire.py`` (so the wire is on the path of every test), and the
queue can lose, duplicate, reorder and partition messages.  Every admission is recorded in true time
and checked against the envelope ``B + R * (t - s)`` of every window with no allowance.

Pure apart from its seeded ``random.Random``: nothing here reads a clock or touches I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from edge_server.strict.allocator import Voter
from edge_server.strict.settings import StrictSettings
from edge_server.strict.table import CostExceedsNodeCap, StrictTable, Ticket
from edge_server.strict.wire import decode, encode
from edge_server.token_bucket import Limit
from edge_server.wire import WireError

__all__ = ["Envelope", "MemCluster", "Message", "Pending"]

SECRET = b"memcluster-secret"


class Envelope:
    """Running check of ``admitted(s, t) <= B + R * (t - s)`` over every window, for one key.

    ``max_excess`` is the largest ``admitted - (B + R * (t - s))`` seen (negative while it holds).
    """

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.total = 0.0
        self._low = float("inf")  # min over admissions of (admitted before it) - R * t
        self.max_excess = -float("inf")
        self.events = 0

    def admit(self, t: float, cost: float) -> float:
        self._low = min(self._low, self.total - self.limit.rate * t)
        self.total += cost
        self.events += 1
        excess = self.total - self.limit.rate * t - self._low - self.limit.burst
        self.max_excess = max(self.max_excess, excess)
        return excess


@dataclass
class Message:
    deliver_at: float  # true time
    src: str  # process: a node id or a voter id
    dst: str
    data: bytes
    signature: str
    src_region: str = ""
    dst_region: str = ""


class Pending(NamedTuple):
    """A request whose rights are spent and whose audit write is under way (:meth:`MemCluster.begin`)."""

    node: str
    table: StrictTable
    ticket: Ticket


@dataclass
class _Clock:
    local: float
    drift: float = 0.0


@dataclass
class MemCluster:
    """Regions of nodes, one voter per region, one key space, one queue."""

    regions: Mapping[str, Sequence[str]]
    limit_for: Callable[[str], Limit | None]
    settings: StrictSettings
    seed: int = 0
    latency: Callable[[str, str], float] = field(default=lambda a, b: 0.0)  # region -> region, true seconds
    now: float = 0.0
    queue: list[Message] = field(default_factory=list)
    cut: set[frozenset[str]] = field(default_factory=set)  # region pairs that cannot talk

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.region_of: dict[str, str] = {}
        for region, nodes in self.regions.items():
            for n in nodes:
                self.region_of[n] = region
            self.region_of[self.voter_of(region)] = region
        self.node_ids = [n for nodes in self.regions.values() for n in nodes]
        self.voter_ids = [self.voter_of(r) for r in self.regions]
        self.clocks: dict[str, _Clock] = {p: _Clock(local=100.0 + 7.0 * i)
                                          for i, p in enumerate(self.node_ids + self.voter_ids)}
        self._incarnations = 0
        self.tables: dict[str, StrictTable | None] = {n: self._new_table(n) for n in self.node_ids}
        self.voters = {v: Voter(v, self.voter_ids, self.node_ids, self.settings, now=self.local(v))
                       for v in self.voter_ids}
        self.ledgers: dict[str, dict[str, Any]] = {}  # voter -> its last saved ledger (its "disk")
        self.envelopes: dict[str, Envelope] = {}
        self.admitted: dict[str, float] = {n: 0.0 for n in self.node_ids}
        self.denied = 0
        self.revoked = 0
        self.wire_refused: dict[str, int] = {}
        self._seq = 0
        self.graveyard: list[StrictTable] = []  # dead incarnations, for the ground-truth accounting

    @staticmethod
    def voter_of(region: str) -> str:
        return f"voter-{region}"

    # ------------------------------------------------------------------ clocks

    def local(self, proc: str) -> float:
        return self.clocks[proc].local

    def set_drift(self, proc: str, drift: float) -> None:
        if abs(drift) > self.settings.rho:
            raise ValueError(f"drift {drift} beyond rho {self.settings.rho}")
        self.clocks[proc].drift = drift

    def advance(self, dt: float) -> None:
        """Move true time by ``dt``; every clock moves by ``dt * (1 + its drift)``."""
        if dt < 0:
            raise ValueError("time does not go back")
        self.now += dt
        for c in self.clocks.values():
            c.local += dt * (1 + c.drift)

    # ------------------------------------------------------------------ processes

    def _new_table(self, node: str) -> StrictTable:
        self._incarnations += 1
        return StrictTable(node, self._incarnations, self.node_ids, self.voter_ids, self.limit_for,
                           self.settings, now=self.local(node))

    def crash(self, node: str) -> None:
        table = self.tables[node]
        if table is not None:
            self.graveyard.append(table)
        self.tables[node] = None

    def restart(self, node: str, keep_data: bool) -> StrictTable:
        """A new incarnation; with its data it also marks the old one's rights burned."""
        old = self.tables[node]
        if old is not None:
            self.graveyard.append(old)
        table = self._new_table(node)
        if keep_data and old is not None:
            for key in old.keys():
                table.burn_predecessor(key, old.actor, old.rights(key)[old.actor], self.local(node))
        self.tables[node] = table
        return table

    def restart_voter(self, voter: str, keep_ledger: bool = False) -> Voter:
        """A restarted voter: from its last saved ledger, or (the data directory lost) with none."""
        saved = self.ledgers.get(voter) if keep_ledger else None
        if saved is not None:
            self.voters[voter] = Voter.restore(saved, voter, self.voter_ids, self.node_ids, self.settings,
                                               now=self.local(voter))
        else:
            self.ledgers.pop(voter, None)
            self.voters[voter] = Voter(voter, self.voter_ids, self.node_ids, self.settings,
                                       now=self.local(voter), restarted=True)
        return self.voters[voter]

    def _save(self, vid: str) -> None:
        """Write-ahead, as the node does: the ledger is saved before the step's messages leave."""
        voter = self.voters[vid]
        doc = voter.pending_ledger(self.local(vid))
        if doc is not None:
            self.ledgers[vid] = doc
            voter.saved(doc)

    # ------------------------------------------------------------------ requests

    def take(self, node: str, key: str, cost: int = 1, pause: float = 0.0) -> bool:
        """One request at ``node``: take, (pause), commit, the re-check after the audit write, the
        answer.  Returns whether it was admitted."""
        pending = self.begin(node, key, cost, pause)
        return pending is not None and self.answer(pending)

    def begin(self, node: str, key: str, cost: int = 1, pause: float = 0.0) -> Pending | None:
        """The first half of a request, as the node runs it: take, (pause), commit -- the rights are
        spent -- then the audit write starts.  Anything may happen before :meth:`answer` (a pause
        of the process during the write, gossip, other nodes' requests).  None if not allowed."""
        table = self.tables[node]
        if table is None:
            return None
        try:
            decision = table.take(key, cost, self.local(node))
        except CostExceedsNodeCap:  # more than this node can ever hold: a 400 in the node, never admitted
            self.denied += 1
            return None
        if not decision.allowed:
            self.denied += 1
            return None
        if pause:
            self.advance(pause)
        table = self.tables[node]
        if table is None or decision.ticket is None:
            return None  # crashed during the pause: never answered, never admitted
        if not table.commit(decision.ticket, self.local(node)):
            self.revoked += 1
            return None
        return Pending(node, table, decision.ticket)

    def answer(self, pending: Pending) -> bool:
        """The audit write is done: the lease re-check right before the answer (``confirm``), then
        the answer leaves -- admitted at this moment's true time.  False if the process died
        meanwhile (spent, never answered) or the lease behind it ended (spent, answered a denial)."""
        node, table, ticket = pending
        if self.tables[node] is not table:
            return False
        if not table.confirm(ticket, self.local(node)):
            self.revoked += 1
            return False
        env = self.envelopes.get(ticket.key)
        if env is None:
            limit = self.limit_for(ticket.key)
            assert limit is not None
            env = self.envelopes[ticket.key] = Envelope(limit)
        env.admit(self.now, ticket.cost)
        self.admitted[node] += ticket.cost
        return True

    def phi_total(self) -> float:
        """Sum of the live nodes' floating shares, each on its own clock (must stay <= 1)."""
        return sum(t.phi(self.local(n)) for n, t in self.tables.items() if t is not None)

    def potential(self, key: str) -> float:
        """Ground truth, from every incarnation's exact state: rights held or reserved by live
        nodes plus rights given and not yet processed by a live receiver that could still credit
        them (its want echoed is within the transfer window of its clock).  Must stay <= B."""
        live = {t.actor: (n, t) for n, t in self.tables.items() if t is not None}
        total = 0.0
        for n, t in live.values():
            if key in t.keys():
                total += t.outstanding(key, self.local(n)) - t.unacked_total(key)
        window = self.settings.transfer_window_s
        for giver in [t for _n, t in live.values()] + self.graveyard:
            if key not in giver.keys():
                continue
            for receiver, (sent, echo) in giver.rights(key)[giver.actor].sent.items():
                if receiver not in live:
                    continue
                n, t = live[receiver]
                done = t.rights(key)[receiver].accepted.get(giver.actor, 0.0)
                if sent > done and self.local(n) - echo <= window:
                    total += sent - done
        return total

    def max_excess(self) -> float:
        return max((e.max_excess for e in self.envelopes.values()), default=-float("inf"))

    # ------------------------------------------------------------------ messages

    def _send(self, src: str, dst: str, kind: str, sender: str, body: Any) -> None:
        self._seq += 1
        data, sig = encode(SECRET, kind, sender, self._seq, body)
        a, b = self.region_of[src], self.region_of[dst]
        self.queue.append(Message(self.now + self.latency(a, b), src, dst, data, sig, a, b))

    def round(self) -> None:
        """One gossip round: every live node ticks, gossips to every peer and renews its lease;
        every voter sends its heartbeats (and any membership proposal)."""
        for node, table in self.tables.items():
            if table is None:
                continue
            now = self.local(node)
            table.tick(now)
            for req in table.lease_requests(now):
                self._send(node, req.voter, "lease_request", table.actor, req)
            for peer in self.node_ids:
                if peer != node:
                    upto, entries = table.delta_for(peer)
                    if entries:  # as the node: an empty delta is not sent
                        self._send(node, peer, "strict_delta", table.actor, (upto, entries))
        for vid, voter in self.voters.items():
            out = voter.tick(self.local(vid))
            self._save(vid)
            for dst, msg in out:
                self._send(vid, dst, type(msg).__name__.lower(), vid, msg)

    def blocked(self, msg: Message) -> bool:
        return frozenset((msg.src_region, msg.dst_region)) in self.cut

    def deliver(self, msg: Message) -> None:
        """Hand one message to its destination (a crashed node drops it)."""
        if self.blocked(msg):
            return
        try:
            decoded = decode(SECRET, msg.data, msg.signature, nodes=self.node_ids, voters=self.voter_ids)
        except WireError as exc:
            self.wire_refused[exc.reason] = self.wire_refused.get(exc.reason, 0) + 1
            return
        dst = msg.dst
        if dst in self.voters:
            voter, now = self.voters[dst], self.local(dst)
            if decoded.kind == "lease_request":
                grant = voter.on_request(decoded.body, now)
                self._save(dst)
                self._send(dst, msg.src, "grant", dst, grant)
            else:
                outs = voter.on_message(decoded.body, now)
                self._save(dst)
                for to, out in outs:
                    self._send(dst, to, type(out).__name__.lower(), dst, out)
            return
        table = self.tables.get(dst)
        if table is None:
            return
        now = self.local(dst)
        if decoded.kind == "strict_delta":
            upto, entries = decoded.body
            table.merge(decoded.sender, entries, now)
            self._send(dst, msg.src, "strict_ack", table.actor, upto)
        elif decoded.kind == "strict_ack":
            table.on_ack(decoded.sender, decoded.body, now)
        elif decoded.kind == "grant":
            table.on_grant(decoded.body, now)

    def deliver_due(self, shuffle: bool = False) -> int:
        """Deliver every message due by now (in send order, or shuffled).  Returns how many."""
        due = [m for m in self.queue if m.deliver_at <= self.now]
        if not due:
            return 0
        self.queue = [m for m in self.queue if m.deliver_at > self.now]
        if shuffle:
            self.rng.shuffle(due)
        for m in due:
            self.deliver(m)
        return len(due)

    def run(self, seconds: float, step: float, on_step: Callable[[MemCluster], None] | None = None) -> None:
        """Rounds every ``settings.gossip_s``; ``on_step`` (load) every ``step`` of true time."""
        end = self.now + seconds
        next_round = self.now
        while self.now < end - 1e-12:
            if self.now >= next_round - 1e-12:
                self.round()
                next_round += self.settings.gossip_s
            self.deliver_due()
            if on_step is not None:
                on_step(self)
            self.advance(step)
