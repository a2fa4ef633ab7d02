"""One edge node at run time: the limiter table, its audit trail, gossip and readiness, wired together.

The HTTP layer (``app.py``) only parses and answers; every decision goes through :meth:`Node.decide`,
which takes tokens from the pure core and returns only once the grant is in the audit trail.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable

from edge_server.audit import AuditLog
from edge_server.audit.replica import ReplicaStore, Replicator, replica_target
from edge_server.audit.replica_metrics import ReplicationCollector
from edge_server.boot import take_boot
from edge_server.config import ClusterConfig, NodeSpec
from edge_server.gossip import Gossiper
from edge_server.metrics import NodeMetrics
from edge_server.skill import Skill, make_skill
from edge_server.strict_gossip import AfterWrite, StrictGossiper
from edge_server.token_bucket import BucketTable, Decision
from edge_server.wire import ReplayGuard

__all__ = ["Node"]

log = logging.getLogger("edge_server.node")


class Node:
    def __init__(self, config: ClusterConfig, node_id: str) -> None:
        self.config = config
        self.spec: NodeSpec = config.node(node_id)
        self.peers = [n for n in config.nodes if n.id != node_id]
        self.node_ids = frozenset(n.id for n in config.nodes)
        self.metrics = NodeMetrics()
        self.boot = take_boot(config.audit_dir, node_id, int(time.time() * 1000))
        self._request_ids = itertools.count(1)
        self._request_prefix = f"{self.spec.id}-{self.boot}-"  # ids are unique across restarts (boot)
        self.audit = AuditLog(config.audit_dir, node_id, self.spec.region, config.secret, config.audit,
                              fsync=config.server.audit_fsync)
        self.replicas = ReplicaStore(config.audit_dir, node_id, set(self.node_ids), config.secret, config.audit)
        target = replica_target(config, node_id) if config.audit.replicate else None
        self.replicator = (Replicator(self.audit, self.spec, target, config.secret,
                                      config.audit.replicate_interval_ms / 1000) if target is not None else None)
        self.metrics.registry.register(ReplicationCollector(self.replicator, self.replicas))
        self.table: BucketTable | None = None
        self.replay = ReplayGuard({p.id for p in self.peers})
        self.skill: Skill = make_skill(config.skill)
        self.gossiper: Gossiper | StrictGossiper | None = None
        self.strict: StrictGossiper | None = None  # the strict limiter, in mode "strict"
        self.started = time.time()
        self.recovered_ready = False
        self.draining = False
        self.inflight = 0
        self.exhausted = False
        self.cold = False
        self.ident = {"X-Edge-Node": self.spec.id, "X-Edge-Region": self.spec.region}  # on every answer

    @property
    def gossip_interval_s(self) -> float:
        return self.config.gossip_interval_ms / 1000

    def recover(self) -> None:
        """Build the table and replay the audit trail; a node with history starts cold (empty).

        Only the newest checkpoint and the segments after it are read (``AuditCorrupt`` when they do
        not fit).  Keys are restored least recently written first, and at most ``max_keys`` of the
        most recent: a key forgotten here gets a newer generation when it comes back, so no count
        that peers hold for this node can shadow it.
        """
        if self.config.mode == "strict":
            self._recover_strict()
            return
        started = time.perf_counter()
        now = time.time()
        peer_timeout = self.config.peer_timeout_ms / 1000 or None
        recovered = self.audit.open()
        self.cold = recovered.events > 0
        table = BucketTable(
            self.spec.id, [p.id for p in self.peers], self.config.limit_for, now=now,
            gossip_interval=self.gossip_interval_s, peer_timeout=peer_timeout,
            max_keys=self.config.max_keys, idle_ttl=self.config.key_idle_ttl_s, cold=self.cold,
        )
        self.audit.on_durable = self._on_durable
        self.audit.on_lost = table.refund_many
        self.audit.own_source = self._own_entries
        own = recovered.own
        skip = max(0, len(own) - self.config.max_keys)
        for key, entry in itertools.islice(own.items(), skip, None):
            table.recover(key, entry, now)
        if recovered.max_gen > getattr(table, "_last_gen", recovered.max_gen):
            # New generations must stay above every one the trail holds, including forgotten keys'.
            table._last_gen = recovered.max_gen
        self.table = table
        keys = len(own)
        self.audit.release_recovered()
        self.recovered_ready = True
        self.gossiper = Gossiper(table, self.spec, self.peers, self.config.secret, self.boot,
                                 self.gossip_interval_s, self.metrics)
        log.info("audit recovered", extra={
            "events": recovered.events, "keys": keys, "cold": self.cold,
            "truncated_bytes": recovered.truncated_bytes, "checkpoint": recovered.checkpoint,
            "replayed_events": recovered.replayed_events, "replayed_bytes": recovered.replayed_bytes,
            "segments": len(recovered.segments), "seconds": round(time.perf_counter() - started, 3)})
        if recovered.truncated_bytes:
            log.warning("audit trail ended in a torn write (a crash mid-write); the partial line was cut off",
                        extra={"path": str(self.audit.path), "bytes": recovered.truncated_bytes})

    def _recover_strict(self) -> None:
        """Strict mode: the audit trail is opened for its sequence, but no count is recovered from it --
        a restart is a new incarnation that starts empty (``docs/strict-mode.md``, Restart)."""
        recovered = self.audit.open()
        self.audit.on_durable = self._on_durable_strict
        self.audit.on_lost = lambda grants: None  # spent rights stay spent: a lost write costs, never over-admits
        self.audit.own_source = lambda: ([], 0)
        self.audit.release_recovered()
        self.strict = StrictGossiper(self.config, self.spec, self.boot, self.metrics)
        self.gossiper = self.strict
        self.recovered_ready = True
        log.info("strict mode: started a new incarnation", extra={
            "incarnation": self.boot, "actor": self.strict.table.actor, "audit_events": recovered.events,
            "voter": self.strict.voter.voter_id if self.strict.voter is not None else None})

    def _on_durable_strict(self, grants: list[tuple[str, int, int]]) -> None:
        hot = self.metrics.hot
        hot.allowed += len(grants)
        hot.tokens += sum(cost for _key, cost, _gen in grants)

    def _own_entries(self) -> tuple[tuple[list[str], list[tuple[int, int]]], int]:
        """This node's own ``(generation, count)`` for every live key (least recently active first),
        as two lists (keys, entries), and the newest generation handed out: what a checkpoint holds.
        The keys and entries are the table's own immutable objects, shared, not copied: a snapshot of
        100,000 keys costs two lists, not a tuple per key (~7 MB more at every seal)."""
        table = self.table
        assert table is not None
        me = self.spec.id
        keys: list[str] = []
        entries: list[tuple[int, int]] = []
        for key, st in table._keys.items():
            entry = st.counts.get(me)
            if entry is not None:
                keys.append(key)
                entries.append(entry)
        return (keys, entries), getattr(table, "_last_gen", 0)

    def new_request_id(self) -> str:
        return self._request_prefix + str(next(self._request_ids))

    def decide(self, key: str, cost: int, request_id: str) -> tuple[Decision, Awaitable[Decision | None] | None]:
        """Take ``cost`` tokens of ``key``.  An allowed decision comes with an awaitable of its audit
        write: the caller must await it before answering (it raises ``AuditUnavailable`` if the write
        failed, and the tokens are then given back).  What it gives is None, or -- strict mode, when
        the lease behind the grant ended during the write -- the denial to answer instead.  Not a
        coroutine itself: one frame less to suspend and resume on the hottest path.

        Raises ``KeyTableFull``/``NoLimitForKey``/``CostExceedsBurst`` from the core.
        """
        strict = self.strict
        if strict is not None:  # rights held here, taken and committed at once; no network
            decision, ticket = strict.decide(key, cost)
            if not decision.allowed:
                self.metrics.hot.denied += 1
                return decision, None
            written = self.audit.append(key, cost, self.boot, request_id, time.time())
            # Floating rights need the lease re-checked once the write is done, right before the answer.
            return decision, written if ticket is None else AfterWrite(written, strict, ticket, decision)
        table = self.table
        assert table is not None
        now = time.time()
        decision = table.take(key, cost, now)
        if not decision.allowed:
            self.metrics.hot.denied += 1
            return decision, None
        return decision, self.audit.append(key, cost, table.generation_of(key, now), request_id, now)

    def _on_durable(self, grants: list[tuple[str, int, int]]) -> None:
        """A batch of grants is on disk: peers may see it, and it counts as granted."""
        assert self.table is not None
        self.table.commit_many(grants)
        hot = self.metrics.hot
        hot.allowed += len(grants)
        hot.tokens += sum(cost for _key, cost, _gen in grants)

    def readiness(self) -> tuple[bool, str]:
        if not self.recovered_ready:
            return False, "starting"
        if self.draining:
            return False, "draining"
        if self.strict is not None:
            pass  # a strict node serves at once: it admits only rights it holds (none until it mints)
        elif self.cold and not self._cold_synced():
            return False, "starting"
        if self.inflight >= self.config.server.max_inflight:
            return False, "overloaded"
        if self.exhausted:
            return False, "exhausted"
        return True, "ok"

    def _cold_synced(self) -> bool:
        """A restarted node serves once every live peer has sent its baseline, or after a timeout."""
        assert self.table is not None
        if time.time() - self.started > max(1.0, 3 * self.table.peer_timeout):
            return True
        return all(self.table._peers[p.id].synced for p in self.peers)

    async def housekeeping(self) -> None:
        """Liveness, expiry and gauges, a few times a second."""
        if self.strict is not None:
            while True:  # the strict rounds run in the gossiper; only the shared gauges here
                await asyncio.sleep(0.25)
                self.metrics.inflight.set(self.inflight)
                self.metrics.live_keys.set(len(self.strict.table.keys()))
        table = self.table
        assert table is not None
        m = self.metrics
        tick = 0
        while True:
            await asyncio.sleep(0.25)
            now = time.time()
            table.tick(now)
            self.exhausted = table.exhausted(now)
            m.live_keys.set(table.key_count())
            m.live_peers.set(len(table.live_peers()))
            m.inflight.set(self.inflight)
            tick += 1
            if tick % 4 == 0:
                table.expire(now)
                m.crdt_entries.set(table.entry_count())

    async def close(self) -> None:
        await self.skill.close()
        # A clean stop seals what was closed (bounded): the next start reads a checkpoint, not segments.
        await self.audit.wait_sealed(10.0)
        self.audit.close()
        self.replicas.close()
