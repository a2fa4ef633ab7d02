"""What a load run is and what it produced: the plan (the scenario's LoadSpec plus run-time values)
and the merged result with its HDR histograms.  Requests are recorded as
:class:`workbench.history.RequestRecord`, the one request record of the whole workbench."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hdrh.histogram import HdrHistogram

from workbench.history.records import RequestRecord, rows_from_wire, rows_to_wire
from workbench.spec.parts import LoadSpec

__all__ = ["CLASSES", "HIST_MAX_US", "LoadPlan", "LoadResult", "status_class"]

HIST_MAX_US = 60_000_000  # histograms hold 1 µs .. 60 s, 3 significant digits
SHED_PHASES = ("pool", "wire", "resume")
CLASSES = ("2xx", "429", "4xx", "5xx", "error")


def _hist() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


def status_class(status: int) -> str:
    """``2xx``/``4xx``/``5xx`` by hundreds, ``429`` on its own (it is the limiter speaking), ``error``
    for no HTTP answer (status 0)."""
    if status == 0:
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


@dataclass(frozen=True)
class LoadPlan:
    """One generator run: the scenario's :class:`~workbench.spec.parts.LoadSpec` (the traffic shape:
    mode, rate, arrivals, users, think time, tenants, key distribution, cost, route, processes) and
    the values only known at run time (where to send, the API keys, the clock offset, the limits of
    this generator).  Defaults of the shape live in LoadSpec; the run-time defaults live here."""

    url: str  # base URL of the router or a node, e.g. "http://127.0.0.1:8100"
    load: LoadSpec = field(default_factory=LoadSpec)
    duration_s: float = 10.0  # hard bound on the sending window
    regions: tuple[str, ...] = ("local",)  # home regions, equally weighted, when load.region_weights is {}
    api_keys: Mapping[str, str] | None = None  # tenant -> bearer token (route "invoke")
    skill: str = "rating"  # the {skill} of /v1/skills/{skill}/invoke
    offset_s: float = 0.0  # open loop: first arrival time (staggers the processes of one run)
    max_requests: int = 0  # 0 = unbounded; otherwise stop after this many
    timeout_s: float = 5.0  # per request, total
    drain_s: float = 0.0  # after the window, wait this long for in-flight answers; 0 = timeout_s + 0.5 s
    connector_limit: int = 0  # 0 = automatic (see the generator's module docstring)
    warm_connections: int = 0  # lean client: connections opened before the clock starts (over all processes)
    max_inflight: int = 100_000  # open loop: past this, arrivals are recorded as errors, not sent
    lag_threshold_ms: float = 5.0  # scheduling lag p99 above this marks the run invalid
    seed: int = 0
    keep_records: bool = True  # False: records go to on_record only (histograms are always kept)

    def __post_init__(self) -> None:
        if not isinstance(self.load, LoadSpec):
            raise ValueError(f"load must be a workbench.spec.parts.LoadSpec, got {type(self.load).__name__}")
        if not self.duration_s > 0 or not self.timeout_s > 0 or self.max_requests < 0:
            raise ValueError("duration_s and timeout_s must be > 0 and max_requests >= 0")
        object.__setattr__(self, "regions", tuple(self.regions))
        if not self.load.region_weights and not self.regions:
            raise ValueError("regions must name at least one home region when load.region_weights is empty")
        if self.load.route == "invoke":
            if not self.api_keys:
                raise ValueError("route 'invoke' needs api_keys (tenant -> bearer token)")
            missing = [t for t in self.tenants if t not in self.api_keys]
            if missing:
                raise ValueError(f"api_keys has no token for tenants {missing[:5]}")

    @property
    def region_weights(self) -> dict[str, float]:
        """Home region -> weight: the spec's weights, or every region of ``regions`` equally."""
        return dict(self.load.region_weights) or dict.fromkeys(self.regions, 1.0)

    @property
    def tenants(self) -> tuple[str, ...]:
        """The limiter keys; index i is Zipf rank i."""
        return self.load.tenant_names()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a spawned generator process (the spec's read-only mappings do not pickle)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["load"] = {f.name: (dict(v) if isinstance(v := getattr(self.load, f.name), Mapping) else v)
                     for f in fields(self.load)}
        d["regions"] = list(self.regions)
        d["api_keys"] = dict(self.api_keys) if self.api_keys else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoadPlan:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown load plan keys {unknown}; expected some of {sorted(known)}")
        kw = dict(d)
        if isinstance(kw.get("load"), Mapping):
            kw["load"] = LoadSpec(**kw["load"])
        if "regions" in kw:
            kw["regions"] = tuple(kw["regions"])
        return cls(**kw)


@dataclass
class LoadResult:
    """Histograms (µs) per status class and of the generator's own lag, plus the records."""

    plan: LoadPlan
    t0: float  # run start on time.monotonic()
    elapsed_s: float = 0.0
    sent: int = 0
    records: list[RequestRecord] = field(default_factory=list)
    latency: dict[str, HdrHistogram] = field(default_factory=lambda: {c: _hist() for c in (*CLASSES, "all")})
    lag: HdrHistogram = field(default_factory=_hist)
    complete: bool = True  # False when stopped or cancelled before the end
    overflow: int = 0  # open-loop arrivals not sent because max_inflight was reached
    cut_at_end: int = 0  # sent, still unanswered when the generator stopped waiting (records say why)
    warmed: int = 0  # connections opened before the clock started (plan.warm_connections)
    late: int = 0  # sent more than plan.lag_threshold_ms after their intended time (open loop: behind schedule)
    procs: list[dict[str, float]] = field(default_factory=list)  # per generator process: cpu_s, rss_peak_mb
    # Where a 503's answer time went (lean client only, µs): waiting for a connection ("pool"), from the
    # write to the answer read in ("wire": the server, the kernel, our loop's delay in reading), and from
    # there until the request's task ran again ("resume": our loop's ready queue)
    shed_phases: dict[str, HdrHistogram] = field(default_factory=lambda: {p: _hist() for p in SHED_PHASES})

    @property
    def lag_p99_ms(self) -> float:
        return self.lag.get_value_at_percentile(99) / 1e3 if self.lag.get_total_count() else 0.0

    @property
    def valid(self) -> bool:
        """Whether the generator kept its schedule well enough for its figures to be trusted."""
        return not self.invalid_reasons

    @property
    def invalid_reasons(self) -> list[str]:
        reasons = []
        if self.lag_p99_ms > self.plan.lag_threshold_ms:
            reasons.append(f"generator lag p99 {self.lag_p99_ms:.2f} ms > {self.plan.lag_threshold_ms} ms")
        if self.overflow:
            reasons.append(f"{self.overflow} arrivals dropped at max_inflight={self.plan.max_inflight}")
        return reasons

    def percentiles_ms(self, cls: str = "all", pcts: Sequence[float] = (50, 95, 99, 99.9)) -> dict[str, float]:
        """Latency percentiles in ms (HDR: within 0.1 % of the recorded value)."""
        h = self.latency[cls]
        if not h.get_total_count():
            return {f"p{p:g}": float("nan") for p in pcts}
        return {f"p{p:g}": h.get_value_at_percentile(p) / 1e3 for p in pcts}

    def summary(self) -> dict[str, Any]:
        counts = {c: self.latency[c].get_total_count() for c in CLASSES}
        return {
            "sent": self.sent,
            "answered": sum(counts.values()) - counts["error"],
            "counts": counts,
            "elapsed_s": round(self.elapsed_s, 3),
            "throughput_rps": round(self.sent / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "latency_ms": self.percentiles_ms(),
            "lag_ms": {
                "p50": self.lag.get_value_at_percentile(50) / 1e3,
                "p99": self.lag_p99_ms,
                "max": self.lag.get_max_value() / 1e3,
            },
            "cut_at_end": self.cut_at_end,
            "late": self.late,
            "warmed_connections": self.warmed,
            "late_pct": round(100 * self.late / self.sent, 2) if self.sent else 0.0,
            "overflow": self.overflow,
            "processes": list(self.procs),
            "shed_phases_ms": {
                p: {f"p{q}": h.get_value_at_percentile(q) / 1e3 for q in (50, 95, 99)}
                for p, h in self.shed_phases.items() if h.get_total_count()
            },
            "complete": self.complete,
            "valid": self.valid,
            "invalid_reasons": self.invalid_reasons,
        }

    def add(self, rec: RequestRecord) -> None:
        us = min(max(int((rec.end_s - rec.intended_s) * 1e6), 1), HIST_MAX_US)
        self.latency[status_class(rec.status)].record_value(us)
        self.latency["all"].record_value(us)
        if self.plan.keep_records:
            self.records.append(rec)

    def merge(self, other: LoadResult) -> None:
        """Fold another process's result (same t0) into this one."""
        for c, h in other.latency.items():
            self.latency[c].add(h)
        self.lag.add(other.lag)
        for p, h in other.shed_phases.items():
            self.shed_phases[p].add(h)
        self.records.extend(other.records)
        self.sent += other.sent
        self.overflow += other.overflow
        self.cut_at_end += other.cut_at_end
        self.late += other.late
        self.warmed += other.warmed
        self.procs.extend(other.procs)
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.complete = self.complete and other.complete

    def to_wire(self) -> dict[str, Any]:
        """A compact picklable form for crossing a process boundary."""
        return {
            "t0": self.t0, "elapsed_s": self.elapsed_s, "sent": self.sent, "complete": self.complete,
            "overflow": self.overflow, "cut_at_end": self.cut_at_end, "late": self.late, "procs": self.procs,
            "warmed": self.warmed,
            "records": rows_to_wire(RequestRecord, self.records),
            "latency": {c: h.encode() for c, h in self.latency.items()}, "lag": self.lag.encode(),
            "shed_phases": {p: h.encode() for p, h in self.shed_phases.items()},
        }  # fmt: skip

    @classmethod
    def from_wire(cls, plan: LoadPlan, w: Mapping[str, Any]) -> LoadResult:
        res = cls(plan, w["t0"], w["elapsed_s"], w["sent"], rows_from_wire(RequestRecord, w["records"]))
        res.latency = {c: HdrHistogram.decode(e) for c, e in w["latency"].items()}
        res.lag = HdrHistogram.decode(w["lag"])
        for p, e in w.get("shed_phases", {}).items():
            res.shed_phases[p] = HdrHistogram.decode(e)
        res.complete, res.overflow, res.cut_at_end = w["complete"], w["overflow"], w["cut_at_end"]
        res.late, res.procs, res.warmed = w.get("late", 0), list(w.get("procs", [])), w.get("warmed", 0)
        return res

