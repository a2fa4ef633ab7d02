"""The router's Prometheus metrics, in a registry of their own (a router and nodes may share a test
process).

What an SRE reads to see an overload cascade coming (all under ``/metrics``):
``router_inflight`` / ``router_queue_depth`` (the admission gate), ``router_overload_shed_total{reason}``
(quick 503s), ``router_health_check_seconds{node}`` (measured in the checker's own thread),
``router_ejections_total{node,reason}`` and ``router_ejections_refused_total{node,reason}`` (the cap at
work), ``router_panic`` (1 while routing past the health table), ``router_nodes_in_rotation``,
``router_loop_lag_seconds``, ``router_try_failures_total{node,kind}`` and
``router_connections_closed_total{reason}`` (slow or idle clients cut off), and
``router_hedge_losers_total{route,result}`` (what a hedged check's losing try did; ``double_grant``: two
nodes granted one request id, :mod:`edge_server.hedge_watch`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CHECK_BUCKETS", "LATENCY_BUCKETS", "RouterMetrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CHECK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1)


class RouterMetrics:
    """Prometheus metrics in a registry of their own (a router and nodes may share a test process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("router_requests", "Requests by route, status, home region and answering region",
                                ["route", "status", "home", "region"], registry=r)
        self.retries = Counter("router_retries", "Requests retried on another region", ["home", "region"],
                               registry=r)
        self.ejections = Counter("router_ejections", "Nodes taken out of rotation", ["node", "reason"], registry=r)
        self.ejections_refused = Counter("router_ejections_refused", "Ejections refused by the ejection cap",
                                         ["node", "reason"], registry=r)
        self.shed = Counter("router_shed", "Requests answered 429 by the router itself", ["route"], registry=r)
        self.upstream = Histogram("router_upstream_seconds", "Time to a node's full answer", ["region"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.invoke_continue = Histogram("router_invoke_continue_seconds", "Time from an invoke try's start to "
                                         "its node's 100 Continue (the commit protocol's header time)",
                                         ["region"], buckets=CHECK_BUCKETS, registry=r)
        self.try_failures = Counter("router_try_failures", "Forwarding tries that failed, by evidence kind",
                                    ["node", "kind"], registry=r)
        self.hedge_losers = Counter("router_hedge_losers", "Losing tries of hedged check requests by what their "
                                    "node did (double_grant: it granted as well as the winner)", ["route", "result"],
                                    registry=r)
        self.retry_budget_exhausted = Counter("router_retry_budget_exhausted",
                                              "Retries not made because the retry budget was spent", registry=r)
        self.health = Histogram("router_health_check_seconds", "Active /readyz check latency (checker thread)",
                                ["node"], buckets=CHECK_BUCKETS, registry=r)
        self.health_results = Counter("router_health_checks", "Active checks by result", ["node", "result"],
                                      registry=r)
        self.panic = Gauge("router_panic", "1 while fewer nodes than the panic threshold are in rotation",
                           registry=r)
        self.in_rotation = Gauge("router_nodes_in_rotation", "Nodes in rotation", registry=r)
        self.loop_lag = Gauge("router_loop_lag_seconds", "Recent lag of the router's event loop", registry=r)
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

    def observe_continue(self, region: str, seconds: float) -> None:
        key = ("continue", region)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.invoke_continue.labels(region)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
