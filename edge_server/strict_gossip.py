"""Strict mode at run time: one node's StrictTable, its region's voter (on the region's first node), and
the signed strict messages between them over ``POST /v1/strict``.

The request path never waits on the network: :meth:`StrictGossiper.decide` takes and commits rights
the table already holds.  Everything else rides on a round every gossip interval: ``tick``, lease
renewals to every voter, a delta to every peer and the voter's heartbeats.  Messages are
fire-and-forget: each goes into the destination's outbox and one sender task per peer posts what is
queued as a batch (a JSON array of ``[message, signature]``), one batch in flight per peer.  A lost
batch costs nothing but time: deltas carry everything not yet acknowledged and merge is a max, lease
requests are renewed.  The receiver checks every message's signature and version
(``edge_server.strict.wire``) and its sequence (``SeqGuard``: a replay is refused with 409); what it
refuses is counted in ``edge_strict_refused{reason}`` and never merged.

Clocks: the core reads ``time.monotonic()`` only (a wall-clock step cannot stretch a lease); the
incarnation is the node's boot id (``edge_server.boot``: wall-clock ms, always above the last one).
The wall clock is read for one more thing: an incarnation more than a day ahead of it is refused
(``future_incarnation``; see ``edge_server.strict.wire``).

The voter's ledger (``<audit_dir>/<voter id>.ledger.json``) is saved write-ahead: after the voter
handled a message or a tick, and before any message of that step is queued, the document from
``Voter.pending_ledger`` (if any) is written to a temporary file, fsynced and renamed over the old
one.  Writes happen only when something a restart must remember grew (a share above the saved
bound, an incarnation, an epoch, an accepted proposal), so steady renewals cost none.  If the write
fails, the step's grant goes out as a refusal (``ledger_unwritable``) and an accept is not sent: a
grant nobody holds costs headroom, an unsaved one could be granted twice.  At start the voter is
restored from that file (every saved grant counts again for ``L (1 + rho) / (1 - rho)``, so it can
grant the rest at once); with no file, or one it cannot use, it grants nothing for that long.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client import Counter, Gauge

from edge_server.audit.segments import fsync_dir, read_json, write_json_atomic
from edge_server.config import ClusterConfig, NodeSpec
from edge_server.strict.allocator import Accept, LedgerError, Voter
from edge_server.strict.rights import split_actor
from edge_server.strict.table import StrictTable, Ticket
from edge_server.strict.wire import INCARNATION_AHEAD_MS, SeqGuard, decode, encode
from edge_server.token_bucket import Decision
from edge_server.wire import WireError

__all__ = ["LEASE_ENDED", "MAX_BATCH", "OUTBOX_MAX", "AfterWrite", "StrictGossiper", "ledger_path", "voter_hosts",
           "voter_id"]

log = logging.getLogger("edge_server.strict")

OUTBOX_MAX = 256  # queued messages per peer; older ones are dropped (deltas are cumulative)
MAX_BATCH = 64
VOTER_SEQ_SPAN = 1_000_000  # a voter's seq is boot * span + count: it grows across restarts
LEASE_ENDED = "lease_ended_before_answer"  # the denial reason of a grant revoked after its audit write


class AfterWrite:
    """The audit write of a strict grant that spent floating rights, then the lease re-check right
    before the answer leaves: ``await`` it in place of the write's future.  It gives None when the
    answer may leave as allowed, else the denial to answer instead (``StrictGossiper.confirm``);
    a failed write raises as the future does.  (A plain awaitable, not a coroutine: no task, no
    extra frame on the request path.)"""

    __slots__ = ("_decision", "_strict", "_ticket", "_write")

    def __init__(self, write: asyncio.Future[None], strict: StrictGossiper, ticket: Ticket,
                 decision: Decision) -> None:
        self._write, self._strict, self._ticket, self._decision = write, strict, ticket, decision

    def __await__(self) -> Generator[Any, None, Decision | None]:
        yield from self._write.__await__()
        return self.confirm()

    @property
    def write(self) -> asyncio.Future[None]:
        """The audit write's future (the raw-bytes check path waits for it by a callback, not ``await``)."""
        return self._write

    def confirm(self) -> Decision | None:
        """The lease re-check once the write is done: None, or the denial to answer instead."""
        return self._strict.confirm(self._ticket, self._decision)


def voter_id(region: str) -> str:
    return f"voter-{region}"


def ledger_path(config: ClusterConfig, voter: str) -> Path:
    """Where a voter's saved ledger lives: beside its host's audit trail and boot id."""
    return Path(config.audit_dir) / f"{voter}.ledger.json"


def voter_hosts(config: ClusterConfig) -> dict[str, str]:
    """Voter id -> the node that hosts it: the first node of each region."""
    return {voter_id(r.name): r.nodes[0].id for r in config.regions}


class StrictGossiper:
    """The strict limiter of one node and the messages it exchanges; ``run()`` until cancelled."""

    def __init__(self, config: ClusterConfig, me: NodeSpec, boot: int, metrics: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.me = me
        self.boot = boot
        self.clock = clock
        self.settings = config.strict.settings(config.gossip_interval_ms)
        self.node_ids = [n.id for n in config.nodes]
        self.peers = [n for n in config.nodes if n.id != me.id]
        self.by_id = {n.id: n for n in config.nodes}
        self.hosts = voter_hosts(config)
        self.voter_ids = sorted(self.hosts)
        now = clock()
        self.table = StrictTable(me.id, boot, self.node_ids, self.voter_ids, config.limit_for, self.settings,
                                 now=now, max_keys=config.max_keys)
        hosted = [v for v, host in self.hosts.items() if host == me.id]
        self.ledger_file: Path | None = ledger_path(config, hosted[0]) if hosted else None
        self.ledger_start = ""  # "restored", "none" (first start or data directory lost), "unusable"
        self.voter: Voter | None = self._start_voter(hosted[0], now) if hosted else None
        self.guard = SeqGuard()
        self._seq = 0
        self._voter_seq = 0
        # per peer: (message, signature, kind) queued for the next batch
        self._outbox: dict[str, deque[tuple[str, str, str]]] = {p.id: deque(maxlen=OUTBOX_MAX) for p in self.peers}
        self._wake: dict[str, asyncio.Event] = {}
        self.last_grant: float | None = None
        self.fenced_s = 0.0
        self._fenced_at: float | None = None
        self.started = now
        r = metrics.registry
        self.m_messages = Counter("edge_strict_messages", "Strict messages", ["direction", "outcome"], registry=r)
        self.m_refused = Counter("edge_strict_refused", "Strict messages or entries refused, by reason",
                                 ["reason"], registry=r)
        self.m_rights = Gauge("edge_strict_rights_held", "Rights this node holds, summed over keys", registry=r)
        self.m_sent = Gauge("edge_strict_transfers_sent", "Rights this incarnation gave to peers (tokens)",
                            registry=r)
        self.m_credited = Gauge("edge_strict_transfers_credited", "Rights this incarnation was given (tokens)",
                                registry=r)
        self.m_phi = Gauge("edge_strict_lease_share", "This node's floating share phi (0: fenced)", registry=r)
        self.m_lease_age = Gauge("edge_strict_lease_age_seconds", "Time since the last grant was taken",
                                 registry=r)
        self.m_fenced = Gauge("edge_strict_fenced_seconds", "Time spent with no valid lease (pinned share only)",
                              registry=r)
        self.m_revoked = Gauge("edge_strict_revoked", "Takes undone by the lease re-check after the spend",
                               registry=r)
        self.m_revoked_after_write = Counter(
            "edge_strict_revoked_after_write", "Allowed takes answered as denials because the lease behind "
            "their floating rights ended during the audit write (rights spent, never admitted)", registry=r)
        self.m_bytes = Counter("edge_strict_bytes", "Bytes of strict messages (message and signature, without "
                               "the batch's HTTP framing) to and from peers, by message kind",
                               ["direction", "kind"], registry=r)
        self._bytes: dict[tuple[str, str], Any] = {}  # (direction, kind) -> its labelled counter
        self.rounds = 0  # gossip rounds run
        self.m_ledger_writes = Counter("edge_strict_voter_ledger_writes", "Saves of the hosted voter's ledger",
                                       ["outcome"], registry=r)
        self._seen_refusals: dict[str, int] = {}

    # ------------------------------------------------------------------ the voter's ledger
    def _start_voter(self, vid: str, now: float) -> Voter:
        """The hosted voter, from its saved ledger if there is a usable one (else it waits)."""
        assert self.ledger_file is not None
        try:
            doc = read_json(self.ledger_file)
            voter = Voter.restore(doc, vid, self.voter_ids, self.node_ids, self.settings, now=now)
        except FileNotFoundError:
            self.ledger_start = "none"
        except (OSError, ValueError, LedgerError) as exc:  # garbled JSON, another version or cluster
            self.ledger_start = "unusable"
            log.warning("strict voter: saved ledger not usable; granting nothing for one reclaim time",
                        extra={"path": str(self.ledger_file), "error": str(exc)})
        else:
            self.ledger_start = "restored"
            return voter
        return Voter(vid, self.voter_ids, self.node_ids, self.settings, now=now, restarted=True)

    def _save_ledger(self, now: float) -> bool:
        """Write-ahead save of what the voter must remember; False if it could not be made durable."""
        voter, path = self.voter, self.ledger_file
        assert voter is not None and path is not None
        doc = voter.pending_ledger(now)
        if doc is None:
            return True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, doc)
            fsync_dir(path.parent)
        except OSError as exc:
            self.m_ledger_writes.labels("failed").inc()
            log.error("strict voter: ledger not saved", extra={"path": str(path), "error": str(exc)})
            return False
        voter.saved(doc)
        self.m_ledger_writes.labels("ok").inc()
        return True

    # ------------------------------------------------------------------ the request path
    def decide(self, key: str, cost: int) -> tuple[Decision, Ticket | None]:
        """Take and commit ``cost`` rights of ``key`` held here; no network.  Raises the core's errors.

        An allowed decision that spent floating rights comes with its ticket: the caller must hand it
        to :meth:`confirm` once the audit write is done, right before the answer leaves.

        One clock read for take and commit: nothing runs between them (no await), and the lease
        re-check that matters -- from the take's time to right before the answer -- is ``confirm``'s."""
        table = self.table
        now = self.clock()
        d = table.take(key, cost, now)
        ticket = d.ticket
        if ticket is not None and table.commit(ticket, now):
            return Decision(True, d.remaining, d.limit, 0.0), ticket if ticket.from_floating > 0 else None
        return Decision(False, d.remaining, d.limit, d.retry_after_s or self.settings.gossip_s), None

    def confirm(self, ticket: Ticket, decision: Decision) -> Decision | None:
        """The lease re-check after the audit write (``StrictTable.confirm``): None if the answer may
        leave as allowed, else the denial to send instead (the rights stay spent and audited)."""
        if self.table.confirm(ticket, self.clock()):
            return None
        self.m_revoked_after_write.inc()
        return Decision(False, decision.remaining, decision.limit, self.settings.gossip_s, LEASE_ENDED)

    # ------------------------------------------------------------------ messages out
    def _send(self, dst: str, kind: str, body: Any, *, as_voter: bool = False) -> None:
        """Sign ``body`` and queue it for ``dst`` (our own voter: handled at once).

        An ack does not wake the peer's sender: it waits for the batch of our next round (at most one
        gossip interval).  Sent at once, nearly every delta received cost a POST of its own -- half of
        a busy node's strict HTTP exchanges, each dearer than the ack's bytes -- while an ack only
        moves what the peer's next delta starts from (a late ack costs a few relayed entries, never
        safety: merge is a max and an unacknowledged delta is resent)."""
        if as_voter:
            assert self.voter is not None
            self._voter_seq += 1
            sender, seq = self.voter.voter_id, self.boot * VOTER_SEQ_SPAN + self._voter_seq
        else:
            self._seq += 1
            sender, seq = self.table.actor, self._seq
        data, signature = encode(self.config.secret, kind, sender, seq, body)
        if dst == self.me.id:  # our own voter: the same checks, no socket (and no bytes counted)
            self._receive(data, signature, remote=False)
            return
        box = self._outbox.get(dst)
        if box is None:
            return
        box.append((data.decode(), signature, kind))
        if kind != "strict_ack":
            wake = self._wake.get(dst)
            if wake is not None:
                wake.set()

    def _count_bytes(self, direction: str, kind: str, size: int) -> None:
        child = self._bytes.get((direction, kind))
        if child is None:
            child = self._bytes[direction, kind] = self.m_bytes.labels(direction, kind)
        child.inc(size)

    def round(self) -> None:
        """One gossip round (also the unit tests' entry point): tick, renew, deltas, heartbeats."""
        for _step in self._round_steps():
            pass

    def _round_steps(self) -> Iterator[None]:
        """One gossip round in steps; ``run`` lets the loop serve requests between them.

        A busy round held the loop for milliseconds in one piece, and every request that arrived
        meanwhile waited for all of it: the round, not the decision, set strict mode's p99.  Each step
        is complete in itself (the table's calls are atomic), and the clock is read again after every
        pause, so nothing is done with an old ``now`` -- the voter's grants least of all."""
        self.rounds += 1
        now = self.clock()
        table = self.table
        table.tick(now)
        for req in table.lease_requests(now):
            self._send(self.hosts[req.voter], "lease_request", req)
        for peer in self.peers:
            yield
            delta = table.delta_for(peer.id)
            if delta[1]:  # nothing changed since the peer's view: no message, no ack
                self._send(peer.id, "strict_delta", delta)
        if self.voter is not None:
            yield
            now = self.clock()
            out = self.voter.tick(now)
            self._save_ledger(now)  # nothing of a tick needs it first; it only catches up
            for dst, msg in out:
                self._send(self.hosts[dst], type(msg).__name__.lower(), msg, as_voter=True)
        for peer_id, box in self._outbox.items():  # the acks queued since the last round go now
            if box:
                wake = self._wake.get(peer_id)
                if wake is not None:
                    wake.set()
        self._gauges(self.clock())

    def _gauges(self, now: float) -> None:
        table = self.table
        phi = table.phi(now)
        if phi <= 0 and self._fenced_at is None:
            self._fenced_at = now
        elif phi > 0 and self._fenced_at is not None:
            self.fenced_s += now - self._fenced_at
            self._fenced_at = None
        self.m_phi.set(phi)
        self.m_fenced.set(self.fenced_s + (now - self._fenced_at if self._fenced_at is not None else 0.0))
        self.m_lease_age.set(now - self.last_grant if self.last_grant is not None else float("nan"))
        held, sent, credited = table.totals(now)  # cached: a loop over every key each round cost more than the round
        self.m_rights.set(held)
        self.m_sent.set(sent)
        self.m_credited.set(credited)
        self.m_revoked.set(table.revoked)
        refused = dict(table.refused)
        if self.voter is not None:
            refused.update({f"voter_{k}": v for k, v in self.voter.refused.items()})
        for reason, count in refused.items():
            grew = count - self._seen_refusals.get(reason, 0)
            if grew > 0:
                self.m_refused.labels(reason).inc(grew)
        self._seen_refusals = refused

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(0.5, 10 * self.settings.gossip_s), connect=0.25)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            self._wake = {p.id: asyncio.Event() for p in self.peers}
            senders = [asyncio.create_task(self._sender(session, p)) for p in self.peers]
            try:
                while True:
                    for _step in self._round_steps():
                        await asyncio.sleep(0)
                    await asyncio.sleep(self.settings.gossip_s)
            finally:
                for task in senders:
                    task.cancel()
                await asyncio.gather(*senders, return_exceptions=True)

    async def _sender(self, session: aiohttp.ClientSession, peer: NodeSpec) -> None:
        box, wake, url = self._outbox[peer.id], self._wake[peer.id], peer.url + "/v1/strict"
        while True:
            if not box:
                wake.clear()
                await wake.wait()
            batch = [box.popleft() for _ in range(min(MAX_BATCH, len(box)))]
            body = orjson.dumps([(data, signature) for data, signature, _kind in batch])
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    outcome = "ok" if resp.status == 200 else f"refused_{resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError):
                outcome = "unreachable"
                await asyncio.sleep(self.settings.gossip_s)  # a dead peer: do not spin
            self.m_messages.labels("sent", outcome).inc(len(batch))
            for data, signature, kind in batch:
                self._count_bytes("sent", kind, len(data) + len(signature))

    # ------------------------------------------------------------------ messages in
    def handle_batch(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        """The ``POST /v1/strict`` body: ``(status, answer)``; refusals are counted and never merged."""
        try:
            batch = orjson.loads(raw)
        except orjson.JSONDecodeError:
            batch = None
        if not isinstance(batch, list) or not all(
                isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) for y in x) for x in batch):
            self.m_refused.labels("malformed").inc()
            return 400, {"error": "strict_malformed", "message": "expected a JSON array of [message, signature]"}
        refused: dict[str, int] = {}
        status = 200
        for data, signature in batch:
            reason, code = self._receive(data.encode(), signature)
            if reason:
                refused[reason] = refused.get(reason, 0) + 1
                status = code if status == 200 else status
        return status, {"accepted": len(batch) - sum(refused.values()), "refused": refused}

    def _receive(self, data: bytes, signature: str, remote: bool = True) -> tuple[str, int]:
        try:
            msg = decode(self.config.secret, data, signature, nodes=self.node_ids, voters=self.voter_ids,
                         max_incarnation=int(time.time() * 1000) + INCARNATION_AHEAD_MS)
            self.guard.check(msg)
        except WireError as exc:
            self.m_refused.labels(exc.reason).inc()
            self.m_messages.labels("received", "refused").inc()
            return exc.reason, exc.status
        self.m_messages.labels("received", "ok").inc()
        now = self.clock()
        kind = msg.kind
        if remote:
            self._count_bytes("received", kind, len(data) + len(signature))
        if kind in ("strict_delta", "strict_ack", "grant"):
            table = self.table
            if kind == "strict_delta":
                upto, entries = msg.body
                table.merge(msg.sender, entries, now)
                self._send(split_actor(msg.sender)[0], "strict_ack", upto)
            elif kind == "strict_ack":
                table.on_ack(msg.sender, msg.body, now)
            elif not table.on_grant(msg.body, now) and msg.body.fraction > 0:
                self.last_grant = now
            return "", 200
        voter = self.voter
        if voter is None:
            self.m_refused.labels("not_a_voter").inc()
            return "not_a_voter", 409
        if kind == "lease_request":
            grant = voter.on_request(msg.body, now)
            if not self._save_ledger(now) and grant.fraction > 0:
                grant = voter.withdraw(grant, "ledger_unwritable")
            self._send(grant.node, "grant", grant, as_voter=True)
        else:
            outs = voter.on_message(msg.body, now)
            if not self._save_ledger(now):
                outs = [(to, out) for to, out in outs if not isinstance(out, Accept)]  # stays frozen: safe
            for to, out in outs:
                self._send(self.hosts[to], type(out).__name__.lower(), out, as_voter=True)
        return "", 200

    # ------------------------------------------------------------------ views
    def spend_views(self, keys: list[str] | None = None) -> dict[str, Any]:
        """Per key the spend this node knows of, in ``/v1/state``'s eventual shape (``global`` and per
        node its newest incarnation as ``gen`` and that incarnation's ``count``), so the workbench's
        token-loss and convergence checks read both modes alike."""
        table = self.table
        out: dict[str, Any] = {}
        for key in keys if keys is not None else table.keys():
            if key not in table.keys():
                continue
            per: dict[str, tuple[int, int]] = {}
            total = 0
            for actor, r in table.rights(key).items():
                node, inc = split_actor(actor)
                total += int(r.spent)
                if node not in per or inc > per[node][0]:
                    per[node] = (inc, int(r.spent))
            out[key] = {"global": total, "nodes": {n: {"gen": g, "count": c} for n, (g, c) in per.items()}}
        return out

    def state(self) -> dict[str, Any]:
        """``/v1/state`` in strict mode: rights per key, the lease and the incarnation."""
        now = self.clock()
        doc = self.table.state(now)
        left = self.table.lease.expires(now) - now
        valid = doc["lease_valid"]
        doc["lease_expires_in_s"] = (None if math.isinf(left) else round(max(0.0, left), 3)) if valid else 0.0
        doc["lease_age_s"] = None if self.last_grant is None else round(now - self.last_grant, 3)
        doc["fenced_s"] = round(self.fenced_s + (now - self._fenced_at if self._fenced_at is not None else 0.0), 3)
        if self.voter is not None:
            v = self.voter
            doc["voter"] = {"id": v.voter_id, "epoch": v.epoch, "members": list(v.members),
                            "ledger": v.ledger(now), "refused": dict(v.refused), "started_from": self.ledger_start,
                            "grants_in_s": round(max(0.0, v.grants_from - now), 3),
                            "incarnations": dict(v.incarnations)}
        return doc
