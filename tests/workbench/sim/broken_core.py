"""Deliberately broken limiter cores: the simulator must catch them."""

from __future__ import annotations

from edge_server.token_bucket import BucketTable


class NeverSubtractsPeers(BucketTable):
    """Merges peers' counters but never takes their spend off its own level: every node admits the
    whole global limit by itself."""

    def merge(self, peer, entries, now):  # type: ignore[no-untyped-def]
        entries = list(entries)
        levels = {key: (st.level, st.stamp) for key, _c in entries if (st := self._keys.get(key)) is not None}
        learned = super().merge(peer, entries, now)
        for key, (level, stamp) in levels.items():
            st = self._keys[key]
            st.level, st.stamp = level, stamp
        return learned


class NoUnseenCap(BucketTable):
    """Drops the unseen-spend cap (the first-burst rule): N fresh nodes may each spend a whole burst."""

    def _unacked(self, st):  # type: ignore[no-untyped-def]
        return 0

