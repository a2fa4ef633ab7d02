"""A run's history on disk: one JSON-lines file per record type and ``meta.json``, written last (a folder
without it was never finished being written), with a format version that loading checks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import __version__
from workbench.history.records import (
    AuditEvent,
    FaultRecord,
    MetricSample,
    ProcessSample,
    RequestRecord,
    RouterSample,
    StateSample,
    field_names,
)

__all__ = ["FORMAT_VERSION", "Recording", "RecordingError"]

# bump when records change (2: RequestRecord.retried_from, 3: RouterSample, 4: RequestRecord.shed);
# load refuses others
FORMAT_VERSION = 4


class RecordingError(ValueError):
    """A results folder is missing, incomplete, of another format version, or has a bad line."""


_FILES: dict[str, type] = {
    "requests": RequestRecord, "faults": FaultRecord, "metrics": MetricSample, "states": StateSample,
    "audit": AuditEvent, "processes": ProcessSample, "routers": RouterSample,
}


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
    routers: list[RouterSample] = field(default_factory=list)  # the router's routing table, sampled
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
    names = field_names(cls)
    tmp = path.with_name(path.name + ".tmp")
    dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    with tmp.open("w", encoding="utf-8") as fh:
        fh.writelines(dumps({n: getattr(row, n) for n in names}) + "\n" for row in rows)
    os.replace(tmp, path)


def _read_lines(path: Path, cls: type) -> Iterator[Any]:
    if not path.exists():
        raise RecordingError(f"{path}: missing (the results folder is incomplete)")
    names = set(field_names(cls))
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
