"""Replicas across regions: every node ships its trail's lines to one node of another region.

The sender (:class:`Replicator`, one background task per node) posts the lines after what the
replica acknowledged, at most ``BATCH`` at a time, every ``interval`` while there is something new,
and on any fault (refused connection, timeout, 5xx) keeps them and resends after a back-off: what
is not acknowledged is sent again.  The receiver (:class:`ReplicaStore`) writes them, verbatim,
into a trail of the origin node under ``audit_dir/replicas/`` -- the same layout, segments and
signed heads as the origin's own, so ``edge-server audit verify audit/replicas`` checks it -- and
acknowledges only what is on disk.

Messages are authenticated like gossip (HMAC-SHA256 of the body with the cluster secret, both
ways).  A message that is forged or unsigned is refused with 401; one addressed to another node or
from an unknown one with 400; lines that do not continue the replica's chain (out of order, a gap,
an edited or foreign line) with 409 and the replica's last sequence number, from which the sender
resends; a replayed message holds only lines the replica has and changes nothing.  Every refusal is
counted by reason.

A node that starts without any trail of its own (its disk was lost) and replicates first asks its
replica holder for everything it holds (:func:`rebuild_from_replica`, signed pages of lines, each
checked against the chain as it is written) and only then recovers and serves: its counts and
sequence numbers carry on from the replica instead of starting again from zero.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

from edge_server.audit.log import AuditLog, AuditUnavailable
from edge_server.audit.recovery import AuditCorrupt
from edge_server.config import AuditConfig, ClusterConfig, NodeSpec
from edge_server.wire import SIGNATURE_HEADER, sign

__all__ = ["BATCH", "BATCH_BYTES", "ReplicaStore", "Replicator", "replica_holders", "replica_target"]

log = logging.getLogger("edge_server.audit.replica")
BATCH = 4000  # lines per message at most
BATCH_BYTES = 4 * 1024 * 1024  # and bytes: what the sender holds unacknowledged in memory, at most
PATH = "/v1/audit/replica"
CONFLICT_RETRY_S = 5.0  # how often a sender in conflict asks the holder again


def verify(secret: bytes, body: bytes, signature: str | None) -> bool:
    """True when ``signature`` is the cluster's HMAC of ``body`` (compared in constant time)."""
    return bool(signature) and hmac.compare_digest(sign(secret, body), signature or "")


def replica_target(config: ClusterConfig, node_id: str) -> NodeSpec | None:
    """The node holding ``node_id``'s replica: the same position in the next region (cyclic);
    None with a single region."""
    regions = config.regions
    if len(regions) < 2:
        return None
    for i, region in enumerate(regions):
        for j, node in enumerate(region.nodes):
            if node.id == node_id:
                nxt = regions[(i + 1) % len(regions)]
                return nxt.nodes[j % len(nxt.nodes)]
    return None


def replica_holders(config: ClusterConfig, node_id: str) -> list[NodeSpec]:
    """Every node that holds ``node_id``'s replica under this cluster file (one today:
    :func:`replica_target`); empty with a single region.  A node that lost its trail asks them all."""
    target = replica_target(config, node_id)
    return [target] if target is not None else []


class ReplicaStore:
    """The replicas this node holds, one trail per origin node, opened on first use."""

    def __init__(self, audit_dir: Path, me: str, known: set[str], secret: bytes, config: AuditConfig) -> None:
        self.folder = audit_dir / "replicas"
        self.me, self.known, self.secret, self.config = me, known, secret, config
        self.logs: dict[str, AuditLog] = {}
        self.refused: Counter[str] = Counter()
        self.received = 0

    def _log(self, origin: str, region: str) -> AuditLog:
        replica = self.logs.get(origin)
        if replica is None:
            replica = AuditLog(self.folder, origin, region, self.secret, self.config)
            replica.open()
            self.logs[origin] = replica
        return replica

    def _refuse(self, status: int, reason: str, message: str, last_seq: int | None = None) -> tuple[int, bytes]:
        self.refused[reason] += 1
        log.warning("replica message refused", extra={"reason": reason, "detail": message})
        doc: dict = {"error": {"code": f"replica_{reason}", "message": message, "field": None}}
        if last_seq is not None:
            doc["last_seq"] = last_seq
        return status, orjson.dumps(doc)

    def receive(self, body: bytes, signature: str | None) -> tuple[int, bytes]:
        """Handle one message: ``(HTTP status, JSON body)``; the body of a 200 is signed by the caller."""
        if not signature or not verify(self.secret, body, signature):
            return self._refuse(401, "bad_signature", "replica message is not signed with the cluster secret")
        head, _, rest = body.partition(b"\n")
        try:
            header = orjson.loads(head)
            origin, region, to = str(header["origin"]), str(header["region"]), header["to"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return self._refuse(400, "malformed", "replica message has no valid header line")
        if to != self.me or origin == self.me or origin not in self.known:
            return self._refuse(400, "misaddressed", f"a replica message from {origin!r} to {to!r} reached {self.me!r}")
        try:
            replica = self._log(origin, region)
        except (AuditCorrupt, OSError) as exc:
            return self._refuse(503, "unavailable", f"the replica of {origin} cannot be opened: {exc}")
        try:
            appended = replica.append_raw(rest.splitlines(keepends=True), time.time())
        except ValueError as exc:
            return self._refuse(409, "out_of_order", f"{origin}: {exc}", replica.last_seq)
        except AuditUnavailable as exc:
            return self._refuse(503, "unavailable", str(exc))
        self.received += appended
        return 200, orjson.dumps({"origin": origin, "holder": self.me, "last_seq": replica.last_seq,
                                  "appended": appended})

    def held(self, origin: str, region: str) -> int:
        """The newest seq of ``origin`` this node holds (0: none), without creating a replica that
        is not there (a node asking whether it ever ran must not leave an empty trail behind)."""
        if origin not in self.known or origin == self.me:
            raise KeyError(origin)
        if origin not in self.logs and not ((self.folder / f"{origin}.jsonl").exists()
                                            or (self.folder / origin).exists()):
            return 0
        return self._log(origin, region).last_seq

    def serve(self, origin: str, region: str, after: int, limit: int) -> bytes:
        """Lines of ``origin``'s replica after ``after`` (for ``origin`` rebuilding its own trail)."""
        if origin not in self.known or origin == self.me:
            raise KeyError(origin)
        return b"".join(self._log(origin, region).read_raw(after, limit))

    def status(self) -> dict:
        return {"held": {o: r.last_seq for o, r in self.logs.items()}, "refused": dict(self.refused),
                "received": self.received}

    def close(self) -> None:
        for replica in self.logs.values():
            replica.close()


def has_trail(audit: AuditLog) -> bool:
    """Whether anything of ``audit``'s node is on disk (an open segment or a folder of segments)."""
    return audit.path.exists() or audit.folder.exists()


async def rebuild_from_replica(audit: AuditLog, me: NodeSpec, holder: NodeSpec, secret: bytes,
                               within_s: float = 30.0) -> int:
    """Fill the empty trail ``audit`` (opened) from ``holder``'s replica of it; returns the events.

    Retries an unreachable holder until ``within_s`` is over, then raises ``TimeoutError``: a node
    that lost its trail must not serve from zero while a copy of it exists elsewhere.
    """
    deadline = time.monotonic() + within_s
    timeout = aiohttp.ClientTimeout(total=10, connect=1)
    fetched = 0
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            url = f"{holder.url}{PATH}?origin={me.id}&after={audit.last_seq}&limit={BATCH}"
            try:
                async with session.get(url) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise ValueError(f"{holder.id} answered {resp.status}: {body[:200]!r}")
                    if not verify(secret, body, resp.headers.get(SIGNATURE_HEADER)):
                        raise ValueError(f"{holder.id}'s replica is not signed with the cluster secret")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica holder {holder.id} unreachable: {exc}") from None
                await asyncio.sleep(0.2)
                continue
            if not body:
                break
            fetched += audit.append_raw(body.splitlines(keepends=True), time.time())
    await audit.wait_sealed(60.0)
    return fetched


class Replicator:
    """Ships one node's trail to its replica holder (see the module docstring)."""

    def __init__(self, audit: AuditLog, me: NodeSpec, target: NodeSpec, secret: bytes, interval_s: float) -> None:
        self.audit, self.me, self.target, self.secret = audit, me, target, secret
        self.interval_s = interval_s
        self.acked = 0  # the replica holds every event up to this seq
        self.contacted = False
        self.conflict = ""  # the holder holds another trail of this node (see step); nothing is acked then
        self.messages = self.events = self.failures = 0
        self.last_error = ""

    def lag_s(self, now: float) -> float:
        """Age of the oldest event the replica does not hold yet: what losing this node's disk now
        would lose (0 when the replica is up to date)."""
        if self.acked >= self.audit.last_seq:
            return 0.0
        oldest = self.audit.read_raw(self.acked, 1)
        return max(0.0, now - orjson.loads(oldest[0])["ts"]) if oldest else 0.0

    def status(self, now: float) -> dict:
        return {"target": self.target.id, "acked_seq": self.acked, "lag_events": self.audit.last_seq - self.acked,
                "lag_s": round(self.lag_s(now), 3), "messages": self.messages, "events": self.events,
                "failures": self.failures, "last_error": self.last_error, "conflict": self.conflict}

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5, connect=1)
        backoff = self.interval_s
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    more = await self.step(session)
                    backoff = self.interval_s
                    if self.conflict:  # nothing to send until an operator moves the other trail aside
                        self.contacted = False
                        await asyncio.sleep(CONFLICT_RETRY_S)
                        continue
                except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                    self.failures += 1
                    self.last_error = f"{exc.__class__.__name__}: {exc}"
                    backoff = min(2.0, backoff * 2)
                    await asyncio.sleep(backoff)
                    continue
                await asyncio.sleep(0 if more else self.interval_s)

    async def step(self, session: aiohttp.ClientSession) -> bool:
        """Send one message (lines after ``acked``, or an empty one to learn where the replica is);
        True when there is more to send at once."""
        lines = self.audit.read_raw(self.acked, BATCH) if self.contacted else []
        if self.contacted and not lines:
            return False
        size, full = 0, len(lines) == BATCH
        for i, line in enumerate(lines):  # a message of long lines is cut at BATCH_BYTES (one line at least)
            size += len(line)
            if size > BATCH_BYTES and i:
                del lines[i:]
                full = True
                break
        sent_after = self.acked
        header = orjson.dumps({"v": 1, "origin": self.me.id, "region": self.me.region, "to": self.target.id,
                               "after": self.acked, "count": len(lines), "sent_at": time.time()})
        body = header + b"\n" + b"".join(lines)
        async with session.post(self.target.url + PATH, data=body,
                                headers={SIGNATURE_HEADER: sign(self.secret, body),
                                         "Content-Type": "application/octet-stream"}) as resp:
            answer = await resp.read()
            if resp.status == 200 and not verify(self.secret, answer, resp.headers.get(SIGNATURE_HEADER)):
                raise ValueError("replica answer not signed with the cluster secret")
            if resp.status not in (200, 409):
                raise ValueError(f"replica answered {resp.status}: {answer[:200]!r}")
            doc = orjson.loads(answer)
        last = int(doc["last_seq"])
        self.messages += 1
        # Another trail of this node at the holder: it holds more than this node ever wrote, or it
        # refuses the very next line after its end (the chains differ there).  Both follow a start
        # from zero while the holder was unreachable (holders_unanswered = "start_fresh"): the
        # holder's copy is kept as it is, nothing is acknowledged, and the node says so.
        refused_next = (resp.status == 409 and bool(lines) and last == sent_after
                        and orjson.loads(lines[0])["seq"] == sent_after + 1)  # not a gap retention left
        if last > self.audit.last_seq or refused_next:
            self.conflict = (f"{self.target.id} holds another trail of {self.me.id} (up to seq {last}; "
                             f"this node's is at {self.audit.last_seq})")
            self.acked = 0
            log.error("replica conflict", extra={"detail": self.conflict})
            return False
        self.conflict = ""
        if resp.status == 200 and lines:
            self.events += int(doc.get("appended", 0))
        self.acked = last
        self.contacted = True
        return resp.status == 200 and full
