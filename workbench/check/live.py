"""Running aggregates of a drill for live displays: per-bin throughput, latency, errors, failover, overload.

The terminal progress line, the notebook widgets and the final report all draw from these series;
they never compute anything themselves.  The figures that the verdict also reports come from the
verdict's own code, fed incrementally: failover from the same :class:`FailoverTracker`, errors from
the same :func:`is_error` and :func:`error_budget_state`, latency over every request, errors included.
So the progress line cannot contradict the final verdict.  Feeding a record is O(1) (O(outages) while
an outage holds); a snapshot is O(bins) plus the failover figures.

Overload: every answer is also binned by its outcome (``workbench.check.overload.outcome``: served,
shed, limited, error, cut), the generator's count of sent requests gives the offered rate
(:meth:`LiveStats.sent`, by the time they were sent, not answered), and each metrics scrape of the
router and the nodes goes to the same :class:`~workbench.check.overload.OverloadTracker` the report
uses (:meth:`LiveStats.metrics`): in-flight and queue depth per process, health-check latency per
node, ejections with their reasons, the router's panic; and the router's sampled routing table
(:meth:`LiveStats.router_state`) says which nodes are out of its rotation and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from workbench.check.errors import DEFAULT_ERROR_BUDGET_PCT, error_budget_state, is_error
from workbench.check.failover import DEFAULT_STALL_S, FailoverTracker
from workbench.check.overload import ROUTER, OverloadTracker, outcome, rotation_state
from workbench.history import FaultRecord, MetricSample, RequestRecord, RouterSample
from workbench.spec.scenario import Topology

__all__ = ["Bin", "LiveStats"]

_MAX_LATENCY_US = 120_000_000
FAILOVER_REFRESH_S = 1.0  # a snapshot's failover figures are at most this old (run clock)
GAUGE_STALE_S = 2.5  # a process gauge is drawn this long after its last scrape, then left as a gap
OUTCOMES = ("served", "shed", "limited", "error", "cut")


@dataclass
class Bin:
    """What was answered during one bin of the run clock, per home region."""

    admitted: dict[str, int] = field(default_factory=dict)
    admitted_tokens: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, _MAX_LATENCY_US, 2))
    outcomes: dict[str, int] = field(default_factory=dict)  # every region, by overload.outcome
    offered: int = 0  # requests the generator sent (or dropped at max_inflight) during the bin


class LiveStats:
    """Everything a live display shows, fed one request / fault at a time.

    ``topology`` names the nodes behind each region (for the failover tracker); without it every
    region is taken to have one node, ``<region>-1``.
    """

    def __init__(self, regions: list[str], duration_s: float, rate: float, burst: float,
                 bin_s: float = 0.5, *, topology: Topology | None = None,
                 error_budget_pct: float = DEFAULT_ERROR_BUDGET_PCT, stall_s: float = DEFAULT_STALL_S) -> None:
        self.regions = list(regions)
        self.duration_s = duration_s
        self.rate = rate
        self.burst = burst
        self.bin_s = bin_s
        self.error_budget_pct = error_budget_pct
        self.bins: list[Bin] = [Bin() for _ in range(math.ceil(duration_s / bin_s) + 40)]
        self.keys: set[str] = set()
        self.total = 0
        self.error_count = 0
        self.cut_count = 0  # cut off by the run's end: not judged (see workbench.check.errors)
        self.overload = OverloadTracker()
        self._sent = 0  # the generator's count at the last sent() call
        self.rotation: dict[str, str] = {}  # node -> rotation_state() in the router's latest routing table
        self.admitted_tokens = 0
        self.faults: list[FaultRecord] = []
        self.node_states: dict[str, str] = {}
        if topology is None:
            topology = Topology(dict.fromkeys(self.regions or ["local"], 1))
        self.tracker = FailoverTracker(topology, stall_s=stall_s)
        self.failovers: dict[str, float] = {}  # outage target -> ms until its last served client so far
        self._failover: dict[str, Any] | None = None  # the figures as of _failover_t_s (run clock)
        self._failover_t_s = -math.inf

    def _bin(self, t_s: float) -> Bin:
        index = max(0, int(t_s / self.bin_s))
        while index >= len(self.bins):
            self.bins.append(Bin())
        return self.bins[index]

    def add(self, rec: RequestRecord) -> None:
        b = self._bin(rec.end_s)
        self.total += 1
        self.keys.add(rec.key)
        region = rec.home_region
        kind = outcome(rec)
        b.outcomes[kind] = b.outcomes.get(kind, 0) + 1
        if rec.admitted:
            b.admitted[region] = b.admitted.get(region, 0) + 1
            b.admitted_tokens += rec.cost
            self.admitted_tokens += rec.cost
        elif kind == "cut":
            self.cut_count += 1
        elif not is_error(rec):
            b.denied[region] = b.denied.get(region, 0) + 1
        else:
            b.errors[region] = b.errors.get(region, 0) + 1
            self.error_count += 1
        # every request, errors and timeouts included, at the time it took (as the verdict counts it)
        b.latency.record_value(max(1, min(_MAX_LATENCY_US - 1, int(rec.latency_ms * 1000))))
        self.tracker.request(rec)

    def sent(self, t_s: float, total: int) -> None:
        """The generator's running count of requests sent (and arrivals dropped) at ``t_s``: what was
        offered since the previous call goes to the bin of ``t_s``."""
        if total > self._sent:
            self._bin(t_s).offered += total - self._sent
            self._sent = total

    def metrics(self, samples: list[MetricSample]) -> None:
        """One scrape of a process's /metrics (the router's or a node's), in time order."""
        self.overload.extend(samples)

    def router_state(self, sample: RouterSample) -> None:
        """The router's routing table as just sampled."""
        self.rotation = {node: rotation_state(view) for node, view in sample.nodes.items()}

    @property
    def ejections(self) -> list[dict[str, Any]]:
        """Every ejection (and refused ejection) the router counted so far, with its reason."""
        return self.overload.ejections

    def fault(self, rec: FaultRecord, regions: set[str] | None = None) -> None:
        """Record an applied fault (``regions`` is accepted for older callers and not needed)."""
        self.faults.append(rec)
        self.tracker.fault(rec)

    def failover_figures(self) -> dict[str, Any]:
        """The verdict's failover figures over what has been seen so far."""
        figures = self.tracker.figures()
        self.failovers = {o["target"]: o["max_ms"] for o in figures["outages"] if o["max_ms"] is not None}
        self._failover = figures
        return figures

    def _failover_at(self, t_s: float) -> dict[str, Any]:
        """The failover figures for a snapshot, recomputed at most once per second of the run clock:
        they cost O(requests since the first outage), and a progress line redraws several times a second."""
        if self._failover is None or not 0 <= t_s - self._failover_t_s < FAILOVER_REFRESH_S:
            self._failover_t_s = t_s
            return self.failover_figures()
        return self._failover

    def error_figures(self) -> dict[str, Any]:
        judged = self.total - self.cut_count
        within, rate, allowed = error_budget_state(self.error_count, judged, self.error_budget_pct)
        return {"total": self.error_count, "requests": self.total, "judged": judged, "cut_at_end": self.cut_count,
                "rate_pct": rate, "allowed": allowed, "budget_pct": self.error_budget_pct, "within_budget": within}

    def envelope_tokens(self, t_s: float) -> float:
        """What the limit allows up to ``t_s`` over every key seen: Σ (B + R·t)."""
        return max(1, len(self.keys)) * (self.burst + self.rate * max(0.0, t_s))

    def series(self, upto_s: float) -> dict[str, Any]:
        """Per-bin rates (per second) and cumulative tokens up to ``upto_s``, for charts."""
        n = min(len(self.bins), int(upto_s / self.bin_s) + 1)
        t = [round((i + 1) * self.bin_s, 3) for i in range(n)]
        per = 1.0 / self.bin_s
        out: dict[str, Any] = {"t_s": t, "admitted_rps": {}, "denied_rps": {}, "errors_rps": {}}
        for region in self.regions:
            out["admitted_rps"][region] = [self.bins[i].admitted.get(region, 0) * per for i in range(n)]
            out["denied_rps"][region] = [self.bins[i].denied.get(region, 0) * per for i in range(n)]
            out["errors_rps"][region] = [self.bins[i].errors.get(region, 0) * per for i in range(n)]
        cumulative, acc = [], 0
        for i in range(n):
            acc += self.bins[i].admitted_tokens
            cumulative.append(acc)
        out["admitted_tokens"] = cumulative
        out["envelope_tokens"] = [self.envelope_tokens(x) for x in t]
        for pct in (50, 95, 99):
            out[f"p{pct}_ms"] = [
                (self.bins[i].latency.get_value_at_percentile(pct) / 1000
                 if self.bins[i].latency.get_total_count() else None) for i in range(n)]
        out.update(self.overload_series(n))
        return out

    def overload_series(self, n: int) -> dict[str, Any]:
        """The first ``n`` bins of the overload figures: ``offered_rps`` (by send time), ``served_rps``,
        ``shed_rps``, ``limited_rps``, ``other_errors_rps`` (errors that are not sheds), ``cut_rps``
        (by answer time), and per process the last ``inflight`` / ``queue`` gauge and per node the
        ``health_check_ms`` scraped by each bin's end (None when not scraped for ``GAUGE_STALE_S``)."""
        per = 1.0 / self.bin_s
        bins = self.bins[:n]
        out: dict[str, Any] = {"offered_rps": [b.offered * per for b in bins]}
        for kind in OUTCOMES:
            name = "other_errors_rps" if kind == "error" else f"{kind}_rps"
            out[name] = [b.outcomes.get(kind, 0) * per for b in bins]
        ends = [(i + 1) * self.bin_s for i in range(n)]
        gauges = self.overload.gauges
        out["processes"] = {kind: {p: _at_bin_ends(row["t_s"], row["value"], ends) for p, row in rows.items()}
                            for kind, rows in gauges.items()}
        out["health_check_ms"] = {node: _at_bin_ends(row["t_s"], row["mean_ms"], ends)
                                  for node, row in self.overload.health.items()}
        return out

    def snapshot(self, t_s: float, window_s: float = 1.0) -> dict[str, Any]:
        """The last ``window_s`` seconds at a glance, plus the run's failover and error figures."""
        first = max(0, int((t_s - window_s) / self.bin_s))
        last = min(len(self.bins), int(t_s / self.bin_s))
        span = max(self.bin_s, (last - first) * self.bin_s)
        window = self.bins[first:last]
        hist = HdrHistogram(1, _MAX_LATENCY_US, 2)
        for b in window:
            hist.add(b.latency)

        def rate(attr: str) -> float:
            return sum(sum(getattr(b, attr).values()) for b in window) / span

        fo = self._failover_at(t_s)

        def outcomes(kind: str) -> float:
            return round(sum(b.outcomes.get(kind, 0) for b in window) / span, 1)

        gauges = self.overload.gauges
        router = {kind: (gauges[kind][ROUTER]["value"][-1] if ROUTER in gauges[kind] else None)
                  for kind in ("inflight", "queue")}
        return {
            "t_s": round(t_s, 2), "progress": min(1.0, t_s / self.duration_s) if self.duration_s else 1.0,
            "admitted_rps": round(rate("admitted"), 1), "denied_rps": round(rate("denied"), 1),
            "errors_rps": round(rate("errors"), 1), "total": self.total,
            "p50_ms": hist.get_value_at_percentile(50) / 1000 if hist.get_total_count() else None,
            "p99_ms": hist.get_value_at_percentile(99) / 1000 if hist.get_total_count() else None,
            "admitted_tokens": self.admitted_tokens, "envelope_tokens": round(self.envelope_tokens(t_s), 1),
            "node_states": dict(self.node_states), "faults": len(self.faults),
            "failover_ms": dict(self.failovers),
            "failover": {k: fo[k] for k in ("p50", "p99", "max", "clients", "unserved_clients",
                                            "failed_requests", "stalled_requests")},
            "errors": self.error_figures(),
            "offered_rps": round(sum(b.offered for b in window) / span, 1), "served_rps": outcomes("served"),
            "shed_rps": outcomes("shed"), "other_errors_rps": outcomes("error"),
            "router": {**router, "panic": self.overload.panic},
            "ejections": sum(e["count"] for e in self.overload.ejections if not e["refused"]),
            "out_of_rotation": {n: st for n, st in self.rotation.items() if st != "in rotation"},
        }


def _at_bin_ends(t_s: list[float], values: list[float], ends: list[float]) -> list[float | None]:
    """Per bin end, the last value sampled at or before it, or None when none was sampled within
    ``GAUGE_STALE_S`` (a killed or paused process is not scraped: its last value must not linger)."""
    out: list[float | None] = []
    j, last, last_t = 0, None, -math.inf
    for end in ends:
        while j < len(t_s) and t_s[j] <= end + 1e-9:
            last, last_t = values[j], t_s[j]
            j += 1
        out.append(last if end - last_t <= GAUGE_STALE_S else None)
    return out
