"""Overload figures of a recording: what an SRE reads to see an overload cascade coming.

Pure functions of a :class:`~workbench.history.Recording` (the process figures through
:class:`OverloadTracker`, which the live view feeds one scrape at a time): per-second offered / served / shed / error
series from the request records; in-flight and queue depth per process (the router and every node),
health-check latency per node and ejections with their reasons from the metrics the drill scraped
(``router_*`` and ``edge_*``, listed in docs/router.md); which nodes were in the router's rotation,
and why not, from its sampled routing table (:class:`~workbench.history.RouterSample`).

Definitions (one place, the report and the benchmark use them):

* **offered**: requests by the second their schedule wanted them sent (``intended_s``), whatever
  became of them;
* **served**: 2xx answers (goodput), binned by ``intended_s`` too, so served <= offered in every bin;
* **shed**: a quick 503 from admission control, the router's (``router_overloaded``) or a node's
  (``overloaded``), answered without a skill call or a token;
* **limited**: 429 (the limiter answering, not an error);
* **cut**: still in flight when the generator stopped waiting at the run's end (no verdict);
* **errors**: everything else (status 0, other 5xx, other 4xx).

Counters are turned into per-interval increases between consecutive scrapes of one process; a drop
(a restarted process) counts its new value as the increase.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from workbench.history import MetricSample, Recording, RequestRecord, RouterSample

__all__ = [
    "ON_ARRIVAL_SHEDS",
    "SHED_CODES",
    "OverloadTracker",
    "ejections",
    "health_check_latency",
    "inflight_series",
    "is_shed",
    "outcome",
    "overload_summary",
    "request_series",
    "rotation_intervals",
    "rotation_state",
    "shed_counters",
    "shed_wait",
    "tracker_for",
]

SHED_CODES = frozenset({"router_overloaded", "overloaded"})  # 503 error codes of admission control
ROUTER = "router"  # MetricSample.node of the router's samples (workbench.run.drill.ROUTER_SOURCE)

_GAUGES = {"router_inflight": "inflight", "edge_inflight": "inflight",
           "router_queue_depth": "queue", "edge_queue_depth": "queue"}
_EJECTIONS = {"router_ejections_total": False, "router_ejections_refused_total": True}  # name -> refused
_SHEDS = ("router_overload_shed_total", "edge_overload_shed_total")
_CHECK_SUM, _CHECK_COUNT = "router_health_check_seconds_sum", "router_health_check_seconds_count"
_COUNTERS = frozenset({*_EJECTIONS, *_SHEDS, _CHECK_SUM, _CHECK_COUNT})


def is_shed(r: RequestRecord) -> bool:
    """A quick 503 of admission control (router or node)."""
    return r.status == 503 and r.error in SHED_CODES


# Shed reasons (X-Edge-Shed) of a request refused on arrival: the quick 503s for the excess.  Every other
# reason waited by design first -- a queue's deadline (queue_timeout), a connect while the router's loop
# lagged (loop_lag), a request that reached its node past its deadline (deadline) -- so its answer time
# is that wait, not the shedding's.
ON_ARRIVAL_SHEDS = frozenset({"queue_full", "queue_stalled"})


def shed_wait(r: RequestRecord) -> str:
    """``on_arrival`` (refused as it came), ``after_wait`` (shed after a wait by design) or ``unknown`` (no
    X-Edge-Shed recorded) for a shed; ``""`` for anything else."""
    if not is_shed(r):
        return ""
    if r.shed in ON_ARRIVAL_SHEDS:
        return "on_arrival"
    return "after_wait" if r.shed else "unknown"


def outcome(r: RequestRecord) -> str:
    """``served`` (2xx), ``shed``, ``limited`` (429), ``cut`` (cut off by the run's end: no verdict)
    or ``error`` (anything else)."""
    if 200 <= r.status < 300:
        return "served"
    if is_shed(r):
        return "shed"
    if r.status == 429:
        return "limited"
    if r.cut_at_end:
        return "cut"
    return "error"


def request_series(requests: Recording | Iterable[RequestRecord], bin_s: float = 1.0) -> dict[str, Any]:
    """Per ``bin_s`` bin of ``intended_s``: ``offered_rps``, ``served_rps``, ``shed_rps``,
    ``limited_rps``, ``errors_rps`` and ``cut_rps`` (requests / s), ``t_s`` the bin starts."""
    if bin_s <= 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s!r}")
    rows = requests.requests if isinstance(requests, Recording) else list(requests)
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for r in rows:
        counts[max(0, int(r.intended_s // bin_s))][outcome(r)] += 1
    n = max(counts) + 1 if counts else 0
    out: dict[str, Any] = {"t_s": [round(i * bin_s, 6) for i in range(n)], "bin_s": bin_s}
    for kind in ("served", "shed", "limited", "error", "cut"):
        out["errors_rps" if kind == "error" else f"{kind}_rps"] = [counts[i][kind] / bin_s for i in range(n)]
    out["offered_rps"] = [sum(counts[i].values()) / bin_s for i in range(n)]
    return out


class OverloadTracker:
    """The processes' overload figures, fed one scraped :class:`MetricSample` at a time.

    Samples of one series must come in time order (the drill's scrapes do; :func:`tracker_for` sorts a
    recording's).  The live view feeds it each scrape as it lands and the report feeds it the whole
    recording, so both show the same figures.  Feeding is O(1); only overload samples are looked at.

    * ``gauges``: ``{"inflight" | "queue": {process: {"t_s", "value"}}}``, the router under ``"router"``;
    * ``ejections``: ``{"t_s", "node", "reason", "count", "refused"}`` per counter increase;
    * ``health``: per node the mean active-check latency between scrapes, ``{"t_s", "mean_ms"}``;
    * ``sheds``: per process the sheds its gate counted, ``{"total", "reasons": {reason: n}}``;
    * ``panic``: the last ``router_panic`` value, and ``panic_seen`` whether it was ever 1.
    """

    def __init__(self) -> None:
        self.gauges: dict[str, dict[str, dict[str, list[float]]]] = {"inflight": {}, "queue": {}}
        self.ejections: list[dict[str, Any]] = []
        self.health: dict[str, dict[str, list[float]]] = {}
        self.sheds: dict[str, dict[str, Any]] = {}
        self.panic = False
        self.panic_seen = False
        self._last: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        self._check: dict[tuple[str, float], dict[str, float]] = {}  # (node, t_s) -> the half seen so far

    def add(self, m: MetricSample) -> None:
        kind = _GAUGES.get(m.name)
        if kind is not None:
            row = self.gauges[kind].setdefault(m.node, {"t_s": [], "value": []})
            row["t_s"].append(m.t_s)
            row["value"].append(m.value)
        elif m.name == "router_panic":
            self.panic = m.value > 0
            self.panic_seen = self.panic_seen or self.panic
        elif m.name in _COUNTERS:
            delta = self._increase(m)
            if delta > 0:
                self._counted(m, delta)

    def extend(self, samples: Iterable[MetricSample]) -> OverloadTracker:
        for m in samples:
            self.add(m)
        return self

    def _increase(self, m: MetricSample) -> float:
        """The counter's increase since the previous scrape of its series; the first scrape counts
        from zero (counters start at 0 with their process), a drop (a restart) counts its new value."""
        key = (m.name, m.node, tuple(sorted(m.labels.items())))
        prev = self._last.get(key, 0.0)
        self._last[key] = m.value
        return m.value - prev if m.value >= prev else m.value

    def _counted(self, m: MetricSample, delta: float) -> None:
        if m.name in _EJECTIONS:
            self.ejections.append({"t_s": round(m.t_s, 3), "node": m.labels.get("node", ""),
                                   "reason": m.labels.get("reason", ""), "count": round(delta),
                                   "refused": _EJECTIONS[m.name]})
        elif m.name in _SHEDS:
            row = self.sheds.setdefault(m.node, {"total": 0, "reasons": {}})
            reason = m.labels.get("reason", "")
            row["reasons"][reason] = row["reasons"].get(reason, 0) + round(delta)
            row["total"] += round(delta)
        else:  # the two halves of a health-check histogram of one scrape, in either order
            node = m.labels.get("node", "")
            half = self._check.setdefault((node, m.t_s), {})
            half["sum" if m.name == _CHECK_SUM else "count"] = delta
            if len(half) == 2:
                del self._check[(node, m.t_s)]
                row = self.health.setdefault(node, {"t_s": [], "mean_ms": []})
                row["t_s"].append(m.t_s)
                row["mean_ms"].append(round(half["sum"] / half["count"] * 1000, 3))
            elif len(self._check) > 10_000:  # halves never matched (a torn scrape): keep memory bounded
                self._check.clear()

    def sorted_ejections(self) -> list[dict[str, Any]]:
        return sorted(self.ejections, key=lambda e: (e["t_s"], e["node"], e["reason"]))


def tracker_for(rec: Recording) -> OverloadTracker:
    """A tracker fed every metric sample of ``rec`` in time order (stable: a scrape keeps its order)."""
    return OverloadTracker().extend(sorted(rec.metrics, key=lambda m: m.t_s))


def inflight_series(rec: Recording) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{"inflight": {process: {"t_s", "value"}}, "queue": {...}}`` from the scraped gauges, the
    router under ``"router"`` and every node under its id."""
    return tracker_for(rec).gauges


def ejections(rec: Recording) -> list[dict[str, Any]]:
    """Every ejection the router counted, and every one its cap refused, in time order:
    ``{"t_s", "node", "reason", "count", "refused"}``.  ``t_s`` is the scrape that first saw it
    (at most one scrape interval late)."""
    return tracker_for(rec).sorted_ejections()


def shed_counters(rec: Recording) -> dict[str, dict[str, Any]]:
    """Per process, the sheds its admission gate counted (``*_overload_shed_total``), by reason:
    ``{process: {"total": n, "reasons": {reason: n}}}`` (the last scrape of each series)."""
    return tracker_for(rec).sheds


def health_check_latency(rec: Recording) -> dict[str, dict[str, list[float]]]:
    """Per node, the mean latency (ms) of the router's active checks between consecutive scrapes,
    from ``router_health_check_seconds`` ``_sum`` / ``_count``: ``{node: {"t_s", "mean_ms"}}``."""
    return tracker_for(rec).health


def rotation_state(node: dict[str, Any]) -> str:
    """A node's state in one :class:`RouterSample`: ``in rotation`` or ``out: <evidence or reason>``."""
    if node.get("usable"):
        return "in rotation"
    return f"out: {node.get('evidence') or node.get('reason') or 'no reason given'}"


def rotation_intervals(samples: Iterable[RouterSample], end_s: float) -> dict[str, list[tuple[float, float, str]]]:
    """Per node, the spans of its state in the router's routing table (:func:`rotation_state`), from
    one sample to the next change; the last span runs to ``end_s``.  Before the first sample nothing
    is known (no span)."""
    spans: dict[str, list[tuple[float, float, str]]] = {}
    current: dict[str, tuple[float, str]] = {}
    for sample in sorted(samples, key=lambda x: x.t_s):
        for node, view in sample.nodes.items():
            state = rotation_state(view)
            since = current.get(node)
            if since is None:
                current[node] = (sample.t_s, state)
            elif since[1] != state:
                spans.setdefault(node, []).append((since[0], sample.t_s, since[1]))
                current[node] = (sample.t_s, state)
    for node, (since, state) in current.items():
        spans.setdefault(node, []).append((since, max(since, end_s), state))
    return spans


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(0.95 * len(values)) - 1)]


def overload_summary(rec: Recording) -> dict[str, Any]:
    """Totals of a run under load: requests by outcome, other errors by status, P95 (nearest rank)
    of served requests, peak in-flight / queue per process, ejections by reason, panic seen, the most
    nodes out of the router's rotation at one sample (None: the routing table was never sampled)."""
    kinds: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    no_healthy = 0
    served_ms = []
    for r in rec.requests:
        kind = outcome(r)
        kinds[kind] += 1
        if kind == "served":
            served_ms.append(r.latency_ms)
        elif kind == "error":
            statuses[str(r.status)] += 1
        if r.error == "no_healthy_region":
            no_healthy += 1
    tracker = tracker_for(rec)
    gauges = tracker.gauges
    ej = tracker.sorted_ejections()
    reasons: Counter[str] = Counter()
    for e in ej:
        if not e["refused"]:
            reasons[e["reason"]] += e["count"]
    p95 = _p95(served_ms)
    return {
        "requests": sum(kinds.values()), "served": kinds["served"], "shed": kinds["shed"],
        "limited": kinds["limited"], "errors": kinds["error"], "cut_at_end": kinds["cut"],
        "errors_by_status": dict(sorted(statuses.items())),
        "no_healthy_region": no_healthy,
        "served_p95_ms": None if p95 is None else round(p95, 3),
        "peak_inflight": {p: max(s["value"]) for p, s in gauges["inflight"].items()},
        "peak_queue": {p: max(s["value"]) for p, s in gauges["queue"].items()},
        "ejections_by_reason": dict(sorted(reasons.items())),
        "ejections_refused": sum(e["count"] for e in ej if e["refused"]),
        "panic_seen": tracker.panic_seen,
        "most_out_of_rotation": max((sum(1 for v in x.nodes.values() if not v.get("usable")) for x in rec.routers),
                                    default=None),
        "shed_counted": tracker.sheds,
    }
