"""Prometheus metrics of one node, in a registry of its own (several nodes can share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["NodeMetrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.decisions = Counter("edge_decisions", "Limiter decisions", ["decision"], registry=r)
        self.latency = Histogram("edge_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("edge_tokens_granted", "Tokens granted by this node", registry=r)
        self.audit_events = Counter("edge_audit_events", "Audit events written", registry=r)
        self.gossip_messages = Counter("edge_gossip_messages", "Gossip messages", ["direction", "outcome"],
                                       registry=r)
        self.gossip_bytes = Counter("edge_gossip_bytes", "Gossip body bytes", ["direction"], registry=r)
        self.gossip_refused = Counter("edge_gossip_refused", "Refused gossip messages", ["reason"], registry=r)
        self.gossip_lag = Gauge("edge_gossip_lag_seconds", "Time since the last acknowledged exchange",
                                ["peer"], registry=r)
        self.gossip_entries = Counter("edge_gossip_entries", "Key entries sent in gossip deltas", registry=r)
        self.crdt_entries = Gauge("edge_crdt_entries", "G-Counter entries held (keys x nodes)", registry=r)
        self.live_keys = Gauge("edge_live_keys", "Keys in the limiter table", registry=r)
        self.live_peers = Gauge("edge_live_peers", "Peers heard from within the peer timeout", registry=r)
        self.key_table_full = Counter("edge_key_table_full", "Requests refused because the key table is full",
                                      registry=r)
        self.inflight = Gauge("edge_inflight_requests", "Requests being served", registry=r)
        self.skill_errors = Counter("edge_skill_errors", "Skill calls that failed (502)", registry=r)
        self.allowed = self.decisions.labels("allowed")
        self.denied = self.decisions.labels("denied")
        self._route_children: dict[tuple[str, int], object] = {}
        self._latency_children: dict[str, object] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one request; label children are cached because ``labels()`` is slow on the hot path."""
        child = self._route_children.get((route, status))
        if child is None:
            child = self._route_children[(route, status)] = self.requests.labels(route, str(status))
        child.inc()  # type: ignore[attr-defined]
        hist = self._latency_children.get(route)
        if hist is None:
            hist = self._latency_children[route] = self.latency.labels(route)
        hist.observe(seconds)  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
