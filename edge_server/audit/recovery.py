"""Reading a node's own trail back at start: the newest checkpoint, then only the segments after it.

A restart costs one checkpoint (the node's own counts per key and generation, at most the key cap)
plus the events written since that checkpoint (at most a segment or two), whatever the trail's
total length.  Everything read is checked as it is replayed -- the checkpoint's signature and its
match with its segment's head, sequence continuity, the hash chain, the node -- and anything that
does not fit raises :class:`AuditCorrupt` naming the file, line and sequence number: a node does not
start on a trail it cannot account for.  The one thing repaired is a torn last line of the open
segment (a crash in the middle of a write that was never answered): it is cut off and reported.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from edge_server.audit.chain import GENESIS, ChainKeys
from edge_server.audit.seal import SealSpec
from edge_server.audit.segments import NodeFiles, iter_lines, read_json, scan, segment_path
from edge_server.gcounter import Entry

__all__ = ["AuditCorrupt", "Recovered", "load_checkpoint", "load_head", "recover_trail"]


class AuditCorrupt(ValueError):
    """The trail on disk is not one this node could have written (edited, truncated, foreign, or a
    checkpoint that does not match its segment); the message names the file and what is wrong."""


@dataclass(slots=True)
class Recovered:
    """What a restart learns from the trail (``own`` ordered least recently written first)."""

    events: int
    next_seq: int
    own: dict[str, Entry]
    truncated_bytes: int  # a torn last line removed
    total_cost: int = 0
    last_hash: bytes = GENESIS.encode()
    last_ts: float = 0.0
    max_gen: int = 0
    replayed_events: int = 0
    replayed_bytes: int = 0
    checkpoint: str = ""  # the checkpoint file started from ("" when none)
    segments: list[int] = field(default_factory=list)  # first seqs of the segments on disk, oldest first
    pending: list[SealSpec] = field(default_factory=list)  # segments after the checkpoint: seal them again
    active_first: int = 1  # first seq of the open segment
    active_offsets: array = field(default_factory=lambda: array("q"))
    active_size: int = 0
    active_first_ts: float = 0.0
    active_cost: int = 0
    active_prev: str = GENESIS  # prev of the open segment's first event


def load_head(path: Path, keys: ChainKeys, node: str) -> dict:
    """A sealed segment's head, its signature checked; :class:`AuditCorrupt` if it does not hold."""
    try:
        head = read_json(path)
    except (OSError, ValueError) as exc:
        raise AuditCorrupt(f"{path}: unreadable segment head ({exc})") from None
    problem = keys.check(head)
    if problem:
        raise AuditCorrupt(f"{path}: segment head refused: {problem}")
    if head.get("node") != node:
        raise AuditCorrupt(f"{path}: head of node {head.get('node')!r}, not of {node!r} (a foreign segment)")
    return head


def load_checkpoint(path: Path, keys: ChainKeys, node: str) -> dict:
    """A checkpoint, its signature checked; :class:`AuditCorrupt` if it does not hold."""
    try:
        ckpt = read_json(path)
    except (OSError, ValueError) as exc:
        raise AuditCorrupt(f"{path}: unreadable checkpoint ({exc})") from None
    problem = keys.check(ckpt)
    if problem:
        raise AuditCorrupt(f"{path}: checkpoint refused: {problem}")
    if ckpt.get("node") != node:
        raise AuditCorrupt(f"{path}: checkpoint of node {ckpt.get('node')!r}, not of {node!r}")
    return ckpt


class _Replay:
    """The running state of a replay: where the chain stands and the node's own counts."""

    def __init__(self, node: str, keys: ChainKeys) -> None:
        self.node = node
        self.hash = keys.hasher()
        self.next_seq = 1
        self.last_hash = GENESIS.encode()
        self.own: dict[str, Entry] = {}
        self.events = self.total_cost = self.max_gen = 0
        self.replayed_events = self.replayed_bytes = 0
        self.last_ts = 0.0

    def file(self, path: Path, lines: Iterable[bytes], *, torn_ok: bool,
             offsets: array | None = None) -> tuple[int, int, float]:
        """Replay one segment's lines; returns ``(bytes of complete lines, torn bytes, first ts)``."""
        own, hash_line, loads = self.own, self.hash, orjson.loads
        size = 0
        first_ts = 0.0
        for number, line in enumerate(lines, 1):
            if not line.endswith(b"\n"):
                if torn_ok:
                    return size, len(line), first_ts
                raise AuditCorrupt(f"{path}:{number}: the last line is cut short ({len(line)} bytes, no "
                                   "newline) in a segment that was complete when it was closed")
            where = f"{path}:{number}"
            try:
                ev = loads(line)
                seq, key, cost, gen, prev = ev["seq"], ev["key"], ev["cost"], ev["gen"], ev["prev"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise AuditCorrupt(f"{where}: not an audit event (bad JSON or a missing field)") from None
            if seq != self.next_seq:
                raise AuditCorrupt(f"{where}: seq {seq} where {self.next_seq} was expected (events missing, "
                                   "duplicated or reordered)")
            if prev.encode() != self.last_hash:
                raise AuditCorrupt(f"{where}: seq {seq}: its prev hash does not match the event before it "
                                   "(an event edited, removed or reordered, or a foreign trail)")
            if ev.get("node") != self.node:
                raise AuditCorrupt(f"{where}: seq {seq} is an event of node {ev.get('node')!r}, not {self.node!r}")
            if offsets is not None:
                offsets.append(size)
            if not first_ts:
                first_ts = ev.get("ts", 0.0)
            self.last_ts = ev.get("ts", self.last_ts)
            old = own.pop(key, None)  # re-inserted below: the dict stays ordered by last write
            if old is None or gen > old[0]:
                own[key] = (gen, cost)
            elif gen == old[0]:
                own[key] = (gen, old[1] + cost)
            else:
                own[key] = old
            if gen > self.max_gen:
                self.max_gen = gen
            self.last_hash = hash_line(line)
            self.next_seq = seq + 1
            self.events += 1
            self.total_cost += cost
            self.replayed_events += 1
            size += len(line)
            self.replayed_bytes += len(line)
        return size, 0, first_ts


def recover_trail(audit_dir: Path, node: str, keys: ChainKeys) -> Recovered:
    """Replay ``node``'s trail under ``audit_dir`` (see the module docstring); cuts a torn last line."""
    files = scan(audit_dir, node)
    for stray in files.stray:
        stray.unlink(missing_ok=True)
    state = _Replay(node, keys)
    checkpoint = ""
    if files.ckpts:
        first = max(files.ckpts)
        checkpoint = _start_from_checkpoint(files, first, keys, state)
    elif files.manifest.exists():
        raise AuditCorrupt(f"{files.manifest}: segments left this node but no checkpoint is there to "
                           "start from (checkpoints deleted?)")
    segments = files.segments()
    tail = [s for s in segments if s >= state.next_seq]
    if tail and tail[0] != state.next_seq:
        raise AuditCorrupt(f"{segment_path(files.folder, tail[0], 'jsonl.gz')}: starts at seq {tail[0]}, but "
                           f"the trail before it ends at seq {state.next_seq - 1}: a segment is missing")
    pending: list[SealSpec] = []
    for first in tail:
        path = files.plain.get(first) or files.sealed[first]
        before = (state.last_hash.decode(), state.events, state.total_cost)
        _size, _torn, first_ts = state.file(path, iter_lines(path), torn_ok=False)
        pending.append(SealSpec(first, state.next_seq - 1, before[0], state.last_hash.decode(), first_ts,
                                state.last_ts, state.events - before[1], state.total_cost - before[2]))
    if pending:  # a crash during a seal: the newest segment gets the checkpoint it lacks
        pending[-1].checkpoint = {"own": (list(state.own), list(state.own.values())), "events": state.events,
                                  "total_cost": state.total_cost, "max_gen": state.max_gen}
    active_first = state.next_seq
    offsets = array("q")
    size = torn = 0
    first_ts = 0.0
    active_prev = state.last_hash.decode()
    cost_before = state.total_cost
    if files.active.exists():
        data = files.active.read_bytes()
        size, torn, first_ts = state.file(files.active, data.splitlines(keepends=True), torn_ok=True,
                                          offsets=offsets)
        if torn:
            with open(files.active, "r+b") as fh:
                fh.truncate(size)
    return Recovered(state.events, state.next_seq, state.own, torn, state.total_cost, state.last_hash,
                     state.last_ts, state.max_gen, state.replayed_events, state.replayed_bytes, checkpoint,
                     segments, pending, active_first, offsets, size, first_ts,
                     state.total_cost - cost_before, active_prev)


def _start_from_checkpoint(files: NodeFiles, first: int, keys: ChainKeys, state: _Replay) -> str:
    path = files.ckpts[first]
    ckpt = load_checkpoint(path, keys, files.node)
    head_path = files.heads.get(first)
    if head_path is None or first not in files.sealed:
        raise AuditCorrupt(f"{path}: its segment seg-{first:012d} (head and .jsonl.gz) is not there")
    head = load_head(head_path, keys, files.node)
    for name in ("last_seq", "last_hash", "first_seq"):
        if ckpt.get(name) != head.get(name):
            raise AuditCorrupt(f"{path}: does not match its segment's head {head_path.name}: {name} "
                               f"{ckpt.get(name)!r} against {head.get(name)!r}")
    size = files.sealed[first].stat().st_size
    if size != head.get("gz_bytes"):
        raise AuditCorrupt(f"{files.sealed[first]}: {size} bytes, its head says {head.get('gz_bytes')} "
                           "(truncated or replaced after sealing)")
    try:
        own = {key: (int(gen), int(count)) for key, (gen, count) in ckpt["own"]}
        state.next_seq = int(ckpt["last_seq"]) + 1
        state.last_hash = str(ckpt["last_hash"]).encode()
        state.events = int(ckpt["events"])
        state.total_cost = int(ckpt["total_cost"])
        state.max_gen = int(ckpt.get("max_gen", 0))
        state.last_ts = float(head.get("last_ts", 0.0))
    except (KeyError, TypeError, ValueError):
        raise AuditCorrupt(f"{path}: a signed checkpoint with a missing or malformed field") from None
    state.own = own
    return path.name
