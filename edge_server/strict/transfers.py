"""A strict node's gossip round over its keys: measure demand, publish wants, give surplus, credit gifts.

A part of :class:`~edge_server.strict.table.StrictTable` (a base class of it).  A node short of
rights publishes a ``want`` stamped with its own clock; a donor with surplus answers it by raising
``sent[j] = (total, echo=want stamp)``; the receiver credits what fits its room only if the echo is
at most ``transfer_window`` old on *its own* clock, and burns the rest.  A giver stops counting an
unacknowledged gift once its receiver has processed it, or after ``safe(transfer_window)``.
"""

from __future__ import annotations

import math

from edge_server.strict.keystate import KeyState, Unacked

__all__ = ["COLD_PERIOD_S", "Transfers", "cold_slots"]

DEMAND_TAU_S = 0.5  # demand reported to the voters: an exponential average over about this long
# Every key is visited by tick at least once per COLD_PERIOD_S (a slot of its keys each round, at least
# COLD_SLOTS_MIN slots).  A cold visit is bookkeeping (demand decay, minting, the want of a key no take
# marked): a key running low or wanted by a peer is visited the next round anyway.  At 16 slots of
# 20 ms rounds (every key every 0.32 s), the cold visits of 1,000 keys were most of a round's work on
# a node serving 20,000 requests a second, and 3,000 visits a second on each idle peer.
COLD_PERIOD_S = 1.0
COLD_SLOTS_MIN = 4


def cold_slots(gossip_s: float) -> int:
    """How many slots the keys are spread over: one is visited per round, so all once per period."""
    return max(COLD_SLOTS_MIN, round(COLD_PERIOD_S / gossip_s))


WANT_GAP_MAX_STEPS = 8  # a fruitless want is republished at least this many half transfer windows apart ...
WANT_GAP_MAX_S = 2.0  # ... or, for a slow key, as long as the rest of the cluster takes to mint a token (at most this)
MIN_GIFT = 1.0  # tokens: a donor gives at least this much, or the whole want if it asks for less
# A key's spends alone go into the deltas this long after the first of them: a key spent on every round
# is published every dozen rounds.  Only the node itself ever spends its rights, so the peers' views of
# a spend are for reading (``/v1/state``, the workbench's checks), never for safety; the checks allow
# for it (``workbench.check.convergence`` adds it to its bound, ``workbench.check.tokens`` to the age of
# a grant a view may lack).  At 0.1 s the publication of 1,000 keys in use was most of what a strict
# node's allowed check cost beyond eventual's (bench_strict_node.py, allowed keys, 2 rounds of 5 s:
# strict / eventual req/s 0.82-0.87 at 0.1 s, 1.03 at 0.25 s, 1.15 at 0.5 s, in paired runs).
SPEND_DELAY_S = 0.25
FAST_TAU_S = 0.05  # demand behind wants and surplus: must follow a shift within a few rounds


class Transfers:
    """The transfer half of ``StrictTable``: ``tick`` and what a merge credits or acknowledges."""

    def tick(self, now: float) -> None:
        """Once per gossip round: mint, measure demand, publish wants, and push surplus to wants."""
        self._last_tick = now
        self._rounds += 1
        rnd = self._rounds
        # History older than every key's last settle is never read again (every key is visited at
        # least once per len(_slots) rounds); a key settled later than that sees phi = 0 there: less.
        self.lease.prune(now, max(self.settings.lease_s, (len(self._slots) + 1) * self.settings.gossip_s))
        horizon = self.settings.transfer_window_s
        # Every round: the keys running low or newly wanted by a peer, and those with gifts in
        # flight; besides, one slot, so every key is visited once per COLD_PERIOD_S
        # (demand decay, minting, wants of quiet keys) without a round that visits them all at once.
        # A key not visited neither wants nor gives: liveness only -- its pots settle on every take.
        hot, self._hot = self._hot, []
        for group in (hot, self._slots[rnd % len(self._slots)], list(self._gifting.values())):
            for st in group:
                if st.visited == rnd:
                    continue
                st.visited = rnd
                self._visit(st, now, horizon)
        # Spends not yet published (``StrictTable.commit``): each SPEND_DELAY_S after its first one.
        spent, cut = self._spent, now - SPEND_DELAY_S
        while spent and spent[0][0] <= cut:
            st = spent.popleft()[1]
            if st.lazy:
                self._touch(st)

    def _visit(self, st: KeyState, now: float, horizon: float) -> None:
        """One key in one tick: settle, measure demand, want, give."""
        st.hot = False
        dt = now - st.ticked
        st.ticked = now
        phi = self._settle(st, now)
        if dt > 0:
            seen = st.requested / dt
            st.demand += (1 - math.exp(-dt / DEMAND_TAU_S)) * (seen - st.demand)
            st.fast += (1 - math.exp(-dt / FAST_TAU_S)) * (seen - st.fast)
            st.requested = 0.0
        self._want_and_give(st, now, horizon, phi)

    def _want_and_give(self, st: KeyState, now: float, horizon: float, phi: float) -> None:
        """Want what ``st`` lacks, give its surplus to fresh wants; ``phi`` is the share at ``now``."""
        pr, pc, fr, fc = self._caps(st, phi)
        # What a want asks for: the demand over two transfer windows -- or, for a slow key whose wants
        # wait longer than WANT_GAP_MAX_STEPS half windows (``_want_gap_max``), over the wait to the
        # next want.  Asked for two windows only, the wants of a 1 token/s key brought a tenth of a
        # token every two seconds while each donor's pinned pot sat full (bench_strict_core.py,
        # ``one_region_by_limit``).  Not for the other keys: asking for more than two windows there
        # slowed the shift to a region the demand moved to (its time to 95 % of R 0.16 -> 0.24 s).
        slow = st.want_gap > self.settings.transfer_window_s / 2 * WANT_GAP_MAX_STEPS
        need = st.fast * (st.want_gap + horizon if slow else horizon * 2)
        have = st.p + st.f + (pr + fr) * horizon
        up, uf = st.up, st.uf
        if now >= self.ghost_until and need > have:
            room = max(0.0, pc - st.p - up - st.res_p) + max(0.0, fc - st.f - uf - st.res_f)
            amount = min(need - have, room)
            last_at, last_amount = st.want
            # A want is republished only when it is ``want_gap`` old (half a transfer window) or has
            # grown by half: a key starving for many rounds must not ride in every delta to every
            # peer (a node with thousands of such keys spent its cores on rounds).  The gap doubles,
            # up to WANT_GAP_MAX_STEPS times, while the wants bring in less than a token (the whole
            # cluster is short of this key: asking every round only costs messages), and falls back
            # at the first gift that does.  A donor answers each stamp once.
            if amount > 0 and (now - last_at >= st.want_gap
                               or (amount > 1.5 * last_amount and amount - last_amount >= MIN_GIFT)):
                base = self.settings.transfer_window_s / 2
                if last_at and st.credited - st.want_credited < MIN_GIFT:
                    st.want_gap = min(2 * max(st.want_gap, base), self._want_gap_max(st, base, phi))
                else:
                    st.want_gap = base
                st.want_credited = st.credited
                st.want = (now, amount)
                self._touch(st)
        surplus = st.p + st.f - st.fast * horizon
        if not st.view:
            return
        # Each want stamp is answered at the first visit after it arrived (the merge that brought it
        # marks the key), or never: a gift to an older stamp could reach its receiver after the
        # transfer window and be burned there.  (Skipped slivers made that common: a donor would
        # fill up between a want's arrival and its key's next cold-slot visit, then answer the
        # stale stamp.)
        wants = []
        seen = st.considered
        for actor, r in st.view.items():
            stamp = r.want[0]
            if r.want[1] <= 0 or stamp <= seen.get(actor, 0.0):
                continue
            node, inc = self._split(actor)
            if node == self.node_id or inc != self._current.get(node):
                continue
            seen[actor] = stamp
            if stamp > st.sent.get(actor, (0.0, -math.inf))[1]:
                wants.append((actor, r.want))
        if surplus <= 1e-9:
            return
        total_wanted = sum(w[1] for _a, w in wants)
        if not wants:
            return
        safe_fc = self._caps(st, self.lease.min_phi(now, now + self.settings.ghost_s))[3]
        f_room = max(0.0, safe_fc - uf - st.res_f)
        # The smallest gift: a token, or the whole want if it asks for less, or half of what this
        # node can hold at all if that is less (a node whose caps stay below a token -- a slow key,
        # a small share -- would otherwise sit full and mint nothing more).
        least = min(MIN_GIFT, 0.5 * (pc + fc))
        for actor, (stamp, amount) in wants:
            give = min(amount, surplus * amount / total_wanted)
            from_f = min(st.f, give, f_room)
            from_p = min(st.p, give - from_f)
            # No sliver (see ``least``): a sliver cannot admit a request of its own, and each gift
            # costs both entries a change -- a delta to every peer, an ack, a relay.  Donors minting a
            # fraction of a token a second answered every want of a starving key with one, several per
            # key per second: messages that followed the requests, not the rate.  The surplus now
            # waits here until it makes a gift worth sending.
            if from_f + from_p < min(least, amount) - 1e-9 or from_f + from_p <= 1e-9:
                continue
            st.f -= from_f
            st.p -= from_p
            f_room -= from_f
            total = st.sent.get(actor, (0.0, 0.0))[0] + from_f + from_p
            st.sent[actor] = (total, stamp)
            self._set_unacked(st, [*st.unacked, Unacked(actor, total, from_p, from_f, now + self.settings.ghost_s)])
            self._touch(st)

    def _want_gap_max(self, st: KeyState, base: float, phi: float) -> float:
        """The longest a fruitless want waits before it is published again: ``WANT_GAP_MAX_STEPS``
        half windows, or -- for a key so slow that the rest of the cluster mints less than a token in
        that time -- the time it takes to mint one (capped at ``WANT_GAP_MAX_S``): asking sooner can
        only bring slivers, which no donor gives.

        The rest of the cluster mints the pinned shares of the other nodes and the floating share we
        do not hold: ``R (1 - alpha w - (1 - alpha) phi)``.  Counting our floating share as theirs (as
        this did) made a node that holds nearly all of it -- all demand in one region, every key
        starving -- republish every key's want about every second for gifts its donors could make
        only every few seconds."""
        alpha = self.settings.alpha
        others = st.limit.rate * max(0.0, 1.0 - alpha * self.weight - (1.0 - alpha) * phi)
        mint_one = MIN_GIFT / others if others > 0 else WANT_GAP_MAX_S
        return max(base * WANT_GAP_MAX_STEPS, min(mint_one, WANT_GAP_MAX_S))

    def _receive(self, st: KeyState, now: float, settled: bool = True) -> int:
        """Credit transfers to us that answer a fresh want; burn the rest.  Unless ``settled``, the
        key is settled before the first transfer is processed (the pots must be current)."""
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
            if not settled:
                self._settle(st, now)
                settled = True
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
            # Published lazily, like a spend: our ``accepted`` only lets the giver stop counting its
            # gift before the gift's own expiry (``safe(transfer_window)``), and our ``credited``
            # is for views.  Published at once, every credit put its key in the next delta to every
            # peer: with demand on one node, a third of its delta entries.
            self._touch_later(st, now)
        return refused

    def _acknowledged(self, st: KeyState) -> None:
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
