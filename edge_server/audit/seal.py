"""Sealing a segment and retention: compress, sign a head, write the checkpoint, let old segments go.

A seal runs in a worker thread (zlib and file writes release the GIL); the event loop keeps
appending to the new open segment meanwhile.  Every step leaves a state recovery understands: the
plain segment is removed only after its ``.jsonl.gz`` and head (and checkpoint, when it carries one)
are on disk, and a segment leaves the node only after a signed manifest record of it is on disk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from edge_server.audit.chain import ChainKeys
from edge_server.audit.segments import fsync_dir, read_json, scan, segment_path, write_json_atomic, write_sealed

__all__ = ["KEEP_CHECKPOINTS", "Retention", "SealSpec", "apply_retention", "release_memory", "seal_segment"]

log = logging.getLogger("edge_server.audit")
KEEP_CHECKPOINTS = 2  # the newest, and one before it in case the newest is damaged


@dataclass(frozen=True, slots=True)
class Retention:
    """When sealed segments leave the node (0 disables a limit)."""

    max_age_s: float = 0.0  # a segment whose newest event is older than this
    max_bytes: int = 0  # oldest segments first, while all sealed segments together are larger


@dataclass(slots=True)
class SealSpec:
    """One segment to seal, as the writer (or a replay) knows it."""

    first: int
    last: int
    first_prev: str
    last_hash: str
    first_ts: float
    last_ts: float
    events: int
    cost: int
    checkpoint: dict | None = None  # own/events/total_cost/max_gen at the segment's end, or None


def seal_segment(folder: Path, node: str, region: str, keys: ChainKeys, spec: SealSpec, level: int) -> None:
    """Compress ``spec``'s plain segment, sign its head, write its checkpoint, drop the plain copy."""
    plain = segment_path(folder, spec.first, "jsonl")
    gz = segment_path(folder, spec.first, "jsonl.gz")
    head_path = segment_path(folder, spec.first, "head.json")
    if not (gz.exists() and head_path.exists()):
        blocks, gz_bytes, raw_bytes = write_sealed(plain, gz, level)
        head = keys.sign({
            "v": 1, "kind": "edge-audit-head", "node": node, "region": region, "segment": gz.name,
            "first_seq": spec.first, "last_seq": spec.last, "events": spec.events, "cost": spec.cost,
            "first_prev": spec.first_prev, "last_hash": spec.last_hash, "first_ts": spec.first_ts,
            "last_ts": spec.last_ts, "bytes": raw_bytes, "gz_bytes": gz_bytes, "blocks": blocks,
            "sealed_at": time.time(),
        })
        write_json_atomic(head_path, head)
    if spec.checkpoint is not None:
        ckpt = keys.sign({
            "v": 1, "kind": "edge-audit-checkpoint", "node": node, "segment": gz.name,
            "first_seq": spec.first, "last_seq": spec.last, "last_hash": spec.last_hash,
            "written_at": time.time(), **spec.checkpoint,
        })
        write_json_atomic(segment_path(folder, spec.first, "ckpt.json"), ckpt)
    fsync_dir(folder)
    plain.unlink(missing_ok=True)
    if spec.checkpoint is not None:
        files = scan(folder.parent, node)
        for first in sorted(files.ckpts)[:-KEEP_CHECKPOINTS]:
            files.ckpts[first].unlink(missing_ok=True)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give the C heap's free memory back to the system after a seal.

    A seal allocates a few MB of large buffers (blocks, compressed members, the checkpoint) in a
    worker thread; glibc keeps freed chunks of a thread's arena (and raises its mmap threshold
    after the first free), so without this a node's RSS stepped up at seals instead of staying flat.
    """
    if _TRIM is not None:
        _TRIM(0)


def _append_record(path: Path, record: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, orjson.dumps(record) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_retention(folder: Path, node: str, keys: ChainKeys, retention: Retention, keep_from: int,
                    now: float) -> list[int]:
    """Remove the oldest sealed segments past ``retention`` (never ``keep_from`` or newer: the newest
    checkpoint's segment).  Each leaves a signed record in the manifest first.  Returns their first seqs."""
    if not retention.max_age_s and not retention.max_bytes:
        return []
    files = scan(folder.parent, node)
    total = sum(p.stat().st_size for p in files.sealed.values())
    removed: list[int] = []
    for first in sorted(files.sealed):
        if first >= keep_from or first not in files.heads:
            break
        try:
            head = read_json(files.heads[first])
        except (OSError, ValueError) as exc:  # what cannot be recorded does not leave
            log.error("audit retention stopped", extra={"segment": files.heads[first].name, "error": str(exc)})
            break
        too_old = bool(retention.max_age_s) and now - float(head.get("last_ts", now)) > retention.max_age_s
        too_big = bool(retention.max_bytes) and total > retention.max_bytes
        if not (too_old or too_big):
            break
        record = keys.sign({
            "v": 1, "kind": "edge-audit-removed", "node": node, "segment": files.sealed[first].name,
            "first_seq": head.get("first_seq"), "last_seq": head.get("last_seq"), "events": head.get("events"),
            "cost": head.get("cost"), "first_prev": head.get("first_prev"), "last_hash": head.get("last_hash"),
            "first_ts": head.get("first_ts"), "last_ts": head.get("last_ts"), "head_mac": head.get("mac"),
            "reason": "age" if too_old else "size", "removed_at": now,
        })
        _append_record(files.manifest, record)
        total -= files.sealed[first].stat().st_size
        for path in (files.sealed[first], files.heads[first], files.ckpts.get(first), files.plain.get(first)):
            if path is not None:
                path.unlink(missing_ok=True)
        removed.append(first)
    if removed:
        fsync_dir(folder)
    return removed
