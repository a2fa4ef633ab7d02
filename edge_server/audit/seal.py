"""Sealing a segment and retention: compress, sign a head, write the checkpoint, let old segments go.

A seal runs in a worker thread (zlib and file writes release the GIL); the event loop keeps
appending to the new open segment meanwhile.  Every step leaves a state recovery understands: the
plain segment is removed only after its ``.jsonl.gz`` and head (and checkpoint, when it carries one)
are on disk, and a segment leaves the node only after a signed manifest record of it is on disk.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from edge_server.audit.chain import ChainKeys, canonical
from edge_server.audit.segments import (
    atomic_file,
    fsync_dir,
    read_json,
    scan,
    segment_path,
    write_json_atomic,
    write_sealed,
)

__all__ = ["KEEP_CHECKPOINTS", "Own", "Retention", "SealSpec", "apply_retention", "seal_segment", "write_checkpoint"]

log = logging.getLogger("edge_server.audit")
KEEP_CHECKPOINTS = 2  # the newest, and one before it in case the newest is damaged
OWN_CHUNK = 4096  # checkpoint entries serialised at a time


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
    checkpoint: dict | None = None  # own (:data:`Own`)/events/total_cost/max_gen at the segment's end, or None


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
        write_checkpoint(segment_path(folder, spec.first, "ckpt.json"), keys, {
            "v": 1, "kind": "edge-audit-checkpoint", "node": node, "segment": gz.name,
            "first_seq": spec.first, "last_seq": spec.last, "last_hash": spec.last_hash,
            "written_at": time.time(), **spec.checkpoint,
        })
    fsync_dir(folder)
    plain.unlink(missing_ok=True)
    if spec.checkpoint is not None:
        files = scan(folder.parent, node)
        for first in sorted(files.ckpts)[:-KEEP_CHECKPOINTS]:
            files.ckpts[first].unlink(missing_ok=True)


Entry = tuple[int, int]  # (generation, count)
# A node's own counts for a checkpoint: ``[(key, entry)]``, or ``(keys, entries)`` -- two lists, the
# snapshot a node takes at a rotation without building a tuple per key (100,000 keys: ~7 MB less).
Own = list[tuple[str, Entry]] | tuple[list[str], list[Entry]]


def _chunks(own: Own) -> Iterator[list]:
    if isinstance(own, tuple):
        keys, entries = own
        for i in range(0, len(keys), OWN_CHUNK):
            yield list(zip(keys[i:i + OWN_CHUNK], entries[i:i + OWN_CHUNK], strict=True))
    else:
        for i in range(0, len(own), OWN_CHUNK):
            yield own[i:i + OWN_CHUNK]


def write_checkpoint(path: Path, keys: ChainKeys, doc: dict) -> None:
    """Write the signed checkpoint ``doc`` (its ``own``: :data:`Own`) so that a crash leaves the old
    file or the new one.

    Streamed: the counts are serialised ``OWN_CHUNK`` entries at a time into the file and the HMAC,
    in the canonical form :meth:`ChainKeys.sign` covers (sorted keys), the ``mac`` appended last.
    Built whole, a checkpoint of 100,000 keys cost about 16 MB at once (the sorted copy for the
    signature and the file's copy, a few MB each, and their growing buffers): a step in the node's
    RSS at every seal.  The reader sees the same document as :func:`keys.sign` would give.
    """
    own = doc["own"]
    head = canonical({**doc, "own": [], "key_id": keys.key_id})
    marker = b'"own":[]'  # unique: a quote inside a string value is escaped
    cut = head.index(marker) + len(marker) - 1
    mac = keys.signer()
    with atomic_file(path) as fh:
        def out(data: bytes) -> None:
            mac.update(data)
            fh.write(data)

        out(head[:cut])
        for i, chunk in enumerate(_chunks(own)):
            piece = orjson.dumps(chunk)[1:-1]
            out(b"," + piece if i else piece)
        out(head[cut:-1])
        mac.update(head[-1:])  # the canonical form's closing brace; the file's comes after the mac
        fh.write(b',"mac":"' + mac.hexdigest().encode() + b'"}')


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
