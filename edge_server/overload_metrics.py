"""Admission and slow-client figures as Prometheus metrics, for the router and the nodes alike.

Read at scrape time from the :class:`edge_server.admission.Gate` and the
:class:`edge_server.conn_guard.ConnectionGuard`, so the hot path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_server.gc_watch import GC_WATCH

__all__ = ["OverloadCollector"]


class OverloadCollector(Collector):
    """Admission gate and connection guard figures, read at scrape time (nothing on the hot path).

    Shared by the router (``prefix="router"``) and the nodes (``prefix="edge"``); ``source`` returns
    the gate and the guard (either may be None) when scraped; ``adaptive`` is the gate's
    :class:`~edge_server.admission.AdaptiveLimit` when it has one.
    """

    def __init__(self, prefix: str, source: Callable[[], tuple[Any, Any]], adaptive: Any = None) -> None:
        self.prefix, self.source, self.adaptive = prefix, source, adaptive

    def collect(self) -> Iterator[Metric]:
        gate, guard = self.source()
        p = self.prefix
        if self.adaptive is not None:
            yield GaugeMetricFamily(f"{p}_inflight_limit_lag_seconds", "Event-loop lag seen by the adaptive limit",
                                    value=self.adaptive.lag_s)
            yield CounterMetricFamily(f"{p}_inflight_limit_cuts", "Times the adaptive limit was lowered for lag",
                                      value=self.adaptive.cuts)
        if GC_WATCH.installed:
            n = CounterMetricFamily(f"{p}_gc_collections", "Garbage collections", labels=["generation"])
            total = CounterMetricFamily(f"{p}_gc_pause_seconds", "Time the garbage collector stopped the loop",
                                        labels=["generation"])
            longest = GaugeMetricFamily(f"{p}_gc_pause_longest_seconds", "Longest garbage collection so far",
                                        labels=["generation"])
            for g in range(3):
                n.add_metric([str(g)], GC_WATCH.count[g])
                total.add_metric([str(g)], GC_WATCH.total_s[g])
                longest.add_metric([str(g)], GC_WATCH.longest_s[g])
            yield from (n, total, longest)
        if gate is not None:
            yield GaugeMetricFamily(f"{p}_inflight", "Requests holding an admission slot", value=gate.inflight)
            yield GaugeMetricFamily(f"{p}_inflight_limit", "Admission slots", value=gate.limit)
            yield GaugeMetricFamily(f"{p}_queue_depth", "Requests waiting for a slot", value=gate.queued)
            shed = CounterMetricFamily(f"{p}_overload_shed", "Requests answered 503 by admission control",
                                       labels=["reason"])
            for reason, n in sorted(gate.shed.items()):
                shed.add_metric([reason], n)
            yield shed
        if guard is not None:
            yield GaugeMetricFamily(f"{p}_connections_open", "Client connections open", value=len(guard.open))
            early = getattr(guard, "early", None)
            if early is not None:
                yield CounterMetricFamily(f"{p}_shed_raw", "Sheds answered from the raw bytes, before aiohttp parsed "
                                          "the request (also in the overload sheds)", value=early.taken)
                yield CounterMetricFamily(f"{p}_shed_probes", "Requests let through to an empty, stalled admission "
                                          "queue (at most the completions of the last two loop turns per turn)",
                                          value=getattr(early, "let_through", 0))
            closed = CounterMetricFamily(f"{p}_connections_closed", "Client connections closed by the guard",
                                         labels=["reason"])
            for reason, n in sorted(guard.closed.items()):
                closed.add_metric([reason], n)
            yield closed
