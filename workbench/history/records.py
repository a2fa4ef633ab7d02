"""The record types of a run's history: one per thing (request, fault, metric, node state, audit event,
process sample).

Every time ``t_s`` / ``*_s`` is seconds on one monotonic clock whose zero is the start of the run, so
requests, faults and samples line up; wall-clock fields (audit ``ts``, state ``wall``) map onto that axis
through ``Recording.started_wall``.  The load generator, the drill, the simulator, the checker, the live
view and the report all use these classes; nothing converts between look-alikes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "CUT_AT_END",
    "AuditEvent",
    "FaultRecord",
    "MetricSample",
    "ProcessSample",
    "RequestRecord",
    "RouterSample",
    "StateSample",
    "field_names",
    "parse_metrics",
    "rows_from_wire",
    "rows_to_wire",
]


def field_names(cls: type) -> tuple[str, ...]:
    """The dataclass fields of a record type, in order (the JSON-lines keys)."""
    return tuple(f.name for f in fields(cls))


def rows_to_wire(cls: type, rows: Iterable[Any]) -> dict[str, Any]:
    """Records of one type as ``{"fields": names, "rows": [values, ...]}``: compact and picklable,
    for crossing a process boundary.  The field names travel along, so :func:`rows_from_wire`
    refuses rows written for another version of the type instead of mixing up its fields."""
    names = field_names(cls)
    return {"type": cls.__name__, "fields": list(names), "rows": [[getattr(r, n) for n in names] for r in rows]}


def rows_from_wire(cls: type, wire: Mapping[str, Any]) -> list[Any]:
    """The inverse of :func:`rows_to_wire`; a different field list is a ValueError naming both."""
    names = list(field_names(cls))
    if wire.get("type") != cls.__name__ or list(wire.get("fields") or []) != names:
        raise ValueError(f"expected {cls.__name__} rows with fields {names}, got {wire.get('type')!r} "
                         f"with {wire.get('fields')!r}")
    return [cls(*row) for row in wire.get("rows") or []]


# The error of a request still unanswered when the generator gave up on it at the run's end (the drain
# after the sending window ran out, or the run was stopped): no verdict on the system, the outcome is
# unknown.  The error budget does not count it; the counter check counts it as possibly admitted.
CUT_AT_END = "cut at end"


@dataclass(slots=True)
class RequestRecord:
    """One client request as the load generator saw it.

    Latency counts from ``intended_s`` (when the schedule wanted to send), not ``start_s``, so a
    stalled system or generator cannot hide queueing delay (no coordinated omission).
    """

    intended_s: float  # when the arrival schedule wanted it sent
    start_s: float  # when it was actually sent
    end_s: float  # when the reply (or the error) arrived
    home_region: str  # the client's region (X-Client-Region)
    answered_region: str  # X-Edge-Region of the reply; "" when none came
    node: str  # X-Edge-Node of the reply; ""
    key: str  # the limiter key: the tenant for invoke, the key for check
    cost: int = 1
    status: int = 0  # HTTP status; 0 = connection error or timeout
    error: str = ""  # error code from the body, the exception for status 0, or CUT_AT_END + why
    request_id: str = ""  # the request id the node audited it under
    route: str = "invoke"  # "invoke" or "check"
    allowed: bool | None = None  # check route: the "allowed" field of a 200; None for invoke
    retried_from: str = ""  # X-Router-Retried: the node the router tried first (it never answered)
    shed: str = ""  # X-Edge-Shed of a 503 that shed the request: why (queue_full, queue_timeout, ...)

    @property
    def latency_ms(self) -> float:
        return (self.end_s - self.intended_s) * 1000.0

    @property
    def service_ms(self) -> float:
        """Time on the wire and in the server, without the generator's own lag."""
        return (self.end_s - self.start_s) * 1000.0

    @property
    def admitted(self) -> bool:
        """Tokens were granted and answered: a 200 (that said allowed, on the check route)."""
        return self.status == 200 and self.allowed is not False

    @property
    def cut_at_end(self) -> bool:
        """Still in flight when the generator stopped waiting at the run's end: no answer, no error."""
        return self.status == 0 and self.error.startswith(CUT_AT_END)


@dataclass(slots=True)
class FaultRecord:
    """A fault as applied (not as planned), on the run clock."""

    t_s: float
    action: str  # partition, heal, latency, loss, kill, pause, resume, restart
    target: str = ""  # region, node id, "router", or a link "a<->b"
    detail: dict[str, Any] = field(default_factory=dict)  # groups, ms, pct, pid, ...


@dataclass(slots=True)
class MetricSample:
    """One Prometheus sample scraped from a node's /metrics."""

    t_s: float
    node: str
    name: str
    labels: dict[str, str]
    value: float


@dataclass(slots=True)
class StateSample:
    """A node's view from /v1/state: per key the global count and every node's (generation, count)."""

    t_s: float
    node: str
    wall: float  # the node's "time" field (wall clock) when it took the snapshot
    global_counts: dict[str, int]  # key -> global count as this node sees it
    counts: dict[str, dict[str, tuple[int, int]]]  # key -> node id -> (generation, count)

    @classmethod
    def from_state(cls, t_s: float, payload: Mapping[str, Any]) -> StateSample:
        """Build from the JSON body of GET /v1/state."""
        keys = payload.get("keys") or {}
        return cls(t_s, str(payload["node"]), float(payload.get("time", 0.0)),
                   {k: int(v["global"]) for k, v in keys.items()},
                   {k: {n: (int(e["gen"]), int(e["count"])) for n, e in v["nodes"].items()}
                    for k, v in keys.items()})


@dataclass(slots=True)
class RouterSample:
    """The router's routing table from GET /v1/router/state: per node, whether it sends to it and why not.

    Only what the router's metrics do not hold (those are :class:`MetricSample`: in-flight, queue depth,
    sheds, ejections counted by node and reason, health-check latency, panic): which nodes are in
    rotation at the sample, with the evidence or the last check's reason for those that are not.
    """

    t_s: float
    nodes: dict[str, dict[str, Any]]  # node id -> {"usable": bool, "healthy": bool, "evidence": str, "reason": str}
    # The request ids of the router's latest double grants (a hedged check granted by both its tries,
    # edge_server/hedge_watch.py), newest last; empty in recordings made before the router reported them.
    double_grants: list[str] = field(default_factory=list)

    @classmethod
    def from_state(cls, t_s: float, payload: Mapping[str, Any]) -> RouterSample:
        """Build from the JSON body of GET /v1/router/state (fields it does not know are ignored)."""
        nodes = {}
        for n in payload.get("nodes") or []:
            nodes[str(n["id"])] = {"usable": bool(n.get("usable")), "healthy": bool(n.get("healthy")),
                                   "evidence": str(n.get("evidence") or ""), "reason": str(n.get("reason") or "")}
        doubles = [str(d["request_id"]) for d in payload.get("double_grants_recent") or []
                   if isinstance(d, dict) and d.get("request_id")]
        return cls(t_s, nodes, doubles)


@dataclass(slots=True)
class AuditEvent:
    """One granted-token event from a node's audit trail (GET /v1/audit); ``ts`` is wall clock."""

    seq: int
    id: str
    key: str
    cost: int
    node: str
    region: str
    ts: float
    request_id: str
    gen: int

    @classmethod
    def from_json(cls, event: Mapping[str, Any]) -> AuditEvent:
        """Keep the contract's fields and ignore any later additions."""
        return cls(**{f: event[f] for f in field_names(cls)})


@dataclass(slots=True)
class ProcessSample:
    """CPU and memory of one process (node, router, generator) from psutil."""

    t_s: float
    name: str
    cpu_pct: float
    rss_mb: float


def parse_metrics(text: str, t_s: float, node: str, keep: Callable[[str], bool] | None = None) -> list[MetricSample]:
    """Parse a Prometheus text exposition (GET /metrics) into samples; NaN and infinite values are skipped.

    With ``keep``, only the sample lines whose name it keeps are parsed (the same samples as filtering
    the parse of the whole text): prometheus_client's parser costs ~25 µs a line, and a drill scrapes
    the router and every node each second on the load generator's own event loop, where parsing whole
    pages to keep a tenth of them held the loop ~4-8 ms a page and put the generator behind its
    schedule (lag p99 15-18 ms at 150 req/s)."""
    from prometheus_client.parser import text_string_to_metric_families

    if keep is not None:
        # Comment lines go too: without its TYPE line a sample parses under its own name, which is
        # the sample name either way.
        text = "".join(line + "\n" for line in text.splitlines()
                       if line and line[0] != "#" and keep(line.split("{", 1)[0].split(" ", 1)[0]))
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if math.isfinite(s.value):
                out.append(MetricSample(t_s, node, s.name, dict(s.labels), float(s.value)))
    return out
