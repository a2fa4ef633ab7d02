"""The pure limiter core: a global token bucket per key, replicated as per-key G-Counters.

Every node runs, for each key, a local bucket that refills at the key's *global* rate ``R`` (capped at
the burst ``B``) and subtracts every token any node consumed as soon as it learns of it: its own at
once, a peer's when that peer's G-Counter entry grows in a merge.  The level may go negative (debt),
so over time the cluster admits ``R`` per second; the excess is only what was in flight between
gossip rounds.  Two extra rules close the known holes:

* **Unseen spend cap.**  If every node started full, N nodes could admit ``N x B`` before the first
  gossip round.  A node may hold at most ``share`` tokens of its own spending that live peers have
  not acknowledged yet (``share = max(B / N, R x unseen_window)``).
* **Cold start.**  A restarted node does not know the level: it starts empty, recovers its own
  counts from its audit trail, and takes the first full sync from each peer as a baseline.

Nothing here reads a clock or touches I/O: ``now`` (seconds, wall clock of the caller) is an
argument, so tests drive time by hand.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from edge_server.gcounter import Entry, KeyCounters, consumed_between

__all__ = [
    "BucketTable",
    "CostExceedsBurst",
    "Decision",
    "KeyTableFull",
    "Limit",
    "NoLimitForKey",
]


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket: ``rate`` tokens per second, at most ``burst`` tokens at once."""

    rate: float
    burst: float


class Decision(NamedTuple):
    """The answer to one ``take``: allowed or not, what is left and when to retry.  ``reason`` names a
    denial that is not the plain "over the limit" (strict mode's ``lease_ended_before_answer``)."""

    allowed: bool
    remaining: float
    limit: float
    retry_after_s: float
    reason: str = ""


class KeyTableFull(Exception):
    """The live-key cap is reached and no idle key can be evicted."""


class NoLimitForKey(LookupError):
    """No configured limit pattern matches the key."""


class CostExceedsBurst(ValueError):
    """A single request costs more than the key's burst: it could never be allowed."""

    def __init__(self, burst: float) -> None:
        super().__init__(f"cost exceeds the burst {burst:g}")
        self.burst = burst


class _KeyState:
    """Per-key state.  ``counts`` is the replicated part; the rest is this node's local view."""

    __slots__ = (
        "changed",
        "counts",
        "last_active",
        "level",
        "limit",
        "mark",
        "own_gen",
        "pending",
        "pending_amount",
        "post",
        "share",
        "stamp",
        "synced_with",
        "undurable",
    )

    def __init__(self, limit: Limit, level: float, now: float, own_gen: int, share: float) -> None:
        self.limit = limit
        self.share = share  # most own tokens that live peers may not have acknowledged yet
        self.own_gen = own_gen  # generation of this node's entry if it has none yet (fixed at creation)
        self.counts: KeyCounters = {}
        self.level = level
        self.stamp = now
        self.last_active = now
        self.undurable = 0  # own tokens granted, not yet durable in the audit trail
        self.pending: list[list[int]] | None = None  # [[change_seq, amount]] own, not acked by all
        self.pending_amount = 0
        self.changed = 0  # change sequence of the last change to ``counts``
        self.synced_with: str | None = None  # a peer whose last message held exactly ``counts``
        self.mark = 0  # the table's silence count when ``post`` was last reset
        self.post = 0.0  # own tokens granted since the table's latest silence

    def __repr__(self) -> str:
        return (
            f"<KeyState level={self.level:.2f} counts={self.counts} undurable={self.undurable} "
            f"pending={self.pending_amount}>"
        )


class _PeerView:
    __slots__ = ("acked", "boot", "heard", "synced")

    def __init__(self) -> None:
        self.acked = 0  # our change sequence this peer has merged
        self.heard = -math.inf  # last time we heard from it
        self.boot = 0  # its boot id; a new one means it restarted and needs a full sync
        self.synced = False  # received at least one message since we started


class BucketTable:
    """All keys of one node.  Not thread-safe; one event loop owns it."""

    def __init__(
        self,
        node_id: str,
        peers: Iterable[str],
        limit_for: Callable[[str], Limit | None],
        *,
        now: float,
        gossip_interval: float = 0.02,
        peer_timeout: float | None = None,
        max_keys: int = 1_000_000,
        idle_ttl: float = 300.0,
        max_debt_bursts: float = 1.0,
        cold: bool = False,
    ) -> None:
        self.node_id = node_id
        self._limit_for = limit_for
        self._peers: dict[str, _PeerView] = {p: _PeerView() for p in peers if p != node_id}
        self.cluster_size = len(self._peers) + 1
        self.gossip_interval = gossip_interval
        self.peer_timeout = peer_timeout if peer_timeout is not None else max(0.25, 5 * gossip_interval)
        self.unseen_window = 4 * gossip_interval
        self.max_keys = max_keys
        self.idle_ttl = idle_ttl
        self.max_debt_bursts = max_debt_bursts
        self.cold = cold
        self.started = now
        # Our own silences: a gap of more than ``peer_timeout`` between two calls of take, tick or merge
        # (the gossip loop ticks every interval) is a paused or stalled process, which decided nothing.
        self._seen = now
        self.silences = 0
        self.woke_at = -math.inf  # when the latest silence ended
        self._keys: OrderedDict[str, _KeyState] = OrderedDict()  # least recently active first
        self._recent: dict[str, int] = {}  # key -> change seq, ordered by change seq
        self._seq = 0
        self._sent_seq = 0
        self._floor = 0  # lowest change seq acknowledged by every live peer
        self._live: frozenset[str] = frozenset()
        self._last_gen = 0
        self._entries = 0  # sum of len(st.counts) over every key
        self.expired_keys = 0
        self.evicted_keys = 0
        # Peers count as live from the start: a node must not spend a whole burst alone before it
        # has heard from anyone.  Peers that stay silent drop out after ``peer_timeout``.
        for view in self._peers.values():
            view.heard = now
        self.tick(now)

    # ----------------------------------------------------------------- decisions

    def take(self, key: str, cost: int, now: float) -> Decision:
        """Decide whether ``cost`` tokens of ``key`` may be spent now; spend them if so.

        Raises ``NoLimitForKey`` or ``KeyTableFull``.  An allowed spend must later be confirmed
        with :meth:`commit` once it is durable (or returned with :meth:`refund`).
        """
        if now > self._seen:  # ``_note_time``, inlined: this runs on every request
            if now - self._seen > self.peer_timeout:
                self.silences += 1
                self.woke_at = now
            self._seen = now
        st = self._keys.get(key)
        if st is None:
            st = self._create(key, now)
        else:
            self._keys.move_to_end(key)
        limit = st.limit
        if cost > limit.burst:
            raise CostExceedsBurst(limit.burst)
        elapsed = now - st.stamp
        if elapsed > 0:
            level = st.level + elapsed * limit.rate
            st.level = limit.burst if level > limit.burst else level
            st.stamp = now
        st.last_active = now
        if st.level >= cost:
            if self._live:
                unseen = st.undurable + self._unacked(st)
                if unseen and unseen + cost > st.share:
                    return Decision(False, max(0.0, st.level), limit.burst, self.gossip_interval)
            st.level -= cost
            st.undurable += cost
            if st.mark != self.silences:
                st.mark = self.silences
                st.post = 0.0
            st.post += cost
            return Decision(True, max(0.0, st.level), limit.burst, 0.0)
        return Decision(False, max(0.0, st.level), limit.burst, (cost - st.level) / limit.rate)

    def commit(self, key: str, cost: int, generation: int | None = None) -> int:
        """Make ``cost`` granted tokens of ``key`` visible to peers (they are durable now).

        Returns the generation of this node's entry, which the audit trail records.
        """
        st = self._keys[key]
        st.undurable -= cost
        own = st.counts.get(self.node_id)
        if own is None:
            own = (generation if generation is not None else st.own_gen, 0)
            self._entries += 1
        st.counts[self.node_id] = (own[0], own[1] + cost)
        st.synced_with = None
        seq = self._touch(key, st)
        pending = st.pending
        # Within one gossip round, or while no peer is live (nothing trims the list then: take()
        # looks at it only with live peers), the spend joins the newest entry: released when that
        # entry's later seq is acknowledged, never sooner -- and the list stays bounded.
        if pending and (pending[-1][0] > self._sent_seq or not self._live):
            pending[-1][0] = seq
            pending[-1][1] += cost
        elif pending:
            pending.append([seq, cost])
        else:
            st.pending = [[seq, cost]]
        st.pending_amount += cost
        return own[0]

    def commit_many(self, grants: Iterable[tuple[str, int, int]]) -> None:
        """:meth:`commit` for each ``(key, cost, generation)`` of one durable audit batch."""
        commit = self.commit
        for key, cost, generation in grants:
            commit(key, cost, generation)

    def refund_many(self, grants: Iterable[tuple[str, int, int]]) -> None:
        """:meth:`refund` for each ``(key, cost, generation)`` of a batch the audit trail lost."""
        for key, cost, _generation in grants:
            self.refund(key, cost)

    def refund(self, key: str, cost: int) -> None:
        """Give back granted tokens that were never answered (the audit write failed)."""
        st = self._keys.get(key)
        if st is not None:
            st.undurable -= cost
            st.level += cost

    def generation_of(self, key: str, now: float) -> int:
        """The generation this node's entry for ``key`` has or will get at its first commit."""
        st = self._keys[key]
        own = st.counts.get(self.node_id)
        return own[0] if own is not None else st.own_gen

    # ----------------------------------------------------------------- replication

    def delta_for(self, peer: str, max_entries: int = 10_000) -> tuple[int, list[tuple[str, KeyCounters]]]:
        """Keys changed since ``peer`` last acknowledged, oldest first, and the seq they cover.

        Left out (no echo): a key whose state came, exactly as it is, from ``peer`` itself, and a key
        whose only entry is ``peer``'s own -- a node's own entry is never behind anyone's copy of it
        (it grows only there, and a restart recovers it from the audit trail), so it would only
        send a busy node its own spending back from every peer.
        """
        view = self._peers[peer]
        acked = view.acked
        newer: list[str] = []
        for key, seq in reversed(self._recent.items()):
            if seq <= acked:
                break
            newer.append(key)
        newer.reverse()
        if len(newer) > max_entries:
            newer = newer[:max_entries]
            upto = self._recent[newer[-1]]
        else:
            upto = self._seq
        self._sent_seq = max(self._sent_seq, upto)
        keys = self._keys
        return upto, [(key, counts) for key in newer
                      if (st := keys[key]).synced_with != peer
                      and not (len(counts := st.counts) == 1 and peer in counts)]

    def on_ack(self, peer: str, seq: int, now: float) -> None:
        """``peer`` merged everything we sent up to change ``seq``."""
        view = self._peers.get(peer)
        if view is None:
            return
        if seq > view.acked:
            view.acked = min(seq, self._seq)
        view.heard = now
        self._refresh_floor()

    def on_peer_boot(self, peer: str, boot: int, now: float) -> bool:
        """Note ``peer``'s boot id; a new boot means it lost our state, so resend everything."""
        view = self._peers.get(peer)
        if view is None:
            return False
        view.heard = now
        if boot != view.boot:
            restarted = view.boot != 0
            view.boot = boot
            view.acked = 0
            view.synced = False
            self._refresh_floor()
            return restarted
        return False

    def merge(self, peer: str, entries: Iterable[tuple[str, Mapping[str, Entry]]], now: float) -> int:
        """Merge a peer's delta.  Returns the tokens of consumption newly learned."""
        view = self._peers.get(peer)
        baseline = self.cold and view is not None and not view.synced
        self._note_time(now)
        # Just back from our own silence, a peer's deltas hold its spends of that silence (those queued
        # while we were stopped come first, at once): see the level rule below.
        recovering = now - self.woke_at <= self.peer_timeout
        learned = 0
        for key, counters in entries:
            st = self._keys.get(key)
            if st is None:
                try:
                    st = self._create(key, now)
                except (KeyTableFull, NoLimitForKey):
                    continue
            grew = 0
            own_counts = st.counts
            entries_before = len(own_counts)
            for node, entry in counters.items():
                old = own_counts.get(node)
                if old is None or entry > old:
                    if node != self.node_id:
                        grew += consumed_between(old, entry)
                    own_counts[node] = entry
                    changed = True
                else:
                    changed = False
                if changed:
                    self._touch(key, st)
            self._entries += len(own_counts) - entries_before
            # The sender holds exactly what we hold now: do not echo this key back to it.
            st.synced_with = peer if len(own_counts) == len(counters) and all(
                own_counts[n] == e for n, e in counters.items()) else None
            if grew:
                learned += grew
                st.last_active = now
                if baseline:
                    # What the peer spent while we were down or starting is unknown to our level:
                    # count the bucket empty from this moment rather than full of stale refill.
                    self._refill(st, now)
                    st.level = min(st.level, 0.0)
                else:
                    self._refill(st, now)
                    # Debt goes down to max_debt_bursts bursts, and never less deep than what the live
                    # peers may hold unacknowledged (a share each): a floor of one burst below that
                    # forgave every round's in-flight spend, so a key whose burst is small next to
                    # rate x gossip interval was over-admitted with no fault at all (simulation found it).
                    floor = -max(self.max_debt_bursts * st.limit.burst, (self.cluster_size - 1) * st.share)
                    level = st.level - grew
                    if recovering and level < 0.0:
                        # Spends of our own silence: the refill above was capped at the burst although
                        # they came along the whole silence, and we decided nothing meanwhile.  Our peers
                        # enforced the bucket, so it is about empty, less what we granted since we woke
                        # (our peers subtract those too).  Subtracted after the cap, they left a node back
                        # from a 5 s pause a burst below its peers for as long as those spent the whole
                        # rate, and its clients got nothing (0 of 300 requests in 5 s).
                        post = st.post if st.mark == self.silences else 0.0
                        level = max(level, min(st.level + post, 0.0) - post)
                    st.level = floor if level < floor else level
        if view is not None:
            view.synced = True
            view.heard = now
            self._refresh_floor()
        return learned

    def _note_time(self, now: float) -> None:
        if now > self._seen:
            if now - self._seen > self.peer_timeout:
                self.silences += 1
                self.woke_at = now
            self._seen = now

    def tick(self, now: float) -> None:
        """Re-evaluate which peers are live (heard within ``peer_timeout``)."""
        self._note_time(now)
        live = frozenset(p for p, v in self._peers.items() if now - v.heard <= self.peer_timeout)
        if live != self._live:
            self._live = live
        self._refresh_floor()

    def live_peers(self) -> frozenset[str]:
        return self._live

    # ----------------------------------------------------------------- bookkeeping

    def recover(self, key: str, entry: Entry, now: float) -> None:
        """Restore this node's own entry for ``key`` from its audit trail (before serving)."""
        st = self._keys.get(key)
        if st is None:
            try:
                st = self._create(key, now)
            except (KeyTableFull, NoLimitForKey):
                return
        self._last_gen = max(self._last_gen, entry[0])
        old = st.counts.get(self.node_id)
        if old is None or entry > old:
            self._entries += old is None
            st.counts[self.node_id] = entry
            self._touch(key, st)

    def expire(self, now: float, budget: int = 10_000) -> int:
        """Forget up to ``budget`` keys idle for ``idle_ttl`` with nothing in flight."""
        dropped = 0
        for key, st in list(self._iter_oldest(budget)):
            if now - st.last_active < self.idle_ttl:
                break
            if self._removable(st):
                self._drop(key)
                dropped += 1
        self.expired_keys += dropped
        return dropped

    def key_count(self) -> int:
        return len(self._keys)

    def entry_count(self) -> int:
        """G-Counter entries held (keys x nodes seen), kept as a running count: a sum over 100k keys
        every second stalled the node for tens of milliseconds."""
        return self._entries

    def has_key(self, key: str) -> bool:
        return key in self._keys

    def level(self, key: str, now: float) -> float:
        """The level this node sees for ``key`` at ``now`` (refill applied, state unchanged)."""
        st = self._keys[key]
        level = st.level + max(0.0, now - st.stamp) * st.limit.rate
        return min(level, st.limit.burst)

    def counters(self, key: str) -> KeyCounters:
        return dict(self._keys[key].counts)

    def own_count(self, key: str) -> int:
        own = self._keys[key].counts.get(self.node_id)
        return own[1] if own else 0

    def exhausted(self, now: float, window: float = 1.0, sample: int = 1000) -> bool:
        """True when every key active in the last ``window`` seconds has less than one token."""
        seen = 0
        for key in reversed(self._keys):
            st = self._keys[key]
            if now - st.last_active > window or seen >= sample:
                break
            seen += 1
            if self.level(key, now) >= 1:
                return False
        return seen > 0

    def snapshot(self, now: float, keys: Iterable[str] | None = None) -> dict[str, dict]:
        """This node's view per key: the global count it sees and every node's entry."""
        out: dict[str, dict] = {}
        for key in keys if keys is not None else list(self._keys):
            st = self._keys.get(key)
            if st is None:
                continue
            out[key] = {
                "global": sum(c for _g, c in st.counts.values()),
                "nodes": {n: {"gen": g, "count": c} for n, (g, c) in st.counts.items()},
                "level": round(self.level(key, now), 3),
                "rate": st.limit.rate,
                "burst": st.limit.burst,
            }
        return out

    def keys(self) -> list[str]:
        return list(self._keys)

    @property
    def change_seq(self) -> int:
        return self._seq

    # ----------------------------------------------------------------- internals

    def _create(self, key: str, now: float) -> _KeyState:
        limit = self._limit_for(key)
        if limit is None:
            raise NoLimitForKey(key)
        if len(self._keys) >= self.max_keys and not self._evict_one(now):
            raise KeyTableFull(key)
        # A restarted node does not know the level: it starts empty and refills from its start.
        level = limit.burst
        if self.cold:
            level = min(limit.burst, (now - self.started) * limit.rate)
        share = max(limit.burst / self.cluster_size, limit.rate * self.unseen_window)
        st = _KeyState(limit, level, now, self._generation_for_now(now), share)
        self._keys[key] = st
        return st

    @staticmethod
    def _refill(st: _KeyState, now: float) -> None:
        elapsed = now - st.stamp
        if elapsed > 0:
            level = st.level + elapsed * st.limit.rate
            st.level = st.limit.burst if level > st.limit.burst else level
            st.stamp = now

    def _evict_one(self, now: float) -> bool:
        """Make room by dropping the least recently active key whose bucket is full again."""
        for key, st in self._iter_oldest(64):
            refill = st.limit.burst / st.limit.rate if st.limit.rate > 0 else math.inf
            if now - st.last_active >= refill and self._removable(st):
                self._drop(key)
                self.evicted_keys += 1
                return True
        return False

    def _iter_oldest(self, budget: int) -> Iterable[tuple[str, _KeyState]]:
        for i, item in enumerate(self._keys.items()):
            if i >= budget:
                return
            yield item

    def _removable(self, st: _KeyState) -> bool:
        return st.undurable == 0 and self._unacked(st) == 0

    def _drop(self, key: str) -> None:
        self._entries -= len(self._keys.pop(key).counts)
        self._recent.pop(key, None)

    def _touch(self, key: str, st: _KeyState) -> int:
        self._seq += 1
        st.changed = self._seq
        recent = self._recent
        if key in recent:
            del recent[key]
        recent[key] = self._seq
        return self._seq

    def _unacked(self, st: _KeyState) -> int:
        pending = st.pending
        if not pending:
            return 0
        floor = self._floor if self._live else self._seq
        while pending and pending[0][0] <= floor:
            st.pending_amount -= pending.pop(0)[1]
        if not pending:
            st.pending = None
        return st.pending_amount

    def _refresh_floor(self) -> None:
        if self._live:
            self._floor = min(self._peers[p].acked for p in self._live)
        else:
            self._floor = self._seq

    def _generation_for_now(self, now: float) -> int:
        # Generations only need to grow on one node: milliseconds of its clock do, and never less
        # than what it used before for any key (a clock stepping back must not reuse one).
        self._last_gen = max(self._last_gen + 1, int(now * 1000), 1)
        return self._last_gen

    def __repr__(self) -> str:
        return (
            f"<BucketTable node={self.node_id} keys={len(self._keys)} seq={self._seq} "
            f"live={sorted(self._live)}>"
        )
