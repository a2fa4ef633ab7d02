"""``StrictTable``: strict mode's per-node limiter core.  A node admits only against rights it holds.

Shape of ``edge_server.token_bucket.BucketTable`` (take / commit / delta_for / on_ack / merge /
tick, time as an argument, no I/O, no clock reads), plus the lease protocol (``lease_requests`` /
``on_grant``).  ``now`` is the node's own *monotonic* clock in seconds.

This module holds the requests (take / commit / confirm / refund), the lease calls, the restart
and the views; the table's other jobs live in its base classes, one module each: minting and
trimming the pots (``pots.py``), the round over the keys with its wants and gifts
(``transfers.py``) and replication (``deltas.py``).  The per-key state is ``keystate.py``.

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

from collections import deque
from collections.abc import Callable, Iterable, Mapping

from edge_server.strict.deltas import Deltas, PeerView
from edge_server.strict.keystate import CostExceedsNodeCap, KeyState, StrictDecision, Ticket, UnknownTransfer
from edge_server.strict.lease import Grant, LeaseRequest, NodeLease
from edge_server.strict.pots import Pots
from edge_server.strict.rights import ActorRights, KeyRights, actor_id, merge_actor, split_actor
from edge_server.strict.settings import StrictSettings
from edge_server.strict.transfers import Transfers, cold_slots
from edge_server.token_bucket import CostExceedsBurst, KeyTableFull, Limit, NoLimitForKey

__all__ = ["CostExceedsNodeCap", "StrictDecision", "StrictTable", "Ticket", "UnknownTransfer"]

LOW_WATER_WINDOWS = 4  # a take marks its key for the next tick once it holds less than this many
TOTALS_EVERY_S = 0.5  # the gauges' sums over every key are recomputed at most this often


class StrictTable(Pots, Transfers, Deltas):
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
        self._keys: dict[str, KeyState] = {}
        self._recent: dict[str, int] = {}  # key -> seq of its last change, oldest change first
        self._spent: deque[tuple[float, KeyState]] = deque()  # (first unpublished spend, key), oldest first
        self._hot: list[KeyState] = []  # keys the next tick must visit (short of rights, or wanted)
        # every key in one slot; one slot visited a round
        self._slots: list[list[KeyState]] = [[] for _ in range(cold_slots(settings.gossip_s))]
        self._gifting: dict[str, KeyState] = {}  # keys with gifts not yet acknowledged
        self._peers: dict[str, PeerView] = {n: PeerView() for n in self.nodes if n != node_id}
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
        pr, _pc, fr, _fc = st.coef  # ``_caps`` at phi = 1: the fastest this node can mint this key
        held = st.f + st.p
        waited = now - st.stamp
        if held + (pr + fr) * (waited if waited > 0.0 else 0.0) < cost:
            # Short even if the whole floating share had been ours since the last settle: a settle
            # could only say no too, so it is left to the next take or visit (it mints from ``stamp``,
            # and only ever less for the wait).  Most takes of a starving key end here; a settle on
            # each of them was about 30 % of a denial (2.32 -> 1.65 us a take over 1,000 starving keys,
            # one loop).  ``remaining`` is as of that settle; the
            # retry hint is the soonest this node could mint the rest.
            st.requested += cost
            if not st.hot and now - st.want[0] >= st.want_gap:
                self._mark(st)
            short = cost - held
            retry = min(max(short / (pr + fr), self.settings.gossip_s) if pr + fr > 0 else 1.0, 60.0)
            return StrictDecision(False, held, st.limit.burst, retry, None)
        phi = self._settle(st, now)
        st.requested += cost
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
        # Short of rights: the next tick may publish a want -- unless the last one is too recent to be
        # republished (see ``Transfers._want_and_give``); a key starving under a steady load is then
        # not visited every round for nothing (its demand is still measured on its slot's round).
        if not st.hot and now - st.want[0] >= st.want_gap:
            self._mark(st)
        pr, _pc, fr, _fc = st.coef  # ``_caps``, inlined
        fr *= phi
        short = cost - st.f - st.p
        retry = min(max(short / (pr + fr), self.settings.gossip_s) if pr + fr > 0 else 1.0, 60.0)
        return StrictDecision(False, st.f + st.p, st.limit.burst, retry, None)

    def commit(self, ticket: Ticket, now: float) -> bool:
        """Turn a reservation into an admission -- unless the lease shrank since the take (a pause
        between take and answer): then the floating part is burned, the pinned part returned, and
        the request must be refused.  Returns whether the request is admitted.  A commit at the take's
        own time (the node's decision: one clock read for both) has nothing to re-check: the share at
        ``ticket.at`` is ``ticket.phi``."""
        st = self._keys[ticket.key]
        st.res_f -= ticket.from_floating
        st.res_p -= ticket.from_pinned
        if ticket.from_floating > 0 and now > ticket.at and self._share_dropped(ticket.at, now, ticket.phi):
            st.burned += ticket.from_floating
            st.p += ticket.from_pinned
            self.revoked += 1
            self._touch(st)
            return False
        st.spent += ticket.cost
        # A spend changes our entry, but no peer needs it at once: only this actor ever spends its
        # rights, so the others' views of it are for reading.  It rides with the key's next change,
        # or goes out SPEND_DELAY_S after the first unpublished spend (``Transfers.tick``); publishing
        # every spend at the next round put every key in use into nearly every round's delta.
        # (``_touch_later``, inlined: this runs on every allowed request.)
        st.own_c = None
        if not st.lazy:
            st.lazy = True
            self._spent.append((now, st))
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

    def _get(self, key: str, now: float) -> KeyState:
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
            st = self._keys[key] = KeyState(key, limit, self.started)
            st.coef = self._coef(limit)
            _pr, pc, _fr, fc = self._caps(st, 1.0)
            st.most = pc + fc + 1e-9  # float rounding of the caps only
            self._slots[len(self._keys) % len(self._slots)].append(st)
            self._touch(st)
        return st

    def _touch(self, st: KeyState) -> None:
        """Our entry of ``st`` changed: it goes into the next delta to every peer."""
        self._seq += 1
        st.changed = self._seq
        st.own_c = None
        st.lazy = False
        recent = self._recent
        recent.pop(st.key, None)
        recent[st.key] = self._seq

    def _touch_later(self, st: KeyState, now: float) -> None:
        """Our entry of ``st`` changed in a way no peer needs at once (a spend, a credit): it rides
        with the key's next change, or goes out ``SPEND_DELAY_S`` after the first such change."""
        st.own_c = None
        if not st.lazy:
            st.lazy = True
            self._spent.append((now, st))

    def _mark(self, st: KeyState) -> None:
        """Visit ``st`` in the next tick."""
        st.hot = True
        self._hot.append(st)

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def __repr__(self) -> str:
        return f"<StrictTable {self.actor} keys={len(self._keys)} seq={self._seq}>"
