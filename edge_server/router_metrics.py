"""The router's Prometheus metrics, in a registry of their own (a router and nodes may share a test
process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["LATENCY_BUCKETS", "RouterMetrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RouterMetrics:
    """Prometheus metrics in a registry of their own (a router and nodes may share a test process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("router_requests", "Requests by route, status, home region and answering region",
                                ["route", "status", "home", "region"], registry=r)
        self.retries = Counter("router_retries", "Requests retried on another region", ["home", "region"],
                               registry=r)
        self.ejections = Counter("router_ejections", "Nodes taken out of rotation", ["node", "reason"], registry=r)
        self.shed = Counter("router_shed", "Requests answered 429 by the router itself", ["route"], registry=r)
        self.upstream = Histogram("router_upstream_seconds", "Time to a node's full answer", ["region"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._children: dict[tuple[str, ...], Any] = {}

    def count(self, route: str, status: int, home: str, region: str) -> None:
        """Count one request; label children are cached because ``labels()`` is slow on the hot path."""
        key = (route, str(status), home, region)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(*key)
        child.inc()

    def observe_upstream(self, region: str, seconds: float) -> None:
        key = ("upstream", region)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.upstream.labels(region)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
