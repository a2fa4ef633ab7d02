"""``StrictTable``: strict mode's per-node limiter core.  A node admits only against rights it holds.

Shape of ``edge_server.token_bucket.BucketTable`` (take / commit / delta_for / on_ack / merge /
tick, time as an argument, no I/O, no clock reads), plus the lease protocol (``lease_requests`` /
``on_grant``).  ``now`` is the node's own *monotonic* clock in seconds.

**Pots.**  Per key a node holds two pots of rights:

* *pinned* ``P``: minted at ``alpha * R * p_i`` up to ``alpha * B * p_i`` (``p_i``: the node's
  static pinned weight, weights sum to 1), with no lease -- what a minority side keeps;
* *floating* ``F``: minted at ``(1 - alpha) * R * phi(t)`` up to ``(1 - alpha) * B * phi(t)``, where
  ``phi`` is the lease share (``lease.py``); ``F`` is trimmed whenever ``phi`` drops (burned).

Every cap counts, besides the pot, the rights *reserved* by a take not yet committed and the rights
*given but not acknowledged* by their receiver: those still count against the giver, so the rights
outstanding in the cluster (held + reserved + in flight) never exceed ``B``, and minting never
exceeds ``R`` (we mint ``1 / (1 + rho)`` per second of our clock).  Hence every window admits at most
``B + R * (t - s)``.

**Transfers.**  A node short of rights publishes a ``want`` stamped with its own clock; a donor with
surplus answers it by raising ``sent[j] = (total, echo=want stamp)``; the receiver credits what
fits its room only if the echo is at most ``transfer_window`` old on *its own* clock, and burns the
rest.  A giver stops counting an unacknowledged transfer after ``safe(transfer_window)``: by then
it can no longer be credited anywhere.  Floating rights are given only if they stay inside the
giver's floating cap for that whole time.

**Restart.**  A table always starts empty and mints nothing for ``safe(transfer_window)`` (the
"ghost" time in which a transfer of a previous incarnation might still land), whether or not its
data survived; a new incarnation is a new actor, so old rights are never spent again.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from edge_server.strict.lease import Grant, LeaseRequest, NodeLease
from edge_server.strict.rights import ActorRights, KeyRights, actor_id, leq, merge_actor, split_actor
from edge_server.strict.settings import StrictSettings
from edge_server.token_bucket import CostExceedsBurst, KeyTableFull, Limit, NoLimitForKey

__all__ = ["CostExceedsNodeCap", "StrictDecision", "StrictTable", "Ticket", "UnknownTransfer"]

DEMAND_TAU_S = 0.5  # demand reported to the voters: an exponential average over about this long
COLD_EVERY = 8  # every key is visited by tick at least every this many rounds (1/8 of them each round)
FAST_TAU_S = 0.05  # demand behind wants and surplus: must follow a shift within a few rounds
LOW_WATER_WINDOWS = 4  # a take marks its key for the next tick once it holds less than this many
#                        transfer windows of its recent demand (a want needs less than 2)
TOTALS_EVERY_S = 0.5  # the gauges' sums over every key are recomputed at most this often
ACTOR_CACHE_MAX = 4096  # parsed actor ids kept (nodes x incarnations seen; cleared past this)
RESEND_ROUNDS = 5  # a delta not acknowledged after this many rounds is sent again (doubling up to ...)
RESEND_MAX_ROUNDS = 50  # ... this many, while the peer stays silent)
PENDING_MAX = 64  # deltas per peer awaiting their ack; an older one's ack is ignored (resent anyway)


class UnknownTransfer(LookupError):
    """A transfer or state entry names a key with no limit or a node outside the cluster."""


class CostExceedsNodeCap(CostExceedsBurst):
    """A request costs more rights than this node can ever hold of the key (its pinned cap plus the
    whole floating cap, ``(alpha * p_i + 1 - alpha) * B``): in strict mode it could never be allowed,
    so it is refused up front, like a cost over the burst in eventual mode."""

    def __init__(self, cap: float, burst: float) -> None:
        ValueError.__init__(self, f"cost exceeds {cap:g}, the most rights of this key one node can hold "
                                  f"in strict mode (of the burst {burst:g})")
        self.burst, self.cap = burst, cap


class Ticket(NamedTuple):
    """What one allowed take reserved; give it back to :meth:`StrictTable.commit`.  (A tuple: a
    frozen dataclass cost more than the whole decision.)"""

    key: str
    cost: int
    from_pinned: float
    from_floating: float
    at: float
    phi: float


class StrictDecision(NamedTuple):
    allowed: bool
    remaining: float
    limit: float
    retry_after_s: float
    ticket: Ticket | None


class _Unacked:
    __slots__ = ("floating", "pinned", "receiver", "total", "until")

    def __init__(self, receiver: str, total: float, pinned: float, floating: float, until: float) -> None:
        self.receiver, self.total, self.pinned, self.floating, self.until = receiver, total, pinned, floating, until


class _Key:
    __slots__ = (
        "accepted",
        "burned",
        "changed",
        "coef",
        "credited",
        "demand",
        "f",
        "fast",
        "hot",
        "key",
        "limit",
        "minted",
        "most",
        "own_c",
        "p",
        "requested",
        "res_f",
        "res_p",
        "sent",
        "spent",
        "stamp",
        "ticked",
        "uf",
        "unacked",
        "up",
        "view",
        "visited",
        "vseq",
        "want",
    )

    def __init__(self, key: str, limit: Limit, now: float) -> None:
        self.key = key
        self.limit = limit
        self.most = limit.burst  # the largest cost this node could ever admit (set by the table)
        self.coef = (0.0, 0.0, 0.0, 0.0)  # the caps' factors (set by the table; see ``StrictTable._caps``)
        self.view: KeyRights = {}  # other actors' entries, as merged
        self.vseq: dict[str, int] = {}  # actor -> our seq after which its entry last changed here
        self.own_c: ActorRights | None = None  # our entry as last published (cleared by a change)
        self.minted = self.spent = self.burned = self.credited = 0.0
        self.sent: dict[str, tuple[float, float]] = {}
        self.accepted: dict[str, float] = {}
        self.want = (0.0, 0.0)
        self.p = 0.0  # pinned pot
        self.f = 0.0  # floating pot
        self.res_p = self.res_f = 0.0
        self.unacked: list[_Unacked] = []
        self.up = self.uf = 0.0  # sums of unacked pinned / floating, kept with the list
        self.stamp = now
        self.requested = 0.0
        self.demand = 0.0  # tokens per second asked for (allowed or not), averaged
        self.fast = 0.0  # the same over a much shorter time
        self.changed = 0
        self.ticked = now  # the last tick that visited this key
        self.visited = -1  # the round of that tick
        self.hot = False  # in the table's list of keys for the next tick

    def own(self) -> ActorRights:
        return ActorRights(self.minted, self.spent, self.burned, self.credited, dict(self.sent),
                           dict(self.accepted), self.want)


class _Peer:
    """What one peer has of our state.  ``acked``: every change up to it has reached the peer.
    A delta covers the changes in ``(base, upto]``; its ack advances ``acked`` only if ``base``
    is already acknowledged, so a lost delta is never skipped over by a later one's ack."""

    __slots__ = ("acked", "actor", "backoff", "got", "pending", "resent", "sent")

    def __init__(self) -> None:
        self.actor = ""
        self.reset()

    def reset(self) -> None:
        self.acked = 0
        self.sent = 0  # the upto of the last delta built
        self.resent = -RESEND_MAX_ROUNDS  # the round of the last delta built from ``acked``
        self.backoff = RESEND_ROUNDS
        self.pending: dict[int, int] = {}  # upto -> base, of deltas not yet acknowledged
        self.got: set[int] = set()  # uptos acknowledged while an earlier delta was still missing

    def on_ack(self, upto: int) -> None:
        if upto not in self.pending:
            return  # acknowledged already, or so old it was forgotten (or not ours)
        self.got.add(upto)
        advanced = True
        while advanced:
            advanced = False
            for u in [u for u in self.got if self.pending.get(u, self.acked + 1) <= self.acked]:
                self.got.discard(u)
                if u > self.acked:
                    self.acked = u
                    self.backoff = RESEND_ROUNDS
                    advanced = True
        for u in [u for u in self.pending if u <= self.acked]:
            del self.pending[u]
        self.got = {u for u in self.got if u > self.acked}


class StrictTable:
    """All keys of one node incarnation in strict mode.  Not thread-safe; one event loop owns it."""

    def __init__(self, node_id: str, incarnation: int, nodes: Iterable[str], voters: Iterable[str],
                 limit_for: Callable[[str], Limit | None], settings: StrictSettings, *, now: float,
                 pinned_weights: Mapping[str, float] | None = None, max_keys: int = 100_000) -> None:
        self.nodes = tuple(dict.fromkeys(nodes))
        if node_id not in self.nodes:
            raise ValueError(f"node {node_id!r} is not one of the cluster's nodes {list(self.nodes)}")
        weights = dict(pinned_weights) if pinned_weights is not None else {n: 1 / len(self.nodes) for n in self.nodes}
        if set(weights) != set(self.nodes) or any(not (w >= 0) for w in weights.values()) \
                or abs(sum(weights.values()) - 1.0) > 1e-9:
            raise ValueError("key 'strict.weights': expected a weight >= 0 for every node, summing to 1, "
                             f"got {weights!r}")
        self.node_id = node_id
        self.incarnation = incarnation
        self.actor = actor_id(node_id, incarnation)
        self.settings = settings
        self.weight = weights[node_id]
        self._limit_for = limit_for
        self.max_keys = max_keys
        self.lease = NodeLease(node_id, incarnation, tuple(voters), settings)
        self.started = now
        self.ghost_until = now + settings.ghost_s
        self._keys: dict[str, _Key] = {}
        self._recent: dict[str, int] = {}  # key -> seq of its last change, oldest change first
        self._hot: list[_Key] = []  # keys the next tick must visit (short of rights, or wanted)
        self._slots: list[list[_Key]] = [[] for _ in range(COLD_EVERY)]  # every key in one; one a round
        self._gifting: dict[str, _Key] = {}  # keys with gifts not yet acknowledged
        self._peers: dict[str, _Peer] = {n: _Peer() for n in self.nodes if n != node_id}
        self._current: dict[str, int] = {}  # node -> highest incarnation seen
        self._actors: dict[str, tuple[str, int]] = {}  # actor id -> (node, incarnation), parsed once
        self._seq = 0
        self._last_tick = now
        self._rounds = 0
        self._low = LOW_WATER_WINDOWS * settings.transfer_window_s
        self._totals: tuple[float, float, float, float] | None = None  # (at, held, sent, credited)
        self._steps_of: list[float] | None = None  # the lease's cut list that ``_steps_cache`` was made from
        self._steps_cache: tuple[list[float], list[float]] = ([], [])
        self.refused: dict[str, int] = {}
        self.revoked = 0  # takes undone by the re-check after the spend
        self.revoked_after_write = 0  # committed takes refused by the re-check after the audit write

    # ------------------------------------------------------------------ caps

    def _caps(self, st: _Key, phi: float) -> tuple[float, float, float, float]:
        """(pinned rate, pinned cap, floating rate, floating cap) of one key for share ``phi``."""
        pr, pc, fr, fc = st.coef  # computed once per key: this runs on every take
        return pr, pc, fr * phi, fc * phi

    def _coef(self, limit: Limit) -> tuple[float, float, float, float]:
        """The factors of :meth:`_caps`: the pinned rate and cap, the floating ones at ``phi = 1``."""
        a, scale = self.settings.alpha, self.settings.mint_scale
        return (a * limit.rate * self.weight * scale, a * limit.burst * self.weight,
                (1 - a) * limit.rate * scale, (1 - a) * limit.burst)

    @staticmethod
    def _unacked(st: _Key) -> tuple[float, float]:
        return st.up, st.uf

    def _set_unacked(self, st: _Key, unacked: list[_Unacked]) -> None:
        """Replace a key's unacknowledged gifts; their sums are kept beside the list (the caps read
        them on every take)."""
        st.unacked = unacked
        st.up = sum(u.pinned for u in unacked)
        st.uf = sum(u.floating for u in unacked)
        if unacked:
            self._gifting[st.key] = st
        else:
            self._gifting.pop(st.key, None)

    def _settle(self, st: _Key, now: float) -> None:
        """Mint since ``stamp`` and trim the floating pot to every share the lease had meanwhile."""
        stamp = st.stamp
        if now <= stamp:
            return
        up, uf = st.up, st.uf  # as at ``stamp``: only shrinks until ``now``, so conservative
        a = stamp if stamp > self.ghost_until else self.ghost_until
        cuts, phis = self._steps()
        i = bisect_right(cuts, a)
        if a < now and (i == len(cuts) or cuts[i] > now):
            # The common case: the share did not change since ``a`` (one piece of ``segments``, and
            # the final trim at ``phi(now)`` is the same trim), with no list built per take.
            pr, pc, fr, fc = self._caps(st, phis[i - 1] if i else 0.0)
            self._trim(st, fc - uf - st.res_f)
            mint = min(fr * (now - a), max(0.0, fc - st.f - uf - st.res_f))
            if mint > 0:
                st.f += mint
                st.minted += mint
            mint = min(pr * (now - a), max(0.0, pc - st.p - up - st.res_p))
            if mint > 0:
                st.p += mint
                st.minted += mint
        else:
            self._settle_pieces(st, a, now, up, uf)
        st.stamp = now
        unacked = st.unacked
        if unacked and min(u.until for u in unacked) <= now:
            self._set_unacked(st, [u for u in unacked if u.until > now])

    def _settle_pieces(self, st: _Key, a: float, now: float, up: float, uf: float) -> None:
        """:meth:`_settle` across changes of the share: piece by piece (those of
        ``NodeLease.segments``, walked in place), then trimmed to ``phi(now)``."""
        if a < now:
            cuts, phis = self._steps()
            n = len(cuts)
            i = bisect_right(cuts, a)
            t, phi = a, (phis[i - 1] if i else 0.0)
            while True:
                end = cuts[i] if i < n and cuts[i] < now else now
                _pr, _pc, fr, fc = self._caps(st, phi)
                self._trim(st, fc - uf - st.res_f)
                mint = min(fr * (end - t), max(0.0, fc - st.f - uf - st.res_f))
                if mint > 0:
                    st.f += mint
                    st.minted += mint
                if end >= now:
                    break
                t, phi = end, phis[i]
                i += 1
            pr, pc, _fr, _fc = self._caps(st, 0.0)
            mint = min(pr * (now - a), max(0.0, pc - st.p - up - st.res_p))
            if mint > 0:
                st.p += mint
                st.minted += mint
        self._trim(st, self._caps(st, self.lease.phi(now))[3] - uf - st.res_f)

    @staticmethod
    def _trim(st: _Key, limit: float) -> None:
        """Burn the floating rights above ``limit``.  Not published by itself: only this actor ever
        spends its rights, so peers learn of the burn with the key's next change (a drop of ``phi``
        trims every key at once, and would otherwise put every key in the next delta to every peer)."""
        limit = max(0.0, limit)
        if st.f > limit:
            st.burned += st.f - limit
            st.f = limit

    # ------------------------------------------------------------------ decisions

    def take(self, key: str, cost: int, now: float) -> StrictDecision:
        """Reserve ``cost`` rights of ``key`` if this node holds them.  No network, no waiting.

        An allowed decision carries a :class:`Ticket`; :meth:`commit` it right before answering.
        Raises ``NoLimitForKey``, ``KeyTableFull`` or ``CostExceedsBurst``.
        """
        st = self._keys.get(key)
        if st is None:
            st = self._get(key, now)
        if cost > st.most:
            if cost > st.limit.burst:
                raise CostExceedsBurst(st.limit.burst)
            raise CostExceedsNodeCap(st.most, st.limit.burst)
        if cost <= 0:
            raise ValueError("cost must be > 0")
        self._settle(st, now)
        st.requested += cost
        phi = self.lease.phi(now)
        if st.f + st.p >= cost:
            from_f = min(st.f, float(cost))
            from_p = cost - from_f
            st.f -= from_f
            st.p -= from_p
            st.res_f += from_f
            st.res_p += from_p
            # A key with rights to spare needs no tick of its own (its demand is measured on its
            # slot's round); one running low is visited next round, to want more in time.
            if not st.hot and st.f + st.p < st.fast * self._low + cost:
                self._mark(st)
            ticket = Ticket(key, cost, from_p, from_f, now, phi)
            return StrictDecision(True, st.f + st.p, st.limit.burst, 0.0, ticket)
        if not st.hot:
            self._mark(st)
        pr, _pc, fr, _fc = self._caps(st, phi)
        short = cost - st.f - st.p
        retry = min(max(short / (pr + fr), self.settings.gossip_s) if pr + fr > 0 else 1.0, 60.0)
        return StrictDecision(False, st.f + st.p, st.limit.burst, retry, None)

    def commit(self, ticket: Ticket, now: float) -> bool:
        """Turn a reservation into an admission -- unless the lease shrank since the take (a pause
        between take and answer): then the floating part is burned, the pinned part returned, and
        the request must be refused.  Returns whether the request is admitted."""
        st = self._keys[ticket.key]
        st.res_f -= ticket.from_floating
        st.res_p -= ticket.from_pinned
        if ticket.from_floating > 0 and self._share_dropped(ticket.at, now, ticket.phi):
            st.burned += ticket.from_floating
            st.p += ticket.from_pinned
            self.revoked += 1
            self._touch(st)
            return False
        st.spent += ticket.cost
        self._touch(st)
        return True

    def confirm(self, ticket: Ticket, now: float) -> bool:
        """Whether a committed take may still leave as allowed, right before its answer is written.

        The node commits a spend before it awaits the audit write; a process pause during that write
        could otherwise let the answer leave after the lease behind its floating rights ended, when
        the majority may already have handed that share to others.  So the same test as
        :meth:`commit` runs again from the take's time to ``now``: if the share fell, the request
        must be refused (counted in ``revoked_after_write``).  Its rights stay spent -- they are in
        the audit trail and in our entry already; refusing what was paid for costs, never
        over-admits.  A take of pinned rights only needs no lease and always stands."""
        if ticket.from_floating > 0 and self._share_dropped(ticket.at, now, ticket.phi):
            self.revoked_after_write += 1
            return False
        return True

    def _steps(self) -> tuple[list[float], list[float]]:
        """The lease's step function ``phi`` with the cuts where it does not change left out.

        Every grant's start and end is a cut, but most renewals leave ``phi`` as it was: settling a
        key walks only the real changes.  Rebuilt when the lease replaces its lists (a grant came
        in, or old ones were pruned)."""
        cuts, phis = self.lease.steps()
        if cuts is not self._steps_of:
            out_c: list[float] = []
            out_p: list[float] = []
            prev = 0.0  # phi before the first cut
            for c, p in zip(cuts, phis, strict=True):
                if p != prev:
                    out_c.append(c)
                    out_p.append(p)
                    prev = p
            self._steps_of, self._steps_cache = cuts, (out_c, out_p)
        return self._steps_cache

    def _share_dropped(self, at: float, now: float, phi: float) -> bool:
        """Whether ``phi`` fell below ``phi`` at any time in ``[at, now]`` (the re-check after a spend)."""
        cuts, phis = self._steps()
        i = bisect_right(cuts, at)
        if i == len(cuts) or cuts[i] > now:  # no change of the share since the take: the common case
            return (phis[i - 1] if i else 0.0) < phi
        return self.lease.min_phi(at, now) < phi

    def refund(self, ticket: Ticket) -> None:
        """A reservation that will not be answered (the audit write failed): pinned rights go back,
        floating ones are burned (the lease may have shrunk meanwhile)."""
        st = self._keys[ticket.key]
        st.res_f -= ticket.from_floating
        st.res_p -= ticket.from_pinned
        st.burned += ticket.from_floating
        st.p += ticket.from_pinned
        self._touch(st)

    # ------------------------------------------------------------------ lease

    def lease_requests(self, now: float) -> list[LeaseRequest]:
        """Renewal requests for every voter when one is due, else nothing."""
        if not self.lease.due(now):
            return []
        demand = sum(st.demand / st.limit.rate for st in self._keys.values() if st.limit.rate > 0)
        return self.lease.requests(now, demand)

    def on_grant(self, grant: Grant, now: float) -> str:
        """A voter's answer; '' if taken, else the reason it was refused (counted).

        No key is settled here: a grant counts from its arrival on, so the share before ``now`` --
        all a later settle reads for the time up to ``now`` -- is what it was."""
        reason = self.lease.on_grant(grant, now)
        if reason:
            self._count("grant_" + reason)
        return reason

    def phi(self, now: float) -> float:
        return self.lease.phi(now)

    # ------------------------------------------------------------------ replication

    def tick(self, now: float) -> None:
        """Once per gossip round: mint, measure demand, publish wants, and push surplus to wants."""
        self._last_tick = now
        self._rounds += 1
        rnd = self._rounds
        # History older than every key's last settle is never read again (every key is visited at
        # least every COLD_EVERY rounds); a key settled later than that sees phi = 0 there: less.
        self.lease.prune(now, max(self.settings.lease_s, (COLD_EVERY + 1) * self.settings.gossip_s))
        horizon = self.settings.transfer_window_s
        # Every round: the keys running low or newly wanted by a peer, and those with gifts in
        # flight; besides, one slot of COLD_EVERY, so every key is visited every COLD_EVERY rounds
        # (demand decay, minting, wants of quiet keys) without a round that visits them all at once.
        # A key not visited neither wants nor gives: liveness only -- its pots settle on every take.
        hot, self._hot = self._hot, []
        for group in (hot, self._slots[rnd % COLD_EVERY], list(self._gifting.values())):
            for st in group:
                if st.visited == rnd:
                    continue
                st.visited = rnd
                self._visit(st, now, horizon)

    def _visit(self, st: _Key, now: float, horizon: float) -> None:
        """One key in one tick: settle, measure demand, want, give."""
        st.hot = False
        dt = now - st.ticked
        st.ticked = now
        self._settle(st, now)
        if dt > 0:
            seen = st.requested / dt
            st.demand += (1 - math.exp(-dt / DEMAND_TAU_S)) * (seen - st.demand)
            st.fast += (1 - math.exp(-dt / FAST_TAU_S)) * (seen - st.fast)
            st.requested = 0.0
        self._want_and_give(st, now, horizon)

    def _want_and_give(self, st: _Key, now: float, horizon: float) -> None:
        phi = self.lease.phi(now)
        pr, pc, fr, fc = self._caps(st, phi)
        need = st.fast * horizon * 2
        have = st.p + st.f + (pr + fr) * horizon
        up, uf = st.up, st.uf
        if now >= self.ghost_until and need > have:
            room = max(0.0, pc - st.p - up - st.res_p) + max(0.0, fc - st.f - uf - st.res_f)
            amount = min(need - have, room)
            last_at, last_amount = st.want
            # A want is republished only when it is half a transfer window old or has grown by half:
            # a key starving for many rounds must not ride in every delta to every peer (a node with
            # thousands of such keys spent its cores on rounds).  A donor answers each stamp once.
            if amount > 0 and (now - last_at >= self.settings.transfer_window_s / 2 or amount > 1.5 * last_amount):
                st.want = (now, amount)
                self._touch(st)
        surplus = st.p + st.f - st.fast * horizon
        if surplus <= 1e-9:
            return
        wants = []
        for actor, r in st.view.items():
            if r.want[1] <= 0:
                continue
            node, inc = self._split(actor)
            if node == self.node_id or inc != self._current.get(node):
                continue
            if r.want[0] > st.sent.get(actor, (0.0, -math.inf))[1]:
                wants.append((actor, r.want))
        total_wanted = sum(w[1] for _a, w in wants)
        if not wants:
            return
        safe_fc = self._caps(st, self.lease.min_phi(now, now + self.settings.ghost_s))[3]
        f_room = max(0.0, safe_fc - uf - st.res_f)
        for actor, (stamp, amount) in wants:
            give = min(amount, surplus * amount / total_wanted)
            from_f = min(st.f, give, f_room)
            from_p = min(st.p, give - from_f)
            if from_f + from_p <= 1e-9:
                continue
            st.f -= from_f
            st.p -= from_p
            f_room -= from_f
            total = st.sent.get(actor, (0.0, 0.0))[0] + from_f + from_p
            st.sent[actor] = (total, stamp)
            self._set_unacked(st, [*st.unacked, _Unacked(actor, total, from_p, from_f, now + self.settings.ghost_s)])
            self._touch(st)

    def delta_for(self, peer: str) -> tuple[int, list[tuple[str, KeyRights]]]:
        """Keys changed since ``peer`` last acknowledged, oldest change first, each with our own entry
        and the other actors' entries that changed here since then (relayed: a transfer can cross a
        partial partition).  Never ``peer``'s own entry: nobody but ``peer`` raises it.

        Walks only the changed keys (newest first), so a round costs what changed, not what the
        table holds.  What an earlier delta still in flight carries is not sent again, unless that
        delta went unacknowledged for ``RESEND_ROUNDS`` rounds (doubling while the peer stays
        silent): a slow peer is not buried under the same keys every round.
        """
        view = self._peers[peer]
        acked, skip, me = view.acked, view.actor, self.actor
        if view.sent <= acked or self._rounds - view.resent >= view.backoff:
            if view.sent > acked:  # a resend: the peer is slow or a delta was lost
                view.backoff = min(2 * view.backoff, RESEND_MAX_ROUNDS)
            base = acked
            view.resent = self._rounds
        else:
            base = view.sent
        keys = self._keys
        out = []
        for key, seq in reversed(self._recent.items()):
            if seq <= base:
                break
            st = keys[key]
            own = st.own_c
            if own is None:
                own = st.own_c = st.own()
            rights = {me: own}
            if st.view:
                vseq = st.vseq
                for actor, r in st.view.items():
                    if vseq[actor] > acked and actor != skip:
                        rights[actor] = r
            out.append((key, rights))
        out.reverse()
        upto = self._seq
        view.sent = upto
        pending = view.pending
        pending[upto] = min(base, pending.get(upto, base))
        if len(pending) > PENDING_MAX:
            del pending[next(iter(pending))]
        return upto, out

    def on_ack(self, peer_actor: str, upto: int, now: float) -> None:
        """``peer_actor`` merged our state up to change ``upto``.  A new incarnation starts from 0."""
        try:
            node, _inc = split_actor(peer_actor)
        except ValueError:
            self._count("ack_bad_actor")
            return
        view = self._peers.get(node)
        if view is None:
            self._count("ack_unknown_node")
            return
        switched = self._switch(view, peer_actor)
        if switched is None or switched:
            return  # a late ack of a dead incarnation, or the first of a new one (it starts from 0)
        view.on_ack(upto)

    def merge(self, sender: str, entries: Iterable[tuple[str, Mapping[str, ActorRights]]], now: float) -> int:
        """Merge a peer's state; credit transfers to us; drop our acknowledged transfers.

        Returns the number of entries refused (each counted in ``refused`` by reason): a key with
        no limit, a node outside the cluster, our own entry grown by someone else (forged) -- those
        are never merged -- and a transfer answering a want we never made, which is never credited.
        """
        refused = 0
        try:
            snode, _sinc = split_actor(sender)
        except ValueError:
            self._count("bad_actor")
            return 1
        if snode not in self._peers:
            self._count("unknown_node")
            return 1
        self._switch(self._peers[snode], sender)
        changed_at = self._seq + 1  # an entry merged now rides in deltas built after our next change
        for key, actors in entries:
            st = self._keys.get(key)
            if st is None:
                if self._limit_for(key) is None:
                    self._count("unknown_key")
                    refused += 1
                    continue
                try:
                    st = self._get(key, now)
                except KeyTableFull:
                    self._count("table_full")
                    refused += 1
                    continue
            self._settle(st, now)
            wanted = False
            for actor, rights in actors.items():
                reason = self._check_actor(st, actor, rights)
                if reason:
                    self._count(reason)
                    refused += 1
                    continue
                if actor == self.actor:
                    continue
                old = st.view.get(actor)
                if old is None:
                    st.view[actor] = rights
                    wanted = wanted or rights.want[1] > 0
                elif leq(rights, old):
                    continue  # nothing new (a duplicate, or older than what we hold)
                else:
                    st.view[actor] = merge_actor(old, rights)
                    wanted = wanted or rights.want[0] > old.want[0]
                st.vseq[actor] = changed_at
                node, inc = self._split(actor)
                if inc > self._current.get(node, -1):
                    self._current[node] = inc
                    wanted = True  # wants of a newer incarnation count from now on
            if wanted and not st.hot:
                self._mark(st)  # a peer wants rights: the next tick may give
            refused += self._receive(st, now)
            self._acknowledged(st)
        return refused

    @staticmethod
    def _switch(view: _Peer, actor: str) -> bool | None:
        """Track a peer's newest incarnation: True if ``actor`` is a new one (resend everything),
        False if it is the current one, None if it is older (a late message of a dead process)."""
        if view.actor == actor:
            return False
        if view.actor and split_actor(actor)[1] < split_actor(view.actor)[1]:
            return None
        view.actor = actor
        view.reset()
        return True

    def _split(self, actor: str) -> tuple[str, int]:
        """:func:`split_actor`, parsed once per actor id (a merge checks every id it carries)."""
        got = self._actors.get(actor)
        if got is None:
            got = split_actor(actor)
            if len(self._actors) >= ACTOR_CACHE_MAX:
                self._actors.clear()
            self._actors[actor] = got
        return got

    def _check_actor(self, st: _Key, actor: str, rights: ActorRights) -> str:
        nodes = self.nodes
        try:
            node, inc = self._split(actor)
            if node not in nodes:
                return "unknown_node"
            for receiver in (*rights.sent, *rights.accepted):
                if self._split(receiver)[0] not in nodes:
                    return "unknown_node"
        except ValueError:
            return "bad_actor"
        if actor == self.actor and not leq(rights, st.own()):
            return "forged_own"
        if node == self.node_id and inc > self.incarnation:
            return "newer_incarnation_of_self"
        return ""

    def _receive(self, st: _Key, now: float) -> int:
        """Credit transfers to us that answer a fresh want; burn the rest."""
        refused = 0
        phi = self.lease.phi(now)
        _pr, pc, _fr, fc = self._caps(st, phi)
        for giver, r in st.view.items():
            got = r.sent.get(self.actor)
            if got is None:
                continue
            total, echo = got
            done = st.accepted.get(giver, 0.0)
            if total <= done:
                continue
            amount = total - done
            if echo > st.want[0]:
                self._count("forged_transfer")
                refused += 1
                kept = 0.0
            elif now - echo > self.settings.transfer_window_s:
                self._count("stale_transfer")
                kept = 0.0
            else:
                up, uf = self._unacked(st)
                room_f = max(0.0, fc - st.f - uf - st.res_f) if phi > 0 else 0.0
                to_f = min(amount, room_f)
                to_p = min(amount - to_f, max(0.0, pc - st.p - up - st.res_p))
                st.f += to_f
                st.p += to_p
                kept = to_f + to_p
                if kept < amount:
                    self._count("transfer_overflow")
            st.credited += kept
            st.accepted[giver] = total
            self._touch(st)
        return refused

    def _acknowledged(self, st: _Key) -> None:
        """Stop counting the gifts their receivers have processed (our own entry does not change)."""
        if not st.unacked:
            return
        keep = []
        for u in st.unacked:
            r = st.view.get(u.receiver)
            if r is None or r.accepted.get(self.actor, 0.0) < u.total:
                keep.append(u)
        if len(keep) != len(st.unacked):
            self._set_unacked(st, keep)

    # ------------------------------------------------------------------ restart

    def burn_predecessor(self, key: str, predecessor: str, rights: ActorRights, now: float) -> None:
        """With the data directory intact, mark an old incarnation's unspent rights as burned, so
        every view shows them gone (with it lost, nobody can spend them anyway)."""
        node, inc = split_actor(predecessor)
        if node != self.node_id or inc >= self.incarnation:
            raise ValueError(f"{predecessor!r} is not an earlier incarnation of {self.node_id!r}")
        st = self._get(key, now)
        burned = ActorRights(rights.minted, rights.spent, rights.burned + max(0.0, rights.held),
                             rights.credited, rights.sent, rights.accepted, rights.want)
        old = st.view.get(predecessor)
        st.view[predecessor] = burned if old is None else merge_actor(old, burned)
        st.vseq[predecessor] = self._seq + 1
        self._touch(st)

    # ------------------------------------------------------------------ views

    def held(self, key: str, now: float) -> float:
        """Rights of ``key`` this node could spend now (a key seen first here starts its pots)."""
        try:
            st = self._get(key, now)
        except (NoLimitForKey, KeyTableFull):
            return 0.0
        self._settle(st, now)
        return st.p + st.f

    def rights(self, key: str) -> KeyRights:
        """Every actor's entry for ``key`` as this node sees it (its own exact)."""
        st = self._keys[key]
        out = dict(st.view)
        out[self.actor] = st.own()
        return out

    def outstanding(self, key: str, now: float) -> float:
        """Rights this node still accounts for: pots, reservations and unacknowledged gifts."""
        st = self._keys.get(key)
        if st is None:
            return 0.0
        self._settle(st, now)
        return st.p + st.f + st.res_p + st.res_f + st.up + st.uf

    def unacked_total(self, key: str) -> float:
        st = self._keys.get(key)
        return st.up + st.uf if st is not None else 0.0

    def totals(self, now: float) -> tuple[float, float, float]:
        """``(held, sent, credited)`` summed over every key, for the gauges: the pots as last settled
        (no settle, no copy), recomputed at most every ``TOTALS_EVERY_S`` -- a sum over every key on
        every round cost more than the round's real work."""
        cached = self._totals
        if cached is not None and 0.0 <= now - cached[0] < TOTALS_EVERY_S:
            return cached[1], cached[2], cached[3]
        held = sent = credited = 0.0
        for st in self._keys.values():
            held += st.p + st.f
            credited += st.credited
            if st.sent:
                sent += sum(total for total, _echo in st.sent.values())
        self._totals = (now, held, sent, credited)
        return held, sent, credited

    def state(self, now: float) -> dict:
        """For ``/v1/state``: rights held per key, the lease and the incarnation."""
        return {
            "actor": self.actor, "incarnation": self.incarnation, "phi": self.lease.phi(now),
            "lease_valid": self.lease.valid(now), "ghost": now < self.ghost_until,
            "keys": {k: {"pinned": round(st.p, 3), "floating": round(st.f, 3),
                         "demand": round(st.demand, 3)} for k, st in self._keys.items()},
            "refused": dict(self.refused), "revoked": self.revoked,
            "revoked_after_write": self.revoked_after_write,
        }

    def keys(self) -> list[str]:
        return list(self._keys)

    # ------------------------------------------------------------------ internals

    def _get(self, key: str, now: float) -> _Key:
        st = self._keys.get(key)
        if st is None:
            limit = self._limit_for(key)
            if limit is None:
                raise NoLimitForKey(key)
            if len(self._keys) >= self.max_keys:
                raise KeyTableFull(key)
            # Minted lazily from the table's start, as if the key had existed all along: the same
            # rights a long-lived key would hold.  (Safe only because keys are never forgotten; an
            # expiring key table would have to keep a floor per forgotten key.)
            st = self._keys[key] = _Key(key, limit, self.started)
            st.coef = self._coef(limit)
            _pr, pc, _fr, fc = self._caps(st, 1.0)
            st.most = pc + fc + 1e-9  # float rounding of the caps only
            self._slots[len(self._keys) % COLD_EVERY].append(st)
            self._touch(st)
        return st

    def _touch(self, st: _Key) -> None:
        """Our entry of ``st`` changed: it goes into the next delta to every peer."""
        self._seq += 1
        st.changed = self._seq
        st.own_c = None
        recent = self._recent
        recent.pop(st.key, None)
        recent[st.key] = self._seq

    def _mark(self, st: _Key) -> None:
        """Visit ``st`` in the next tick."""
        st.hot = True
        self._hot.append(st)

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def __repr__(self) -> str:
        return f"<StrictTable {self.actor} keys={len(self._keys)} seq={self._seq}>"
