"""One simulated strict-mode node: the REAL strict core (``StrictTable`` and, on the first node of its
region, that region's ``Voter``) and the REAL strict wire format (``edge_server.strict.wire``), on
virtual time.  The strict counterpart of :class:`~workbench.run.sim.node.SimNode`; the world drives
both through the same methods (start, kill, pause, resume, ready, decide, sample).

Clocks, and what the simulator allows (the strict core's drift model):

* the core reads only a **monotonic** clock: each process's runs at ``1 + drift`` of true time, with
  ``|drift| <= rho`` drawn per node and per schedule (a quarter of the nodes sit at ``+rho`` or
  ``-rho`` exactly).  It is never stepped;
* ``skew`` faults step the **wall** clock, by any amount: strict mode reads the wall clock only for
  its incarnation id (``edge_server.boot.next_boot``, as a real node would), so a step cannot widen
  a lease.  A wiped restart with the wall clock set back may reuse or lower its incarnation: the
  voters then refuse it (liveness), which is the case the simulator exercises too.

Mirrored from the design (``docs/strict-mode.md``): a gossip round every interval -- ``tick``,
``lease_requests`` to every voter, ``delta_for`` to every peer, the voter's heartbeats -- every
message encoded, signed and decoded through the wire format and checked by a ``SeqGuard`` (a
duplicate is refused as replayed and counted); a decision is ``take`` then ``commit`` at once, the
grant goes to the audit trail (at that time, as the node stamps it), and the answer leaves once the
audit write is done, ``AUDIT_WRITE_S`` later: a pause of the process in between holds it until the
resume, and right before it leaves the lease is checked again (``StrictTable.confirm``). A grant
whose lease ended meanwhile is answered as a denial (``revoked_after_write``; its rights stay
spent); a kill in between answers nothing (a reset: an unknown outcome for the checks). A voter
lives and dies with its host process and saves its ledger as the node does: write-ahead, before the
messages of a step leave (``disk_ledger``). A restart starts the voter from that ledger; a wiped
restart has lost it (the voter then grants nothing for ``L (1 + rho) / (1 - rho)``). With its data
directory a restarted node also burns its predecessor's unspent rights; without it, it simply starts
as a new incarnation. Incarnations more than ``INCARNATION_AHEAD_MS`` ahead of the receiver's wall
clock are refused, as in the node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_server.boot import next_boot
from edge_server.strict.allocator import Voter
from edge_server.strict.rights import ActorRights, split_actor
from edge_server.strict.settings import StrictSettings
from edge_server.strict.table import StrictTable, Ticket
from edge_server.strict.wire import INCARNATION_AHEAD_MS, SeqGuard, decode, encode
from edge_server.token_bucket import CostExceedsBurst, KeyTableFull, NoLimitForKey
from edge_server.wire import WireError
from workbench.run.sim.clock import EPOCH
from workbench.run.sim.process import PausableProcess

if TYPE_CHECKING:
    from workbench.run.sim.world import World

__all__ = ["AUDIT_WRITE_S", "VOTER_SEQ_SPAN", "Reply", "StrictSimNode", "strict_settings_for", "voter_id"]

Reply = Callable[[int, "bool | None", str, str], None]  # (status, allowed, error, request_id) -> None

VOTER_SEQ_SPAN = 1_000_000  # a voter's message seq is incarnation * span + count: it grows across restarts
AUDIT_WRITE_S = 0.002  # a grant's audit write (group commit + write + fsync) before its answer leaves


def voter_id(region: str) -> str:
    return f"voter-{region}"


def strict_settings_for(gossip_interval_ms: float) -> StrictSettings:
    """The strict settings a simulated cluster runs with: the defaults, a lease of at least 4 rounds."""
    return StrictSettings(gossip_interval_ms=gossip_interval_ms, lease_ms=max(500.0, 4 * gossip_interval_ms))


class StrictSimNode(PausableProcess):
    """A strict node's process across kills and restarts (and the voter it hosts, if any)."""

    def __init__(self, world: World, node_id: str, region: str, peers: list[str], *, settings: StrictSettings,
                 voters: dict[str, str], drift: float, mono_base: float,
                 table_cls: type[StrictTable] = StrictTable) -> None:
        self.w = world
        self.id = node_id
        self.region = region
        self.peers = peers
        self.settings = settings
        self.voter_hosts = voters  # voter id -> host node id
        self.voter_ids = sorted(voters)
        hosted = [v for v, host in voters.items() if host == node_id]
        self.voter_name = hosted[0] if hosted else None
        if abs(drift) > settings.rho:
            raise ValueError(f"drift {drift} beyond rho {settings.rho}")
        self.drift = drift
        self.table_cls = table_cls
        self.mono_base = mono_base
        self.state = "down"
        self.inc = 0  # process generation: events of an earlier process are dropped
        self.table: StrictTable | None = None
        self.voter: Voter | None = None
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.refused: Counter[str] = Counter()
        self.boot = 0
        self.boots_seen = False
        self.boots = 0
        self.audit_seq = 0
        self.disk: dict[str, tuple[str, ActorRights]] = {}  # key -> (actor, its own rights) when it stopped
        self.disk_ledger: dict[str, Any] | None = None  # the hosted voter's last saved ledger
        self._seq = 0
        self._voter_seq = 0
        self._req = 0
        self._writing: dict[int, tuple[Reply, str]] = {}  # request number -> answer not yet sent
        self.revoked_after_write = 0  # grants answered as denials: the lease ended during the write
        self._guard = SeqGuard()
        self._sched = world.sched
        self._offsets = world.clocks.offsets

    # ------------------------------------------------------------------ clocks and plumbing
    def now(self) -> float:
        """The wall clock (true time plus skew): only incarnation ids read it."""
        return EPOCH + self._sched.now + self._offsets[self.id]

    def mono(self) -> float:
        """The monotonic clock the strict core runs on: drift within rho, never stepped."""
        return self.mono_base + self._sched.now * (1.0 + self.drift)

    def run(self, inc: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if inc != self.inc or self.state == "down":
            return
        if self.state == "paused":
            self.held.append((fn, args))
            return
        fn(*args)

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, wiped: bool = False) -> None:
        if self.state != "down":
            self.kill()
        if wiped:
            self.disk = {}
            self.disk_ledger = None
            self.audit_seq = 0
        self.inc += 1
        self.boots += 1
        self.state = "up"
        self.boot = next_boot(int(self.now() * 1000), None if wiped or not self.boots_seen else self.boot)
        self.boots_seen = True
        m = self.mono()
        w = self.w
        table = self.table_cls(self.id, self.boot, w.node_ids, self.voter_ids, w.limit_for, self.settings, now=m)
        for key, (actor, rights) in self.disk.items():
            try:
                table.burn_predecessor(key, actor, rights, m)
            except ValueError:
                self.refused["burn_not_predecessor"] += 1  # the wall clock went back: incarnation did not grow
        self.table = table
        if self.voter_name is not None:
            if self.disk_ledger is not None:
                self.voter = Voter.restore(self.disk_ledger, self.voter_name, self.voter_ids, w.node_ids,
                                           self.settings, now=m)
            else:
                self.voter = Voter(self.voter_name, self.voter_ids, w.node_ids, self.settings, now=m,
                                   restarted=self.boots > 1)
        self._guard = SeqGuard()
        self._seq = 0
        self._voter_seq = 0
        self._req = 0
        self.held = []
        w.sched.at(w.sched.now, self.run, self.inc, self._round, ())

    def kill(self) -> None:
        writing, self._writing = self._writing, {}
        for reply, request_id in writing.values():  # in the middle of the audit write: the client sees a reset
            reply(0, None, "connection reset", request_id)
        table = self.table
        if table is not None:  # what its data directory holds of its own rights
            self.disk = {k: (table.actor, table.rights(k)[table.actor]) for k in table.keys()
                         if table.actor in table.rights(k)}
        self.state = "down"
        self.inc += 1
        self.table = None
        self.voter = None
        self.held = []

    def ready(self) -> bool:
        return self.state == "up" and self.table is not None

    # ------------------------------------------------------------------ decisions
    def decide(self, key: str, cost: int, reply: Reply) -> None:
        """One /v1/limits/check on this node: ``reply(status, allowed, error, request_id)`` at once for
        a denial or an error, once the audit write is done for a grant (see the module docstring)."""
        table = self.table
        assert table is not None
        self._req += 1
        request_id = f"{self.id}-{self.boot}-{self._req}"
        m = self.mono()
        try:
            d = table.take(key, cost, m)
        except CostExceedsBurst:
            reply(400, None, "cost_exceeds_burst", request_id)
            return
        except NoLimitForKey:
            reply(404, None, "no_limit", request_id)
            return
        except KeyTableFull:
            reply(503, None, "key_table_full", request_id)
            return
        ticket = d.ticket
        if not d.allowed or ticket is None or not table.commit(ticket, self.mono()):
            reply(200, False, "", request_id)
            return
        self.audit_seq += 1
        self.w.granted(self, key, cost, self.boot, request_id)
        self._writing[self._req] = (reply, request_id)
        self._sched.after(AUDIT_WRITE_S, self.run, self.inc, self._answer, (self._req, ticket, table))

    def _answer(self, req: int, ticket: Ticket, table: StrictTable) -> None:
        """The audit write is done: the lease re-check right before the answer leaves."""
        reply, request_id = self._writing.pop(req)
        if table.confirm(ticket, self.mono()):
            reply(200, True, "", request_id)
            return
        self.revoked_after_write += 1
        reply(200, False, "lease_ended_before_answer", request_id)

    def abandon(self) -> None:
        """The run ended: answers still held (a pause that outlasted the run) never leave."""
        writing, self._writing = self._writing, {}
        for reply, request_id in writing.values():
            reply(0, None, "", request_id)

    def sample(self) -> tuple[dict[str, int], dict[str, dict[str, tuple[int, int]]]] | None:
        """``/v1/state`` for the history: per key the spend this node knows of, per node (incarnation, spent)."""
        table = self.table
        if self.state != "up" or table is None:
            return None
        totals: dict[str, int] = {}
        counts: dict[str, dict[str, tuple[int, int]]] = {}
        for key in table.keys():
            per: dict[str, tuple[int, int]] = {}
            for actor, r in table.rights(key).items():
                node, inc = split_actor(actor)
                if node not in per or inc > per[node][0]:
                    per[node] = (inc, int(r.spent))
            counts[key] = per
            totals[key] = sum(c for _i, c in per.values())
        return totals, counts

    # ------------------------------------------------------------------ messages
    def _send(self, dst_node: str, kind: str, body: Any, *, as_voter: bool = False) -> None:
        w = self.w
        if as_voter:
            assert self.voter is not None
            self._voter_seq += 1
            sender, seq = self.voter.voter_id, self.boot * VOTER_SEQ_SPAN + self._voter_seq
        else:
            assert self.table is not None
            self._seq += 1
            sender, seq = self.table.actor, self._seq
        data, signature = encode(w.secret, kind, sender, seq, body)
        if dst_node == self.id:  # the voter on our own host: no network, still the wire
            self.w.sched.at(self._sched.now, self.run, self.inc, self._deliver, (data, signature))
            return
        dst = w.nodes[dst_node]
        w.net.send(self.id, dst_node, dst.run, dst.inc, dst._deliver, (data, signature))

    def _save_ledger(self, m: float) -> None:
        """The voter's write-ahead save (the simulated disk write is durable at once)."""
        assert self.voter is not None
        doc = self.voter.pending_ledger(m)
        if doc is not None:
            self.disk_ledger = doc
            self.voter.saved(doc)

    def _round(self) -> None:
        table = self.table
        assert table is not None
        m = self.mono()
        table.tick(m)
        for req in table.lease_requests(m):
            self._send(self.voter_hosts[req.voter], "lease_request", req)
        for peer in self.peers:
            delta = table.delta_for(peer)
            if delta[1]:  # as the node: an empty delta is not sent
                self._send(peer, "strict_delta", delta)
        if self.voter is not None:
            out = self.voter.tick(m)
            self._save_ledger(m)
            for dst, msg in out:
                self._send(self.voter_hosts[dst], type(msg).__name__.lower(), msg, as_voter=True)
        self.w.sched.after(self.w.gossip_s, self.run, self.inc, self._round, ())

    def _deliver(self, data: bytes, signature: str) -> None:
        w = self.w
        try:
            msg = decode(w.secret, data, signature, nodes=w.node_ids, voters=self.voter_ids,
                         max_incarnation=int(self.now() * 1000) + INCARNATION_AHEAD_MS)
            self._guard.check(msg)
        except WireError as exc:
            self.refused[exc.reason] += 1
            return
        m = self.mono()
        kind = msg.kind
        if kind == "lease_request" or kind not in ("strict_delta", "strict_ack", "grant"):
            voter = self.voter
            if voter is None:
                self.refused["not_a_voter"] += 1
                return
            if kind == "lease_request":
                grant = voter.on_request(msg.body, m)
                self._save_ledger(m)
                self._send(grant.node, "grant", grant, as_voter=True)
            else:
                outs = voter.on_message(msg.body, m)
                self._save_ledger(m)
                for to, out in outs:
                    self._send(self.voter_hosts[to], type(out).__name__.lower(), out, as_voter=True)
            return
        table = self.table
        assert table is not None
        if kind == "strict_delta":
            upto, entries = msg.body
            table.merge(msg.sender, entries, m)
            self._send(split_actor(msg.sender)[0], "strict_ack", upto)
        elif kind == "strict_ack":
            table.on_ack(msg.sender, msg.body, m)
        else:
            table.on_grant(msg.body, m)
