"""What a load run is and what it produced: the spec, one record per request, the merged result with
its HDR histograms.  Plain data, shared by the generator, its worker processes and the recorder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = ["CLASSES", "HIST_MAX_US", "LoadResult", "LoadSpec", "RequestRecord", "status_class"]

HIST_MAX_US = 60_000_000  # histograms hold 1 µs .. 60 s, 3 significant digits
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
class LoadSpec:
    """What to send, how fast and for how long. Defaults live here and nowhere else."""

    url: str  # base URL of the router or a node, e.g. "http://127.0.0.1:8100"
    mode: str = "open"  # "open" (arrival rate) or "closed" (users with think time)
    rate_rps: float = 100.0  # open loop: total arrival rate
    arrival: str = "constant"  # open loop: "constant" spacing or "poisson" arrivals
    offset_s: float = 0.0  # open loop: first arrival time (staggers the processes of one run)
    users: int = 10  # closed loop: concurrent users
    think_time_s: float = 0.0  # closed loop: pause after each answer (exponential when think_random)
    think_random: bool = False
    duration_s: float = 10.0  # hard bound on the sending window
    max_requests: int = 0  # 0 = unbounded; otherwise stop after this many
    regions: Mapping[str, float] = field(default_factory=lambda: {"local": 1.0})  # home region -> weight
    tenants: Sequence[str] = ("tenant-0",)  # limiter keys; index i is Zipf rank i
    key_dist: str = "uniform"  # "uniform" or "zipf"
    zipf_s: float = 1.1  # Zipf exponent: P(rank i) ~ 1 / (i + 1) ** s
    api_keys: Mapping[str, str] | None = None  # tenant -> bearer token (route "invoke")
    route: str = "check"  # "check": POST /v1/limits/check; "invoke": POST /v1/skills/{skill}/invoke
    skill: str = "rating"
    cost: int = 1
    timeout_s: float = 5.0  # per request, total
    drain_s: float = 0.0  # after the window, wait for in-flight answers; 0 = timeout_s
    connector_limit: int = 0  # 0 = automatic (see the module docstring)
    max_inflight: int = 100_000  # open loop: past this, arrivals are recorded as errors, not sent
    lag_threshold_ms: float = 5.0  # scheduling lag p99 above this marks the run invalid
    seed: int = 0
    processes: int = 1  # >1: that many generator processes, each at rate/N, merged
    keep_records: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode must be 'open' or 'closed', got {self.mode!r}")
        if self.arrival not in ("constant", "poisson"):
            raise ValueError(f"arrival must be 'constant' or 'poisson', got {self.arrival!r}")
        if self.key_dist not in ("uniform", "zipf"):
            raise ValueError(f"key_dist must be 'uniform' or 'zipf', got {self.key_dist!r}")
        if self.route not in ("check", "invoke"):
            raise ValueError(f"route must be 'check' or 'invoke', got {self.route!r}")
        if self.mode == "open" and self.rate_rps <= 0:
            raise ValueError(f"rate_rps must be > 0, got {self.rate_rps}")
        if self.mode == "closed" and self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if self.duration_s <= 0 or self.timeout_s <= 0 or self.processes < 1 or self.cost < 1:
            raise ValueError("duration_s, timeout_s must be > 0; processes, cost must be >= 1")
        if not self.tenants or not self.regions or min(self.regions.values()) < 0 or not sum(self.regions.values()):
            raise ValueError("tenants and regions must be non-empty; region weights >= 0 with a positive sum")
        if self.route == "invoke" and not self.api_keys:
            raise ValueError("route 'invoke' needs api_keys (tenant -> bearer token)")
        missing = [t for t in self.tenants if self.route == "invoke" and t not in (self.api_keys or {})]
        if missing:
            raise ValueError(f"api_keys has no token for tenants {missing[:5]}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["regions"], d["tenants"] = dict(self.regions), list(self.tenants)
        d["api_keys"] = dict(self.api_keys) if self.api_keys else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoadSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown load keys {unknown}; expected some of {sorted(known)}")
        return cls(**{k: tuple(v) if k == "tenants" else v for k, v in d.items()})


@dataclass(slots=True)
class RequestRecord:
    """One request as the client saw it; times are seconds since the run start (monotonic)."""

    intended: float
    start: float
    end: float
    home_region: str
    region: str  # X-Edge-Region of the answer ("" without one)
    node: str  # X-Edge-Node of the answer
    key: str  # the limiter key (the tenant)
    cost: int
    status: int  # HTTP status, 0 when no HTTP answer came
    error: str = ""  # the error code of the JSON body of a failed answer, or the exception
    request_id: str = ""  # X-Request-Id of the answer: the id the node audited a grant under
    allowed: bool | None = None  # check route: the "allowed" field of a 200; None otherwise
    retried_from: str = ""  # X-Router-Retried of the answer: the node the router tried first

    @property
    def latency(self) -> float:
        """Seconds from the intended send time to the answer (includes any generator lag)."""
        return self.end - self.intended


@dataclass
class LoadResult:
    """Histograms (µs) per status class and of the generator's own lag, plus the records."""

    spec: LoadSpec
    t0: float  # run start on time.monotonic()
    elapsed_s: float = 0.0
    sent: int = 0
    records: list[RequestRecord] = field(default_factory=list)
    latency: dict[str, HdrHistogram] = field(default_factory=lambda: {c: _hist() for c in (*CLASSES, "all")})
    lag: HdrHistogram = field(default_factory=_hist)
    complete: bool = True  # False when stopped or cancelled before the end
    overflow: int = 0  # open-loop arrivals not sent because max_inflight was reached

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
        if self.lag_p99_ms > self.spec.lag_threshold_ms:
            reasons.append(f"generator lag p99 {self.lag_p99_ms:.2f} ms > {self.spec.lag_threshold_ms} ms")
        if self.overflow:
            reasons.append(f"{self.overflow} arrivals dropped at max_inflight={self.spec.max_inflight}")
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
            "complete": self.complete,
            "valid": self.valid,
            "invalid_reasons": self.invalid_reasons,
        }

    def add(self, rec: RequestRecord) -> None:
        us = min(max(int((rec.end - rec.intended) * 1e6), 1), HIST_MAX_US)
        self.latency[status_class(rec.status)].record_value(us)
        self.latency["all"].record_value(us)
        if self.spec.keep_records:
            self.records.append(rec)

    def merge(self, other: LoadResult) -> None:
        """Fold another process's result (same t0) into this one."""
        for c, h in other.latency.items():
            self.latency[c].add(h)
        self.lag.add(other.lag)
        self.records.extend(other.records)
        self.sent += other.sent
        self.overflow += other.overflow
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.complete = self.complete and other.complete

    def to_wire(self) -> dict[str, Any]:
        """A compact picklable form for crossing a process boundary."""
        return {
            "t0": self.t0, "elapsed_s": self.elapsed_s, "sent": self.sent, "complete": self.complete,
            "overflow": self.overflow, "records": [tuple(getattr(r, f) for f in _REC) for r in self.records],
            "latency": {c: h.encode() for c, h in self.latency.items()}, "lag": self.lag.encode(),
        }  # fmt: skip

    @classmethod
    def from_wire(cls, spec: LoadSpec, w: Mapping[str, Any]) -> LoadResult:
        res = cls(spec, w["t0"], w["elapsed_s"], w["sent"], [RequestRecord(*r) for r in w["records"]])
        res.latency = {c: HdrHistogram.decode(e) for c, e in w["latency"].items()}
        res.lag = HdrHistogram.decode(w["lag"])
        res.complete, res.overflow = w["complete"], w["overflow"]
        return res


_REC = [f.name for f in fields(RequestRecord)]
