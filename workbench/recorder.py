"""Plain records of a drill and their persistence in a results folder.

Every time ``t_s`` / ``*_s`` is seconds on one monotonic clock whose zero is the start of the run, so
requests, faults and samples line up; ``Recording.started_wall`` is ``time.time()`` at that zero, which
maps the nodes' wall-clock audit timestamps onto the same axis.  A folder holds one JSON-lines file per
record type and ``meta.json`` (written last, so a folder without it was never finished being written).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from workbench import __version__

__all__ = [
    "FORMAT_VERSION",
    "AuditEvent",
    "FaultRecord",
    "MetricSample",
    "ProcessSample",
    "Recording",
    "RecordingError",
    "RequestRecord",
    "StateSample",
    "parse_metrics",
]

FORMAT_VERSION = 2  # bump when records change (2: RequestRecord.retried_from); load refuses anything else


class RecordingError(ValueError):
    """A results folder is missing, incomplete, of another format version, or has a bad line."""


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
    error: str = ""  # error code from the body, or the exception for status 0
    request_id: str = ""  # the request id the node audited it under
    route: str = "invoke"  # "invoke" or "check"
    allowed: bool | None = None  # check route: the "allowed" field of a 200; None for invoke
    retried_from: str = ""  # X-Router-Retried: the node the router tried first (it never answered)

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
        return cls(**{f: event[f] for f in _names(cls)})


@dataclass(slots=True)
class ProcessSample:
    """CPU and memory of one process (node, router, generator) from psutil."""

    t_s: float
    name: str
    cpu_pct: float
    rss_mb: float


_FILES: dict[str, type] = {
    "requests": RequestRecord, "faults": FaultRecord, "metrics": MetricSample, "states": StateSample,
    "audit": AuditEvent, "processes": ProcessSample,
}


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@dataclass
class Recording:
    """Everything recorded in one run, plus what is needed to judge it later."""

    scenario: dict[str, Any] = field(default_factory=dict)  # Scenario.to_dict()
    requests: list[RequestRecord] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    metrics: list[MetricSample] = field(default_factory=list)
    states: list[StateSample] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    processes: list[ProcessSample] = field(default_factory=list)
    version: str = __version__  # of the workbench that recorded it
    started_wall: float = field(default_factory=time.time)  # time.time() at the run clock's zero
    ended_s: float | None = None  # run clock when the run stopped (None: not known)
    complete: bool = False  # False until the run ended normally
    incomplete_reason: str = ""  # why not, e.g. "interrupted (KeyboardInterrupt)"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form run facts (ports, generator lag, ...)

    def wall_to_run(self, wall: float) -> float:
        """A wall-clock time (audit ``ts``, state ``wall``) on the run clock."""
        return wall - self.started_wall

    def mark_incomplete(self, reason: str) -> None:
        self.complete, self.incomplete_reason = False, reason

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the folder (created if needed); ``meta.json`` last, each file via a rename."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        meta_path = out / "meta.json"
        if meta_path.exists():
            meta_path.unlink()  # the folder is not a valid recording while it is rewritten
        counts = {}
        for name, cls in _FILES.items():
            rows: list[Any] = getattr(self, name)
            _write_lines(out / f"{name}.jsonl", cls, rows)
            counts[name] = len(rows)
        meta = {"format_version": FORMAT_VERSION, "version": self.version, "started_wall": self.started_wall,
                "ended_s": self.ended_s, "complete": self.complete, "incomplete_reason": self.incomplete_reason,
                "counts": counts, "extra": self.extra, "scenario": self.scenario}
        tmp = out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, meta_path)
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Recording:
        """Read a folder written by :meth:`save`; refuse anything else with a clear message."""
        src = Path(folder)
        if not src.is_dir():
            raise RecordingError(f"{src}: no such results folder")
        meta_path = src / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecordingError(f"{src}: not a recording (no meta.json; was the save interrupted?)") from None
        except (OSError, ValueError) as exc:
            raise RecordingError(f"{meta_path}: unreadable ({exc})") from None
        got = meta.get("format_version") if isinstance(meta, dict) else None
        if got != FORMAT_VERSION:
            age = "an older" if isinstance(got, int) and got < FORMAT_VERSION else "an unknown"
            raise RecordingError(f"{meta_path}: format_version {got!r} is {age} format; this workbench "
                                 f"reads format_version {FORMAT_VERSION} only (re-run the drill to record again)")
        rec = cls(scenario=meta.get("scenario") or {}, version=meta.get("version", "?"),
                  started_wall=float(meta.get("started_wall", 0.0)), ended_s=meta.get("ended_s"),
                  complete=bool(meta.get("complete")), incomplete_reason=meta.get("incomplete_reason", ""),
                  extra=meta.get("extra") or {})
        for name, kind in _FILES.items():
            rows = list(_read_lines(src / f"{name}.jsonl", kind))
            expected = (meta.get("counts") or {}).get(name)
            if expected is not None and expected != len(rows):
                raise RecordingError(f"{src / (name + '.jsonl')}: {len(rows)} records, meta.json says {expected}")
            setattr(rec, name, rows)
        return rec

    def summary_counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in _FILES}


def _write_lines(path: Path, cls: type, rows: Iterable[Any]) -> None:
    """One JSON object per line: a header-free, greppable format that streams."""
    names = _names(cls)
    tmp = path.with_name(path.name + ".tmp")
    dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(dumps({n: getattr(row, n) for n in names}) + "\n" for row in rows)
    os.replace(tmp, path)


def _read_lines(path: Path, cls: type) -> Iterator[Any]:
    if not path.exists():
        raise RecordingError(f"{path}: missing (the results folder is incomplete)")
    names = set(_names(cls))
    loads = json.loads
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                raw = loads(line)
                if not isinstance(raw, dict) or set(raw) != names:
                    raise ValueError(f"expected the fields {sorted(names)}")
                if cls is StateSample:
                    raw["counts"] = {k: {n: (e[0], e[1]) for n, e in v.items()} for k, v in raw["counts"].items()}
                yield cls(**raw)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise RecordingError(f"{path}:{lineno}: bad {cls.__name__} record ({exc})") from None


def parse_metrics(text: str, t_s: float, node: str) -> list[MetricSample]:
    """Parse a Prometheus text exposition (GET /metrics) into samples; NaN and infinite values are skipped."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if math.isfinite(s.value):
                out.append(MetricSample(t_s, node, s.name, dict(s.labels), float(s.value)))
    return out
