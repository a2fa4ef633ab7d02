"""The garbage collector's pauses in this process, watched through ``gc.callbacks``.

A collection stops the event loop for its whole length, so to the adaptive limit
(:class:`edge_server.admission.AdaptiveLimit`) it looks like any other loop lag.  :data:`GC_WATCH` counts
collections and their pauses per generation (exported by
:class:`edge_server.overload_metrics.OverloadCollector`), so a lag can be told to be the collector's.
Not subtracted from the adaptive limit's lag: tried, it changed neither the cuts nor the goodput at 1x
capacity in paired overload runs (the lag there was mostly not the collector's).
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
