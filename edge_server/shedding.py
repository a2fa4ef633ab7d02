"""The router's back-pressure: after a node refused a key, answer that key's next requests with 429
itself until the node's hint expires, so a hot key's excess never reaches a node.

A window is capped at ``SHED_CAP_S`` and at the key's ``burst / rate`` (the bucket refills while the
router sheds, so no token is lost unless it would overflow); hints under ``SHED_MIN_S`` are ignored.

A window has a scope: the node that gave the hint.  In strict mode each node spends only the rights it
holds, and its hint is the time *it* needs to mint the rest.  Shed for the whole key, one node's denial
kept every other node's rights unspent -- a 1 token/s key with a burst of 5, demand in three regions,
was admitted 5 times in 20 s where 25 were allowed, 342 of its 378 requests shed by the router.
In eventual mode every node decides against its *view* of the global bucket, and views differ: a node
back from a pause, or from the far side of a healed blackhole, learns its peers' spends of the whole
outage at once after its own level had refilled to the burst, so it holds a debt the others do not.
Its first hint (2 s at R = B = 100 after 5 s away) shed the key on every node for the full second:
the cluster admitted nothing for 0.9 s after each resume and heal (``benchmarks/bench_outage.py``).
Per node, only the clients of that node wait; the others keep the whole rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["COARSE_SHED_S", "MAX_SHED_KEYS", "SHED_CAP_S", "SHED_MIN_S", "Shedder", "retry_seconds"]

SHED_CAP_S = 1.0  # never shed a key longer than this, whatever the node's hint
SHED_MIN_S = 0.005  # hints shorter than this are not worth shedding for
COARSE_SHED_S = 0.05  # shedding window after a 429 whose only hint is "Retry-After: 1"
MAX_SHED_KEYS = 100_000  # bound on the shedding table; when full, new keys are simply not shed


class Shedder:
    """Per limiter key, until when the router answers 429 itself; bounded in size and window."""

    def __init__(self, clock: Callable[[], float], window_cap: Callable[[str], float]) -> None:
        self.clock = clock
        self.window_cap = window_cap  # key -> longest window that loses no token (burst / rate)
        self._until: dict[tuple[str, str], tuple[float, int]] = {}  # (key, scope) -> (deadline, smallest denied cost)

    def __len__(self) -> int:
        return len(self._until)

    def __repr__(self) -> str:
        return f"<Shedder keys={len(self._until)}>"

    def learn(self, key: str, retry_s: float, cost: int, scope: str = "") -> float:
        """Remember a denial hint for ``key`` within ``scope`` (see the module's docstring); returns the
        window actually used (0 when not shedding)."""
        window = min(retry_s, SHED_CAP_S, self.window_cap(key))
        if window < SHED_MIN_S:
            return 0.0
        now = self.clock()
        if len(self._until) >= MAX_SHED_KEYS:
            self._purge(now)
            if len(self._until) >= MAX_SHED_KEYS:
                return 0.0
        slot = (key, scope)
        old = self._until.get(slot)
        if old is not None and old[0] > now:
            cost = min(cost, old[1])
        self._until[slot] = (now + window, cost)
        return window

    def remaining(self, key: str, cost: int, scope: str = "") -> float:
        """Seconds this request of ``cost`` should still be shed within ``scope`` (0: forward it)."""
        slot = (key, scope)
        entry = self._until.get(slot)
        if entry is None:
            return 0.0
        left = entry[0] - self.clock()
        if left <= 0:
            del self._until[slot]
            return 0.0
        return left if cost >= entry[1] else 0.0

    def _purge(self, now: float) -> None:
        for key in [k for k, (until, _) in self._until.items() if until <= now]:
            del self._until[key]


def retry_seconds(headers: Any) -> float:
    """How long a 429's key will surely stay refused, from the most precise hint the node gave.

    ``Retry-After-Ms`` is exact.  ``Retry-After`` is whole seconds rounded up, so the true wait is only
    known to exceed ``N - 1`` s; for ``Retry-After: 1`` (any wait under a second) the router sheds just
    ``COARSE_SHED_S``, which spares the node most of a hot key's excess without delaying grants much.
    """
    try:
        precise = headers.get("Retry-After-Ms")
        if precise is not None:
            return float(precise) / 1000
        return max(COARSE_SHED_S, float(headers.get("Retry-After", "1")) - 1)
    except ValueError:
        return COARSE_SHED_S
