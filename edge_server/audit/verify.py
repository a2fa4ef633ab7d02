"""``edge-server audit verify``: does a trail at rest hold exactly what its node wrote?

Per node, in sequence order: the manifest's signed records of segments that left the node, every
sealed segment against its signed head (signature, first/last seq, count, first and last hash),
segments not yet sealed, and the open segment -- every event's ``seq`` following the one before,
its ``prev`` equal to the keyed hash of the line before it, its ``node`` the trail's node.  Then
every checkpoint against its segment's head.  The first thing that does not fit is named (file,
line, seq, what is wrong) and ends that node's check: what follows a break cannot be judged.

What a local check cannot see: the newest events of the open segment are protected only by the
events after them and, once sealed, by the head -- cutting off the open segment's last lines at a
line boundary, or editing its very last line, leaves nothing on this disk to disagree.  A torn last
line (a crash mid-write) is reported as such, not as tampering: recovery drops it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from edge_server.audit.chain import GENESIS, ChainKeys
from edge_server.audit.segments import NodeFiles, iter_lines, node_dirs, read_json, scan

__all__ = ["NodeReport", "Problem", "verify_node", "verify_paths"]


@dataclass(slots=True)
class Problem:
    """The first thing in a node's trail that does not fit."""

    file: Path
    line: int | None
    seq: int | None
    what: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: " + (f"seq {self.seq}: " if self.seq is not None else "") + self.what


@dataclass(slots=True)
class NodeReport:
    node: str
    folder: Path
    events: int = 0  # events read and found in order
    first_seq: int = 0
    last_seq: int = 0
    sealed: int = 0
    unsealed: int = 0
    removed: int = 0  # segments recorded as removed in the manifest
    removed_events: int = 0
    checkpoints: int = 0
    problem: Problem | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.problem is not None:
            return f"{self.node}: TAMPERED: {self.problem}"
        span = f"seq {self.first_seq}..{self.last_seq}" if self.events else "no events"
        removed = (f"; {self.removed} older segment(s), {self.removed_events} events, removed by retention "
                   "as the manifest records") if self.removed else ""
        return (f"{self.node}: ok: {self.events} events ({span}) in {self.sealed} sealed segment(s), "
                f"{self.unsealed} not yet sealed, and the open segment; {self.checkpoints} checkpoint(s) "
                f"match{removed}")


class _Stop(Exception):
    """The node's first problem was found."""


class _Walk:
    def __init__(self, files: NodeFiles, keys: ChainKeys, report: NodeReport) -> None:
        self.files, self.keys, self.report = files, keys, report
        self.hash = keys.hasher()
        self.expected = 1
        self.prev = GENESIS.encode()

    def fail(self, file: Path, line: int | None, seq: int | None, what: str) -> None:
        self.report.problem = Problem(file, line, seq, what)
        raise _Stop

    def signed(self, path: Path, kind: str) -> dict:
        try:
            doc = read_json(path)
        except (OSError, ValueError) as exc:
            self.fail(path, None, None, f"unreadable {kind} ({exc})")
        problem = self.keys.check(doc)
        if problem:
            self.fail(path, None, doc.get("first_seq"), f"{kind} refused: {problem}")
        if doc.get("node") != self.files.node:
            self.fail(path, None, None, f"a {kind} of node {doc.get('node')!r}, not {self.files.node!r} (foreign)")
        return doc

    def lines(self, path: Path, lines: Iterable[bytes], *, torn_ok: bool) -> tuple[int, str]:
        """Check a segment's events in order; returns (events, prev of its first event)."""
        count, first_prev, number = 0, "", 0
        try:
            for number, line in enumerate(lines, 1):
                if not line.endswith(b"\n"):
                    if torn_ok:
                        self.report.warnings.append(
                            f"{path}:{number}: torn write: the last line is cut short ({len(line)} bytes, no "
                            "newline), as a crash mid-write leaves it; never answered, and recovery drops it")
                        break
                    self.fail(path, number, None, "the last line is cut short: the segment was truncated")
                try:
                    ev = orjson.loads(line)
                    seq, prev = ev["seq"], ev["prev"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    self.fail(path, number, None, "not an audit event (bad JSON or a missing field): edited "
                              "or corrupted")
                if seq != self.expected:
                    what = ("an event is missing (deleted?)" if isinstance(seq, int) and seq > self.expected
                            else "events out of order or duplicated")
                    self.fail(path, number, seq, f"where seq {self.expected} was expected: {what}")
                if not isinstance(prev, str) or prev.encode() != self.prev:
                    self.fail(path, number, seq, "its prev hash does not match the event before it: that event "
                              "(or this one's prev) was edited, or events between them were removed or "
                              "reordered, or the trail comes from another cluster")
                if ev.get("node") != self.files.node:
                    self.fail(path, number, seq, f"an event of node {ev.get('node')!r} in {self.files.node!r}'s trail")
                if not count:
                    first_prev = prev
                    if not self.report.events:
                        self.report.first_seq = seq
                self.prev = self.hash(line)
                self.expected = seq + 1
                self.report.last_seq = seq
                self.report.events += 1
                count += 1
        except (OSError, EOFError, zlib.error) as exc:
            self.fail(path, number + 1, self.expected, f"the compressed data is cut short or corrupt ({exc})")
        return count, first_prev

    def run(self) -> None:
        files, rep = self.files, self.report
        present = set(files.segments())
        removed: list[tuple[int, dict]] = []
        if files.manifest.exists():
            for number, line in enumerate(files.manifest.read_bytes().splitlines(), 1):
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    self.fail(files.manifest, number, None, "not a JSON record: edited or corrupted")
                problem = self.keys.check(rec) if isinstance(rec, dict) else "not a JSON object"
                if problem:
                    self.fail(files.manifest, number, None, f"manifest record refused: {problem}")
                removed.append((number, rec))
        for number, rec in sorted(removed, key=lambda r: r[1].get("first_seq", 0)):
            if rec.get("first_seq") in present:
                continue  # recorded, then a crash before the files went: still here, checked below
            if rec.get("first_seq") != self.expected:
                self.fail(files.manifest, number, rec.get("first_seq"),
                          f"a removed segment that starts where seq {self.expected} was expected")
            self.expected = int(rec["last_seq"]) + 1
            self.prev = str(rec["last_hash"]).encode()
            rep.removed += 1
            rep.removed_events += int(rec.get("events") or 0)
        for first in sorted(present):
            self.segment(first)
        if files.active.exists():
            self.lines(files.active, iter_lines(files.active), torn_ok=True)
        for first, path in sorted(files.ckpts.items()):
            ckpt = self.signed(path, "checkpoint")
            head_path = files.heads.get(first)
            head = self.signed(head_path, "segment head") if head_path else None
            if head is None or any(ckpt.get(k) != head.get(k) for k in ("first_seq", "last_seq", "last_hash")):
                self.fail(path, None, ckpt.get("last_seq"), "the checkpoint does not match its segment's head")
            rep.checkpoints += 1

    def segment(self, first: int) -> None:
        files, rep = self.files, self.report
        gz, plain, head_path = files.sealed.get(first), files.plain.get(first), files.heads.get(first)
        path = gz or plain
        assert path is not None
        if first != self.expected:
            what = (f"events {self.expected}..{first - 1} are missing: no segment holds them and the manifest "
                    "does not record their removal") if first > self.expected else "overlaps the segment before it"
            self.fail(path, None, self.expected, what)
        if gz is None or head_path is None:
            if plain is None:
                self.fail(gz or head_path or path, None, first, "a sealed segment without its signed head")
            self.lines(plain, iter_lines(plain), torn_ok=False)
            rep.unsealed += 1
            rep.warnings.append(f"{plain}: not sealed yet (no signed head): checked by its chain only")
            return
        head = self.signed(head_path, "segment head")
        if head.get("first_seq") != first:
            self.fail(head_path, None, first, f"the head is of a segment starting at {head.get('first_seq')}")
        before = self.prev.decode()
        count, first_prev = self.lines(gz, iter_lines(gz), torn_ok=False)
        for name, got in (("first_prev", first_prev if count else before), ("last_seq", self.expected - 1),
                          ("events", count), ("last_hash", self.prev.decode())):
            if head.get(name) != got:
                self.fail(gz, count or None, self.expected - 1,
                          f"the segment's {name} is {got!r} but its signed head says {head.get(name)!r}: events "
                          "were removed, added or edited after sealing")
        rep.sealed += 1


def verify_node(audit_dir: Path, node: str, keys: ChainKeys) -> NodeReport:
    """Check one node's trail under ``audit_dir``; the report names its first problem, if any."""
    files = scan(audit_dir, node)
    report = NodeReport(node, files.folder)
    try:
        _Walk(files, keys, report).run()
    except _Stop:
        pass
    return report


def verify_paths(paths: Iterable[Path], keys: ChainKeys) -> list[NodeReport]:
    """:func:`verify_node` for every node trail found in ``paths`` (``ValueError`` for a path holding none)."""
    reports = []
    for path in paths:
        found = node_dirs(path)
        if not found:
            raise ValueError(f"{path}: no audit trail here (no NODE.jsonl file, no NODE/ folder of segments)")
        reports += [verify_node(d, n, keys) for d, n in found]
    return reports
