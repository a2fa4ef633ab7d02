"""Overload figures of a recording: what an SRE reads to see an overload cascade coming.

Pure functions of a :class:`~workbench.history.Recording`: per-second offered / served / shed / error
series from the request records; in-flight and queue depth per process (the router and every node),
health-check latency per node and ejections with their reasons from the metrics the drill scraped
(``router_*`` and ``edge_*``, listed in docs/router.md).

Definitions (one place, the report and the benchmark use them):

* **offered**: requests by the second their schedule wanted them sent (``intended_s``), whatever
  became of them;
* **served**: 2xx answers (goodput), binned by ``intended_s`` too, so served <= offered in every bin;
* **shed**: a quick 503 from admission control, the router's (``router_overloaded``) or a node's
  (``overloaded``), answered without a skill call or a token;
* **limited**: 429 (the limiter answering, not an error);
* **errors**: everything else (status 0, other 5xx, other 4xx).

Counters are turned into per-interval increases between consecutive scrapes of one process; a drop
(a restarted process) counts its new value as the increase.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from workbench.history import MetricSample, Recording, RequestRecord

__all__ = [
    "SHED_CODES",
    "ejections",
    "health_check_latency",
    "inflight_series",
    "is_shed",
    "outcome",
    "overload_summary",
    "request_series",
    "shed_counters",
]

SHED_CODES = frozenset({"router_overloaded", "overloaded"})  # 503 error codes of admission control
ROUTER = "router"  # MetricSample.node of the router's samples (workbench.run.drill.ROUTER_SOURCE)

_INFLIGHT = {"router_inflight": ROUTER, "edge_inflight": ""}
_QUEUE = {"router_queue_depth": ROUTER, "edge_queue_depth": ""}


def is_shed(r: RequestRecord) -> bool:
    """A quick 503 of admission control (router or node)."""
    return r.status == 503 and r.error in SHED_CODES


def outcome(r: RequestRecord) -> str:
    """``served`` (2xx), ``shed``, ``limited`` (429) or ``error`` (anything else)."""
    if 200 <= r.status < 300:
        return "served"
    if is_shed(r):
        return "shed"
    if r.status == 429:
        return "limited"
    return "error"


def request_series(requests: Recording | Iterable[RequestRecord], bin_s: float = 1.0) -> dict[str, Any]:
    """Per ``bin_s`` bin of ``intended_s``: ``offered_rps``, ``served_rps``, ``shed_rps``,
    ``limited_rps`` and ``errors_rps`` (requests / s), ``t_s`` the bin starts."""
    if bin_s <= 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s!r}")
    rows = requests.requests if isinstance(requests, Recording) else list(requests)
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for r in rows:
        counts[max(0, int(r.intended_s // bin_s))][outcome(r)] += 1
    n = max(counts) + 1 if counts else 0
    out: dict[str, Any] = {"t_s": [round(i * bin_s, 6) for i in range(n)], "bin_s": bin_s}
    for kind in ("served", "shed", "limited", "error"):
        out["errors_rps" if kind == "error" else f"{kind}_rps"] = [counts[i][kind] / bin_s for i in range(n)]
    out["offered_rps"] = [sum(counts[i].values()) / bin_s for i in range(n)]
    return out


def _by_source(samples: Iterable[MetricSample], names: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    for m in sorted((m for m in samples if m.name in names), key=lambda m: m.t_s):
        row = out.setdefault(m.node, {"t_s": [], "value": []})
        row["t_s"].append(m.t_s)
        row["value"].append(m.value)
    return out


def inflight_series(rec: Recording) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{"inflight": {process: {"t_s", "value"}}, "queue": {...}}`` from the scraped gauges, the
    router under ``"router"`` and every node under its id."""
    return {"inflight": _by_source(rec.metrics, _INFLIGHT), "queue": _by_source(rec.metrics, _QUEUE)}


def _increases(samples: Iterable[MetricSample], name: str) -> list[tuple[float, str, dict[str, str], float]]:
    """``(t_s, process, labels, increase)`` of a counter between consecutive scrapes of one series;
    the first scrape of a series counts from zero (counters start at 0 with their process)."""
    last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    out = []
    for m in sorted((m for m in samples if m.name == name), key=lambda m: m.t_s):
        key = (m.node, tuple(sorted(m.labels.items())))
        prev = last.get(key, 0.0)
        delta = m.value - prev if m.value >= prev else m.value
        last[key] = m.value
        if delta > 0:
            out.append((m.t_s, m.node, m.labels, delta))
    return out


def ejections(rec: Recording) -> list[dict[str, Any]]:
    """Every ejection the router counted, and every one its cap refused, in time order:
    ``{"t_s", "node", "reason", "count", "refused"}``.  ``t_s`` is the scrape that first saw it
    (at most one scrape interval late)."""
    out = []
    for name, refused in (("router_ejections_total", False), ("router_ejections_refused_total", True)):
        for t_s, _src, labels, delta in _increases(rec.metrics, name):
            out.append({"t_s": round(t_s, 3), "node": labels.get("node", ""), "reason": labels.get("reason", ""),
                        "count": round(delta), "refused": refused})
    return sorted(out, key=lambda e: (e["t_s"], e["node"], e["reason"]))


def shed_counters(rec: Recording) -> dict[str, dict[str, Any]]:
    """Per process, the sheds its admission gate counted (``*_overload_shed_total``), by reason:
    ``{process: {"total": n, "reasons": {reason: n}}}`` (the last scrape of each series)."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("router_overload_shed_total", "edge_overload_shed_total"):
        for _t, src, labels, delta in _increases(rec.metrics, name):
            row = out.setdefault(src, {"total": 0, "reasons": {}})
            reason = labels.get("reason", "")
            row["reasons"][reason] = row["reasons"].get(reason, 0) + round(delta)
            row["total"] += round(delta)
    return out


def health_check_latency(rec: Recording) -> dict[str, dict[str, list[float]]]:
    """Per node, the mean latency (ms) of the router's active checks between consecutive scrapes,
    from ``router_health_check_seconds`` ``_sum`` / ``_count``: ``{node: {"t_s", "mean_ms"}}``."""
    sums: dict[tuple[str, float], float] = {}
    for t_s, _src, labels, delta in _increases(rec.metrics, "router_health_check_seconds_sum"):
        sums[(labels.get("node", ""), t_s)] = delta
    out: dict[str, dict[str, list[float]]] = {}
    for t_s, _src, labels, delta in _increases(rec.metrics, "router_health_check_seconds_count"):
        node = labels.get("node", "")
        total = sums.get((node, t_s))
        if total is None or delta <= 0:
            continue
        row = out.setdefault(node, {"t_s": [], "mean_ms": []})
        row["t_s"].append(t_s)
        row["mean_ms"].append(round(total / delta * 1000, 3))
    return out


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[max(0, math.ceil(0.95 * len(values)) - 1)]


def overload_summary(rec: Recording) -> dict[str, Any]:
    """Totals of a run under load: requests by outcome, other errors by status, P95 (nearest rank)
    of served requests, peak in-flight / queue per process, ejections by reason, panic seen."""
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
    gauges = inflight_series(rec)
    ej = ejections(rec)
    reasons: Counter[str] = Counter()
    for e in ej:
        if not e["refused"]:
            reasons[e["reason"]] += e["count"]
    p95 = _p95(served_ms)
    return {
        "requests": sum(kinds.values()), "served": kinds["served"], "shed": kinds["shed"],
        "limited": kinds["limited"], "errors": kinds["error"], "errors_by_status": dict(sorted(statuses.items())),
        "no_healthy_region": no_healthy,
        "served_p95_ms": None if p95 is None else round(p95, 3),
        "peak_inflight": {p: max(s["value"]) for p, s in gauges["inflight"].items()},
        "peak_queue": {p: max(s["value"]) for p, s in gauges["queue"].items()},
        "ejections_by_reason": dict(sorted(reasons.items())),
        "ejections_refused": sum(e["count"] for e in ej if e["refused"]),
        "panic_seen": any(m.name == "router_panic" and m.value > 0 for m in rec.metrics),
        "shed_counted": shed_counters(rec),
    }
