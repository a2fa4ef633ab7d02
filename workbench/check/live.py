"""Running aggregates of a drill for live displays: per-bin throughput, latency and the envelope.

The terminal progress line, the notebook widgets and the final report all draw from these series;
they never compute anything themselves.  Feeding a record is O(1); a snapshot is O(bins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from workbench.history import FaultRecord, RequestRecord

__all__ = ["Bin", "LiveStats"]

_MAX_LATENCY_US = 120_000_000


@dataclass
class Bin:
    """What was answered during one bin of the run clock, per home region."""

    admitted: dict[str, int] = field(default_factory=dict)
    admitted_tokens: int = 0
    denied: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, _MAX_LATENCY_US, 2))


class LiveStats:
    def __init__(self, regions: list[str], duration_s: float, rate: float, burst: float,
                 bin_s: float = 0.5) -> None:
        self.regions = list(regions)
        self.duration_s = duration_s
        self.rate = rate
        self.burst = burst
        self.bin_s = bin_s
        self.bins: list[Bin] = [Bin() for _ in range(math.ceil(duration_s / bin_s) + 40)]
        self.keys: set[str] = set()
        self.total = 0
        self.admitted_tokens = 0
        self.faults: list[FaultRecord] = []
        self.node_states: dict[str, str] = {}
        self.failovers: dict[str, float] = {}  # killed target -> ms to first success of its clients elsewhere
        self._killed: dict[str, tuple[float, set[str]]] = {}  # target -> (t_s, regions it stood for)

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
        elif rec.status == 429 or (rec.status == 200 and rec.allowed is False):
            b.denied[region] = b.denied.get(region, 0) + 1
        else:
            b.errors[region] = b.errors.get(region, 0) + 1
        if 0 < rec.status < 500:
            b.latency.record_value(max(1, min(_MAX_LATENCY_US - 1, int(rec.latency_ms * 1000))))
            self._note_failover(rec)

    def _note_failover(self, rec: RequestRecord) -> None:
        for target, (t_kill, regions) in list(self._killed.items()):
            if (rec.home_region in regions and rec.answered_region and rec.answered_region not in regions
                    and rec.start_s >= t_kill and target not in self.failovers):
                self.failovers[target] = max(0.0, (rec.end_s - t_kill) * 1000)

    def fault(self, rec: FaultRecord, regions: set[str] | None = None) -> None:
        self.faults.append(rec)
        if rec.action == "kill" and regions:
            self._killed[rec.target] = (rec.t_s, regions)
            self.failovers.pop(rec.target, None)

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
        """The last ``window_s`` seconds at a glance, for a progress line or a widget header."""
        first = max(0, int((t_s - window_s) / self.bin_s))
        last = min(len(self.bins), int(t_s / self.bin_s))
        span = max(self.bin_s, (last - first) * self.bin_s)
        window = self.bins[first:last]
        hist = HdrHistogram(1, _MAX_LATENCY_US, 2)
        for b in window:
            hist.add(b.latency)

        def rate(attr: str) -> float:
            return sum(sum(getattr(b, attr).values()) for b in window) / span

        return {
            "t_s": round(t_s, 2), "progress": min(1.0, t_s / self.duration_s) if self.duration_s else 1.0,
            "admitted_rps": round(rate("admitted"), 1), "denied_rps": round(rate("denied"), 1),
            "errors_rps": round(rate("errors"), 1), "total": self.total,
            "p50_ms": hist.get_value_at_percentile(50) / 1000 if hist.get_total_count() else None,
            "p99_ms": hist.get_value_at_percentile(99) / 1000 if hist.get_total_count() else None,
            "admitted_tokens": self.admitted_tokens, "envelope_tokens": round(self.envelope_tokens(t_s), 1),
            "node_states": dict(self.node_states), "faults": len(self.faults),
            "failover_ms": dict(self.failovers),
        }
