"""The garbage collector's pauses in this process, watched through ``gc.callbacks``.

A collection stops the event loop for its whole length, so to the adaptive limit
(:class:`edge_server.admission.AdaptiveLimit`) it looks like any other loop lag.  :data:`GC_WATCH` counts
collections and their pauses per generation (exported by
:class:`edge_server.overload_metrics.OverloadCollector`), so a lag can be told to be the collector's.
Not subtracted from the adaptive limit's lag: tried, it changed neither the cuts nor the goodput at 1x
capacity in paired overload runs (the lag there was mostly not the collector's).

What the router's collections are, measured under open-loop overload (``bench_overload.py --capacity-rps
1000 --multiples 1,5 --users none --step-s 15``, a callback logging every collection): ~130 young
collections in 30 s, **none** collecting anything, each scanning up to ~140,000 young objects (the
requests in flight keep them alive, and frees of older objects keep the allocation count under its
threshold while the young list grows) -- 1.6 ms at first, 40-160 ms of CPU under 5x.  Every object is
scanned once as young whatever the thresholds, so their cost follows the allocations of requests that
live for seconds.  Tried instead: automatic collection off and a full collection every 5 s.  Each one
took 220-290 ms (the whole heap, and 5 s of garbage), and goodput and shed answer times were no better
within the runs' noise (974 vs 1,002 req/s at 1x, 712 vs 671 at 5x, shed answer p95 849 vs 358 ms).
Tried too (2026-12-02, paired runs of ``bench_overload.py --capacity-rps 712 --multiples 1,2,5 --users
none --step-s 15``, two each): a young collection on a timer every 100 ms, and the middle one every 50th.
Each young collection still scanned ~15 ms of objects (requests allocate that much and hold it), so the
young pauses of a 15 s step added up to 1.4-3.0 s instead of 0.2-2.1 s, the middle ones took 170-420
ms, and goodput (696-982 vs 716-887 req/s) and sheds (p95 181-424 vs 167-321 ms) were no better.
Kept: the thresholds of ``router_main`` and the nodes.
"""

from __future__ import annotations

import gc
import time
from typing import Any

__all__ = ["GC_WATCH", "GcWatch"]


class GcWatch:
    """Count, total and longest pause per generation."""

    __slots__ = ("_started", "count", "installed", "longest_s", "total_s")

    def __init__(self) -> None:
        self._started = 0.0
        self.count = [0, 0, 0]
        self.longest_s = [0.0, 0.0, 0.0]
        self.total_s = [0.0, 0.0, 0.0]
        self.installed = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        g = min(2, int(info.get("generation", 0)))
        self.count[g] += 1
        self.total_s[g] += took
        if took > self.longest_s[g]:
            self.longest_s[g] = took

    def install(self) -> None:
        """Start watching (once per process)."""
        if not self.installed:
            gc.callbacks.append(self)
            self.installed = True


GC_WATCH = GcWatch()  # the process's one collector, watched once the server has set it up
