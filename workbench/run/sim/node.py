"""One simulated edge node: the REAL limiter core (``BucketTable``) and the REAL wire format, driven the
way ``edge_server.node`` / ``gossip`` / ``app`` drive them, on virtual time.

Mirrored from the real node:

* a decision is ``take``, then the grant goes to the audit trail, then ``commit_many`` once it is
  durable (the simulated disk is durable at once, so nothing is ever granted and lost);
* one gossip loop per peer: ``tick``, ``delta_for``, ``encode_delta`` signed with the cluster secret,
  one message in flight, the answer decoded with ``decode_ack`` and fed to ``on_peer_boot`` /
  ``on_ack``; the next push one interval after the last started (at once if it took longer), backing
  off to ``min(1 s, interval x failures)`` after ten failures; a push unanswered after
  ``max(0.5 s, 10 x interval)`` is a failure, and its late answer is ignored; a push unanswered for the
  probe period (``edge_server.gossip.probe_interval_s``) gets a probe beside it every period, and is
  abandoned for a new push at once when a probe is answered first (unless it follows an abandoned one);
  a back-off pause longer than a probe period after an unanswered push probes the peer all along and
  ends at the first answer;
  a probe answered later than its period is a failure;
* the receiver runs ``decode_delta`` with the known nodes, the ``ReplayGuard`` on its own clock, then
  ``on_peer_boot`` and ``merge``, and answers with ``encode_ack``; a refused message is counted by its
  reason and answered with an error;
* housekeeping ``tick`` every 0.25 s and ``expire`` every second;
* a (re)start is a new boot id from the node's clock, a fresh ``ReplayGuard``, and recovery of its own
  entries from its audit trail, starting cold when that trail is not empty; ``restart_wiped`` loses the
  trail first.  Readiness is the real rule: cold nodes wait for every peer's baseline or the timeout.

A killed node drops everything in flight to or from it (its process is gone; a message to it is
answered by a refusal, like a connection refused on loopback).  A paused node holds every event --
timers, deliveries -- and runs them in order when resumed, as a SIGSTOPped process would.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edge_server.boot import next_boot
from edge_server.token_bucket import BucketTable, CostExceedsBurst, KeyTableFull, NoLimitForKey
from edge_server.wire import ReplayGuard, WireError, decode_ack, decode_delta, encode_ack, encode_delta
from workbench.run.sim.clock import EPOCH
from workbench.run.sim.process import PausableProcess

if TYPE_CHECKING:
    from workbench.run.sim.world import World

__all__ = ["HOUSEKEEPING_S", "SimNode", "TableFactory"]

HOUSEKEEPING_S = 0.25  # edge_server.node.Node.housekeeping's period
TableFactory = Callable[..., BucketTable]


class SimNode(PausableProcess):
    """A node's process state across kills and restarts; its audit trail is its data directory."""

    def __init__(self, world: World, node_id: str, region: str, peers: list[str], factory: TableFactory) -> None:
        self.w = world
        self.id = node_id
        self.region = region
        self.peers = peers
        self.factory = factory
        self.state = "down"  # up, paused, down
        self.inc = 0  # incarnation: events of an earlier process are dropped
        self.disk: list[tuple[str, int, int]] = []  # the audit trail: (key, cost, generation)
        self.audit_seq = 0
        self.table: BucketTable | None = None
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.refused: Counter[str] = Counter()
        self.boot = 0
        self.boots_seen = False
        self.cold = False
        self.started = 0.0
        self.boots = 0
        self._push_id = 0
        self._gossip_seq = 0
        self._req = 0
        self._waiting: dict[str, tuple[int, float]] = {}
        self._failures: dict[str, int] = {}
        self._next_at: dict[str, int] = {}  # peer -> token of the scheduled push (a probe's answer may move it)
        self._replay = ReplayGuard(set(peers))
        self._sched = world.sched
        self._offsets = world.clocks.offsets

    # ------------------------------------------------------------------ event plumbing
    def now(self) -> float:
        """This node's wall clock (true virtual time plus its skew)."""
        return EPOCH + self._sched.now + self._offsets[self.id]

    def run(self, inc: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Run an event of incarnation ``inc``: dropped if that process is gone, held while paused."""
        if inc != self.inc or self.state == "down":
            return
        if self.state == "paused":
            self.held.append((fn, args))
            return
        fn(*args)

    def request(self, inc: int, fn: Callable[..., Any], args: tuple[Any, ...], refuse: Callable[[], None]) -> None:
        """Like :meth:`run` for an incoming message; a dead process refuses it (connection refused)."""
        if inc != self.inc or self.state == "down":
            refuse()
            return
        self.run(inc, fn, args)

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, wiped: bool = False) -> None:
        """Boot (or reboot) the process: recover from the audit trail unless it was lost."""
        if self.state != "down":
            self.kill()
        if wiped:
            self.disk = []
            self.audit_seq = 0
        w = self.w
        now = self.now()
        self.inc += 1
        self.boots += 1
        self.state = "up"
        # the real node's rule (edge_server.boot): never below the last boot unless the data is lost
        self.boot = next_boot(int(now * 1000), None if wiped or not self.boots_seen else self.boot)
        self.boots_seen = True
        self._replay = ReplayGuard(set(self.peers))
        own: dict[str, tuple[int, int]] = {}
        for key, cost, gen in self.disk:  # edge_server.audit.AuditLog.open's recovery rule
            old = own.get(key)
            if old is None or gen > old[0]:
                own[key] = (gen, cost)
            elif gen == old[0]:
                own[key] = (gen, old[1] + cost)
        self.cold = bool(self.disk)
        table = self.factory(self.id, self.peers, w.limit_for, now=now, gossip_interval=w.gossip_s,
                             peer_timeout=None, max_keys=100_000, idle_ttl=300.0, cold=self.cold)
        for key, entry in own.items():
            table.recover(key, entry, now)
        self.table = table
        self.started = w.sched.now
        self._waiting = {}
        self._failures = dict.fromkeys(self.peers, 0)
        self._next_at = dict.fromkeys(self.peers, 0)
        self._gossip_seq = 0
        self._req = 0
        self.held = []
        at, inc = w.sched.at, self.inc
        t = w.sched.now
        for peer in self.peers:
            at(t, self.run, inc, self._push, (peer, True))
        at(t + HOUSEKEEPING_S, self.run, inc, self._housekeeping, (1,))

    def kill(self) -> None:
        self.state = "down"
        self.inc += 1
        self.table = None
        self.held = []
        self._waiting = {}

    def ready(self) -> bool:
        """edge_server.node.Node.readiness for the states the simulator has: up, recovered, synced."""
        if self.state != "up" or self.table is None:
            return False
        if not self.cold:
            return True
        if self.w.sched.now - self.started > max(1.0, 3 * self.table.peer_timeout):
            return True
        return all(self.table._peers[p].synced for p in self.peers)

    def sample(self) -> tuple[dict[str, int], dict[str, dict[str, tuple[int, int]]]] | None:
        """``/v1/state`` for the history: per key the global count, per node (generation, count)."""
        if self.state != "up" or self.table is None:
            return None
        snap = self.table.snapshot(self.now())
        return ({k: v["global"] for k, v in snap.items()},
                {k: {n: (e["gen"], e["count"]) for n, e in v["nodes"].items()} for k, v in snap.items()})

    def _housekeeping(self, tick: int) -> None:
        table = self.table
        assert table is not None
        now = self.now()
        table.tick(now)
        if tick % 4 == 0:
            table.expire(now)
        self.w.sched.after(HOUSEKEEPING_S, self.run, self.inc, self._housekeeping, (tick + 1,))

    # ------------------------------------------------------------------ decisions
    def decide(self, key: str, cost: int) -> tuple[int, bool | None, str, str]:
        """``(status, allowed, error, request_id)`` of one /v1/limits/check on this node."""
        table = self.table
        assert table is not None
        self._req += 1
        request_id = f"{self.id}-{self.boot}-{self._req}"
        now = EPOCH + self._sched.now + self._offsets[self.id]
        try:
            d = table.take(key, cost, now)
        except CostExceedsBurst:
            return 400, None, "cost_exceeds_burst", request_id
        except NoLimitForKey:
            return 404, None, "no_limit", request_id
        except KeyTableFull:
            return 503, None, "key_table_full", request_id
        if not d.allowed:
            return 200, False, "", request_id
        gen = table.generation_of(key, now)
        self.disk.append((key, cost, gen))
        self.audit_seq += 1
        self.w.granted(self, key, cost, gen, request_id)
        table.commit(key, cost, gen)  # its audit batch is durable: peers may see it (commit_many's step)
        return 200, True, "", request_id

    # ------------------------------------------------------------------ gossip (sender)
    def _push(self, peer: str, may_abandon: bool = True) -> None:
        w = self.w
        table = self.table
        assert table is not None
        now = self.now()
        table.tick(now)
        upto, entries = table.delta_for(peer)
        self._gossip_seq += 1
        body, signature = encode_delta(w.secret, self.id, self.boot, self._gossip_seq, now, upto, entries)
        self._push_id += 1
        pid = self._push_id
        t = w.sched.now
        self._waiting[peer] = (pid, t)
        dst = w.nodes[peer]
        inc = self.inc
        w.net.send(self.id, peer, dst.request, dst.inc, dst._on_delta, (body, signature, self.id, inc, pid),
                   lambda: w.net.send(peer, self.id, self.run, inc, self._on_answer, (peer, pid, None, None)))
        w.sched.at(t + w.push_timeout_s, self.run, inc, self._on_timeout, (peer, pid))
        if may_abandon:
            w.sched.at(t + w.probe_s, self.run, inc, self._probe_beside, (peer, pid))

    def _on_answer(self, peer: str, pid: int, body: bytes | None, signature: str | None) -> None:
        waiting = self._waiting.get(peer)
        if waiting is None or waiting[0] != pid:
            return  # the push timed out (or was abandoned) already: aiohttp dropped this connection
        del self._waiting[peer]
        outcome = "unreachable"  # no body: the connection was refused (a dead process)
        if body is not None:
            outcome = "refused"
            try:
                node, boot, acked = decode_ack(self.w.secret, body, signature)
            except WireError as exc:
                self.refused[f"ack_{exc.reason}"] += 1
            else:
                if node == peer:
                    table = self.table
                    assert table is not None
                    now = self.now()
                    if not table.on_peer_boot(node, boot, now):
                        table.on_ack(node, acked, now)
                    outcome = "ok"
                else:
                    self.refused["ack_wrong_peer"] += 1
        self._next_push(peer, waiting[1], outcome)

    def _on_timeout(self, peer: str, pid: int) -> None:
        waiting = self._waiting.get(peer)
        if waiting is not None and waiting[0] == pid:
            del self._waiting[peer]
            self._next_push(peer, waiting[1], "unreachable")

    def _next_push(self, peer: str, started: float, outcome: str) -> None:
        failures = 0 if outcome == "ok" else self._failures[peer] + 1
        self._failures[peer] = failures
        w = self.w
        g = w.gossip_s
        pause = g if failures < 10 else min(1.0, g * failures)
        self._next_at[peer] += 1
        token = self._next_at[peer]
        w.sched.at(started + pause, self.run, self.inc, self._scheduled_push, (peer, token))
        if started + pause - w.sched.now > w.probe_s and outcome == "unreachable":
            self._probe_pause(peer, token, started + pause)

    def _scheduled_push(self, peer: str, token: int) -> None:
        if self._next_at[peer] == token:
            self._push(peer)

    # ------------------------------------------------------------------ gossip (probes)
    def _probe_beside(self, peer: str, pid: int) -> None:
        waiting = self._waiting.get(peer)
        if waiting is None or waiting[0] != pid:
            return
        self._probe(peer, ("push", pid))
        self.w.sched.after(self.w.probe_s, self.run, self.inc, self._probe_beside, (peer, pid))

    def _probe_pause(self, peer: str, token: int, push_at: float) -> None:
        if self._next_at[peer] != token:
            return
        self._probe(peer, ("pause", token))
        nxt = self.w.sched.now + self.w.probe_s
        if nxt < push_at:
            self.w.sched.at(nxt, self.run, self.inc, self._probe_pause, (peer, token, push_at))

    def _probe(self, peer: str, tag: tuple[str, int]) -> None:
        w = self.w
        dst, inc, sent = w.nodes[peer], self.inc, w.sched.now
        w.net.send(self.id, peer, dst.request, dst.inc, dst._on_probe, (self.id, inc, tag, sent),
                   lambda: w.net.send(peer, self.id, self.run, inc, self._on_probe_answer, (peer, tag, sent, False)))

    def _on_probe(self, sender: str, sender_inc: int, tag: tuple[str, int], sent: float) -> None:
        src = self.w.nodes[sender]
        self.w.net.send(self.id, sender, src.run, sender_inc, src._on_probe_answer, (self.id, tag, sent, True))

    def _on_probe_answer(self, peer: str, tag: tuple[str, int], sent: float, ok: bool) -> None:
        if not ok or self.w.sched.now - sent > self.w.probe_s:
            return  # refused, or answered after the probe's timeout
        kind, ident = tag
        if kind == "push":
            waiting = self._waiting.get(peer)
            if waiting is None or waiting[0] != ident:
                return
            del self._waiting[peer]  # abandoned: its answer, if any, is dropped with its connection
            self._failures[peer] = 0
            self._next_at[peer] += 1
            self._push(peer, may_abandon=False)
        elif self._next_at[peer] == ident:
            self._next_at[peer] += 1
            self._push(peer)

    # ------------------------------------------------------------------ gossip (receiver)
    def _on_delta(self, body: bytes, signature: str, sender: str, sender_inc: int, pid: int) -> None:
        w = self.w
        now = self.now()
        try:
            delta = decode_delta(w.secret, body, signature, known_nodes=w.node_ids)
            self._replay.check(delta, now)
        except WireError as exc:
            self.refused[exc.reason] += 1
            answer: tuple[bytes | None, str | None] = (None, None)
        else:
            table = self.table
            assert table is not None
            table.on_peer_boot(delta.sender, delta.boot, now)
            table.merge(delta.sender, delta.entries, now)
            answer = encode_ack(w.secret, self.id, self.boot, delta.upto)
        src = w.nodes[sender]
        w.net.send(self.id, sender, src.run, sender_inc, src._on_answer, (self.id, pid, *answer))
