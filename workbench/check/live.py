"""Running aggregates of a drill for live displays: per-bin throughput, latency, errors, failover.

The terminal progress line, the notebook widgets and the final report all draw from these series;
they never compute anything themselves.  The figures that the verdict also reports come from the
verdict's own code, fed incrementally: failover from the same :class:`FailoverTracker`, errors from
the same :func:`is_error` and :func:`error_budget_state`, latency over every request, errors included.
So the progress line cannot contradict the final verdict.  Feeding a record is O(1) (O(outages) while
an outage holds); a snapshot is O(bins) plus the failover figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from workbench.check.errors import DEFAULT_ERROR_BUDGET_PCT, error_budget_state, is_error
from workbench.check.failover import DEFAULT_STALL_S, FailoverTracker
from workbench.history import FaultRecord, RequestRecord
from workbench.spec.scenario import Topology

__all__ = ["Bin", "LiveStats"]

_MAX_LATENCY_US = 120_000_000
FAILOVER_REFRESH_S = 1.0  # a snapshot's failover figures are at most this old (run clock)


@dataclass
class Bin:
    """What was answered during one bin of the run clock, per home region."""

    admitted: dict[str, int] = field(default_factory=dict)
    admitted_tokens: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, _MAX_LATENCY_US, 2))


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
        if rec.admitted:
            b.admitted[region] = b.admitted.get(region, 0) + 1
            b.admitted_tokens += rec.cost
            self.admitted_tokens += rec.cost
        elif not is_error(rec):
            b.denied[region] = b.denied.get(region, 0) + 1
        else:
            b.errors[region] = b.errors.get(region, 0) + 1
            self.error_count += 1
        # every request, errors and timeouts included, at the time it took (as the verdict counts it)
        b.latency.record_value(max(1, min(_MAX_LATENCY_US - 1, int(rec.latency_ms * 1000))))
        self.tracker.request(rec)

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
        within, rate, allowed = error_budget_state(self.error_count, self.total, self.error_budget_pct)
        return {"total": self.error_count, "requests": self.total, "rate_pct": rate, "allowed": allowed,
                "budget_pct": self.error_budget_pct, "within_budget": within}

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
        }
