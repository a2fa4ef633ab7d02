"""Minting and trimming a strict node's pots of one key: the caps, ``settle`` over the lease's steps.

A part of :class:`~edge_server.strict.table.StrictTable` (a base class of it: the methods read the
table's lease, settings and ghost time).  The pinned pot mints at ``alpha * R * p_i`` up to
``alpha * B * p_i``; the floating pot at ``(1 - alpha) * R * phi(t)`` up to ``(1 - alpha) * B *
phi(t)``, and is trimmed (burned) whenever ``phi`` drops.  Every cap counts the pot, the reserved
rights and the gifts not yet acknowledged.
"""

from __future__ import annotations

from bisect import bisect_right

from edge_server.strict.keystate import KeyState, Unacked
from edge_server.token_bucket import Limit

__all__ = ["Pots"]


class Pots:
    """The minting half of ``StrictTable``: caps, settle, trim, and the lease's step function."""

    def _caps(self, st: KeyState, phi: float) -> tuple[float, float, float, float]:
        """(pinned rate, pinned cap, floating rate, floating cap) of one key for share ``phi``."""
        pr, pc, fr, fc = st.coef  # computed once per key: this runs on every take
        return pr, pc, fr * phi, fc * phi

    def _coef(self, limit: Limit) -> tuple[float, float, float, float]:
        """The factors of :meth:`_caps`: the pinned rate and cap, the floating ones at ``phi = 1``."""
        a, scale = self.settings.alpha, self.settings.mint_scale
        return (a * limit.rate * self.weight * scale, a * limit.burst * self.weight,
                (1 - a) * limit.rate * scale, (1 - a) * limit.burst)

    @staticmethod
    def _unacked(st: KeyState) -> tuple[float, float]:
        return st.up, st.uf

    def _set_unacked(self, st: KeyState, unacked: list[Unacked]) -> None:
        """Replace a key's unacknowledged gifts; their sums are kept beside the list (the caps read
        them on every take)."""
        st.unacked = unacked
        st.up = sum(u.pinned for u in unacked)
        st.uf = sum(u.floating for u in unacked)
        if unacked:
            self._gifting[st.key] = st
        else:
            self._gifting.pop(st.key, None)

    def _settle(self, st: KeyState, now: float) -> float:
        """Mint since ``stamp`` and trim the floating pot to every share the lease had meanwhile.
        Returns ``phi(now)``: a take needs it, and the common case has it at hand (no second bisect)."""
        stamp = st.stamp
        if now <= stamp:
            return self.lease.phi(now)
        up, uf = st.up, st.uf  # as at ``stamp``: only shrinks until ``now``, so conservative
        a = stamp if stamp > self.ghost_until else self.ghost_until
        cuts, phis = self._steps()
        i = bisect_right(cuts, a)
        if a < now and (i == len(cuts) or cuts[i] > now):
            # The common case: the share did not change since ``a`` (one piece of ``segments``, and
            # the final trim at ``phi(now)`` is the same trim), with no list built per take.  The
            # caps, trim and mint of the general case, inlined (every take runs this): the same
            # arithmetic in the same order.
            phi = phis[i - 1] if i else 0.0
            pr, pc, fr, fc = st.coef
            fc *= phi
            res_f = st.res_f
            f = st.f
            room = fc - uf - res_f
            if room < 0.0:
                room = 0.0
            if f > room:  # ``_trim``
                st.burned += f - room
                f = room
            dt = now - a
            mint = fr * phi * dt
            room = fc - f - uf - res_f
            if mint > room:
                mint = room
            if mint > 0:
                f += mint
                st.minted += mint
            st.f = f
            p = st.p
            mint = pr * dt
            room = pc - p - up - st.res_p
            if mint > room:
                mint = room
            if mint > 0:
                st.p = p + mint
                st.minted += mint
        else:
            self._settle_pieces(st, a, now, up, uf)
            phi = self.lease.phi(now)
        st.stamp = now
        unacked = st.unacked
        if unacked and min(u.until for u in unacked) <= now:
            self._set_unacked(st, [u for u in unacked if u.until > now])
        return phi

    def _settle_pieces(self, st: KeyState, a: float, now: float, up: float, uf: float) -> None:
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
    def _trim(st: KeyState, limit: float) -> None:
        """Burn the floating rights above ``limit``.  Not published by itself: only this actor ever
        spends its rights, so peers learn of the burn with the key's next change (a drop of ``phi``
        trims every key at once, and would otherwise put every key in the next delta to every peer)."""
        limit = max(0.0, limit)
        if st.f > limit:
            st.burned += st.f - limit
            st.f = limit

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
