"""``edge-server audit export`` and ``usage``: the trail as a compliance officer reads it.

Both read trails at rest -- live folders, archived copies, replicas -- in sequence order per node,
sealed segments (gzip) and the open one alike, and filter by time, tenant (the limiter key: the
tenant of ``/v1/skills/*/invoke``, the key of ``/v1/limits/check``) and node.  They do not judge
integrity (``audit verify`` does); a line that is not an event stops them with its file and line.
"""

from __future__ import annotations

import csv
import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from edge_server.audit.segments import iter_lines, node_dirs, scan

__all__ = ["FIELDS", "EventFilter", "UnreadableEvent", "export_events", "iter_events", "usage"]

FIELDS = ("seq", "id", "key", "cost", "node", "region", "ts", "request_id", "gen", "prev")


class UnreadableEvent(ValueError):
    """A line of a segment is not an audit event (message: file, line)."""


@dataclass(frozen=True, slots=True)
class EventFilter:
    since: float | None = None  # ts >= since (Unix seconds)
    until: float | None = None  # ts < until
    tenants: tuple[str, ...] = ()  # fnmatch patterns over the key; empty: all
    nodes: tuple[str, ...] = ()  # empty: all

    def wants_node(self, node: str) -> bool:
        return not self.nodes or node in self.nodes

    def wants(self, ev: dict[str, Any]) -> bool:
        ts = ev["ts"]
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts >= self.until:
            return False
        return not self.tenants or any(fnmatch.fnmatchcase(ev["key"], p) for p in self.tenants)


def iter_events(paths: Iterable[Path], flt: EventFilter = EventFilter()) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """``(raw line, event)`` of every wanted event in ``paths``, node by node, in sequence order."""
    for path in paths:
        for audit_dir, node in node_dirs(path):
            if not flt.wants_node(node):
                continue
            files = scan(audit_dir, node)
            sources = [files.sealed.get(f) or files.plain[f] for f in files.segments()]
            if files.active.exists():
                sources.append(files.active)
            for source in sources:
                for number, line in enumerate(iter_lines(source), 1):
                    if not line.endswith(b"\n"):
                        break  # a torn last line: never answered
                    try:
                        ev = orjson.loads(line)
                        wanted = flt.wants(ev)
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        raise UnreadableEvent(f"{source}:{number}: not an audit event") from None
                    if wanted:
                        yield line, ev


def export_events(paths: Iterable[Path], out: IO[bytes], flt: EventFilter, fmt: str = "jsonl") -> int:
    """Write the wanted events to ``out`` as JSON lines (as stored) or CSV; returns how many."""
    count = 0
    if fmt == "jsonl":
        for line, _ev in iter_events(paths, flt):
            out.write(line)
            count += 1
        return count
    text = _TextOut(out)
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(FIELDS)
    for _line, ev in iter_events(paths, flt):
        writer.writerow([ev.get(f, "") for f in FIELDS])
        count += 1
    return count


class _TextOut:
    """The text face ``csv.writer`` wants over a binary stream."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out

    def write(self, text: str) -> int:
        self.out.write(text.encode())
        return len(text)


@dataclass(slots=True)
class Usage:
    events: int = 0
    tokens: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    nodes: dict[str, list[int]] = field(default_factory=dict)  # node -> [events, tokens]


def usage(paths: Iterable[Path], flt: EventFilter = EventFilter()) -> dict[str, Usage]:
    """Per tenant (limiter key): events and tokens granted, in total and per node."""
    out: dict[str, Usage] = {}
    for _line, ev in iter_events(paths, flt):
        u = out.get(ev["key"])
        if u is None:
            u = out[ev["key"]] = Usage(first_ts=ev["ts"])
        u.events += 1
        u.tokens += ev["cost"]
        u.first_ts = min(u.first_ts, ev["ts"])
        u.last_ts = max(u.last_ts, ev["ts"])
        per = u.nodes.setdefault(ev["node"], [0, 0])
        per[0] += 1
        per[1] += ev["cost"]
    return dict(sorted(out.items()))
