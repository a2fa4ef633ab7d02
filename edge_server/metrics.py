"""Prometheus metrics of one node, in a registry of its own (several nodes can share a process in tests).

The per-request figures (requests, latency, decisions, tokens) are plain integers rendered at scrape
time by :class:`HotPathCollector`: a prometheus-client ``Counter.inc`` takes a lock and costs about a
microsecond, which is several percent of a whole request on this edge.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["HotPathCollector", "NodeMetrics"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class HotPathCollector(Collector):
    """Counters and a latency histogram kept as plain numbers, turned into metric families on scrape."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets: dict[str, list[int]] = {}  # route -> count per bucket (not cumulative) + overflow
        self.sums: dict[str, float] = {}
        self.allowed = 0
        self.denied = 0
        self.tokens = 0
        self.raw_checks = 0  # checks answered from the raw bytes (edge_server/fast_check.py), also in requests

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        counts = self.buckets.get(route)
        if counts is None:
            counts = self.buckets[route] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.sums[route] = 0.0
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sums[route] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("edge_requests", "HTTP requests by route and status", labels=["route", "status"])
        for (route, status), n in sorted(self.requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        latency = HistogramMetricFamily("edge_request_seconds", "Request latency by route", labels=["route"])
        for route, counts in sorted(self.buckets.items()):
            cumulative, acc = [], 0
            for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts, strict=True):
                acc += n
                cumulative.append((bound, acc))
            latency.add_metric([route], cumulative, self.sums[route])
        yield latency
        decisions = CounterMetricFamily("edge_decisions", "Limiter decisions", labels=["decision"])
        decisions.add_metric(["allowed"], self.allowed)
        decisions.add_metric(["denied"], self.denied)
        yield decisions
        yield CounterMetricFamily("edge_tokens_granted", "Tokens granted by this node", value=self.tokens)
        yield CounterMetricFamily("edge_audit_events", "Audit events written", value=self.allowed)
        yield CounterMetricFamily("edge_checks_raw", "Checks answered from the raw bytes, without aiohttp's "
                                  "request path (also counted in edge_requests)", value=self.raw_checks)


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.hot = HotPathCollector()
        r.register(self.hot)
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
        # The invoke route's commit protocol (edge_server/commit.py): what a node did not do because the
        # caller was gone, and skill calls whose answer nobody read.
        self.invoke_dropped = Counter("edge_invoke_dropped", "Skill calls not made: the caller was gone "
                                      "(stage uncommitted: no body came; before_decision; before_skill: "
                                      "tokens spent)", ["stage"], registry=r)
        self.skill_calls_client_gone = Counter("edge_skill_calls_client_gone", "Skill calls made whose caller "
                                               "was gone when they returned", registry=r)
        self.observe = self.hot.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
