"""Virtual time for the simulator: one event queue on a true clock, and each node's own (skewed) clock.

Nothing here reads the wall clock or sleeps.  Events at the same instant run in the order they were
scheduled (a sequence number breaks ties), so a run is a pure function of its seed and its inputs.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

__all__ = ["EPOCH", "Clocks", "Scheduler"]

EPOCH = 1_700_000_000.0  # the nodes' "wall clock" at virtual time 0: boot ids and generations look real


class Scheduler:
    """A heap of ``(time, seq, fn, args)``; :meth:`run_until` pops and calls them in order."""

    __slots__ = ("_heap", "_seq", "now")

    def __init__(self) -> None:
        self.now = 0.0  # true virtual time, seconds since the run started
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` at true time ``t`` (never before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (t if t > self.now else self.now, self._seq, fn, args))

    def after(self, delay: float, fn: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run_until(self, t_end: float) -> None:
        """Run every event at or before ``t_end``; leaves ``now`` at ``t_end``."""
        heap = self._heap
        pop = heapq.heappop
        while heap and heap[0][0] <= t_end:
            t, _seq, fn, args = pop(heap)
            self.now = t
            fn(*args)
        self.now = t_end

    def clear(self) -> None:
        self._heap.clear()

    def pending(self) -> int:
        return len(self._heap)


class Clocks:
    """Each node's wall clock: ``EPOCH + true time + offset``; a skew fault steps the offset."""

    __slots__ = ("offsets", "sched")

    def __init__(self, sched: Scheduler, nodes: list[str]) -> None:
        self.sched = sched
        self.offsets = dict.fromkeys(nodes, 0.0)

    def read(self, node: str) -> float:
        return EPOCH + self.sched.now + self.offsets[node]

    def set_offset(self, node: str, offset_s: float) -> float:
        """Step ``node``'s clock to ``offset_s`` from true time; returns the step (new - old)."""
        step = offset_s - self.offsets[node]
        self.offsets[node] = offset_s
        return step
