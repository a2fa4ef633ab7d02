"""Where a node's trail lives on disk, and how segments are written, sealed and read back.

Layout under the cluster's ``audit_dir`` for node ``N``::

    N.jsonl                      the open segment (plain JSON lines, appended by group commit)
    N/seg-000000000001.jsonl     a segment being sealed (renamed from N.jsonl; removed once sealed)
    N/seg-000000000001.jsonl.gz  a sealed segment: gzip members of ``BLOCK_EVENTS`` lines each
    N/seg-000000000001.head.json its signed head (first/last seq and hash, counts, block index)
    N/seg-000000000001.ckpt.json the checkpoint written with it (the node's own counts at its end)
    N/manifest.jsonl             signed records of every segment that left the node (retention)

The number is the segment's first sequence number.  The open segment keeps its old name so that
tools reading ``audit_dir/*.jsonl`` still find the newest events.  A sealed segment is a valid
``.gz`` (``zcat`` reads it); being a chain of members, each starting at an offset its head records,
a reader can start at any block instead of decompressing the whole segment.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

__all__ = [
    "BLOCK_EVENTS",
    "NodeFiles",
    "atomic_file",
    "fsync_dir",
    "iter_lines",
    "iter_lines_from",
    "node_dirs",
    "read_json",
    "read_lines_at",
    "scan",
    "segment_path",
    "write_json_atomic",
    "write_sealed",
]

BLOCK_EVENTS = 2048  # lines per gzip member: a read from the middle decompresses at most this many
_NAME = re.compile(r"^seg-(\d{12})\.(jsonl\.gz|jsonl|head\.json|ckpt\.json)$")
_KINDS = {"jsonl.gz": "sealed", "jsonl": "plain", "head.json": "heads", "ckpt.json": "ckpts"}


def segment_path(folder: Path, first: int, kind: str) -> Path:
    """``folder/seg-<first>.<kind>`` for kind ``jsonl``, ``jsonl.gz``, ``head.json`` or ``ckpt.json``."""
    return folder / f"seg-{first:012d}.{kind}"


@dataclass(slots=True)
class NodeFiles:
    """What one node's trail consists of on disk right now (see the module docstring)."""

    node: str
    active: Path
    folder: Path
    sealed: dict[int, Path] = field(default_factory=dict)  # first seq -> .jsonl.gz
    plain: dict[int, Path] = field(default_factory=dict)  # first seq -> .jsonl being sealed
    heads: dict[int, Path] = field(default_factory=dict)
    ckpts: dict[int, Path] = field(default_factory=dict)
    stray: list[Path] = field(default_factory=list)  # temporary files a crash left behind

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.jsonl"

    def segments(self) -> list[int]:
        """First sequence numbers of every segment in the folder (sealed or being sealed), oldest first."""
        return sorted(set(self.sealed) | set(self.plain))


def scan(audit_dir: Path, node: str) -> NodeFiles:
    """List one node's files (a directory listing only: no file is opened)."""
    files = NodeFiles(node, audit_dir / f"{node}.jsonl", audit_dir / node)
    if not files.folder.is_dir():
        return files
    with os.scandir(files.folder) as entries:
        for entry in entries:
            m = _NAME.match(entry.name)
            if m:
                getattr(files, _KINDS[m.group(2)])[int(m.group(1))] = Path(entry.path)
            elif entry.name.endswith(".tmp"):
                files.stray.append(Path(entry.path))
    return files


def node_dirs(path: Path) -> list[tuple[Path, str]]:
    """``(audit_dir, node)`` for every node trail in ``path``: an audit folder holding ``N.jsonl``
    files and/or ``N/`` folders, or one node's folder itself (named after the node)."""
    found: dict[str, Path] = {}
    if any(_NAME.match(p.name) or p.name == "manifest.jsonl" for p in path.iterdir()):
        return [(path.parent, path.name)]
    for p in sorted(path.iterdir()):
        if p.is_file() and p.name.endswith(".jsonl") and not p.name.startswith("."):
            found.setdefault(p.name[: -len(".jsonl")], path)
        elif p.is_dir() and any(_NAME.match(q.name) or q.name == "manifest.jsonl" for q in p.iterdir()):
            found.setdefault(p.name, path)
    return [(d, n) for n, d in sorted(found.items())]


def iter_lines(path: Path) -> Iterator[bytes]:
    """Every line of a plain or gzip segment, newline kept (a torn last line comes without one)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        yield from fh


def iter_lines_from(path: Path, offset: int) -> Iterator[bytes]:
    """Lines of a sealed segment from the gzip member that starts at byte ``offset``."""
    with open(path, "rb") as raw:
        raw.seek(offset)
        with gzip.GzipFile(fileobj=raw, mode="rb") as fh:
            yield from fh


def fsync_dir(folder: Path) -> None:
    """Make renames and deletions in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file to write that appears as ``path`` only once complete and on disk: written as
    ``<name>.tmp``, fsynced and renamed over ``path``, so a crash leaves the old file or the new one,
    never half of it.  On an error the temporary file is removed and ``path`` is untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as fh:
        fh.write(orjson.dumps(doc))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``ValueError`` naming the file if it is not one."""
    try:
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a JSON object")
    return doc


def write_sealed(plain: Path, target: Path, level: int,
                 block_events: int = BLOCK_EVENTS) -> tuple[list[list[int]], int, int]:
    """Compress ``plain`` into ``target`` as one gzip member per ``block_events`` lines.

    Returns ``(blocks, compressed_bytes, plain_bytes)`` where ``blocks`` is ``[[first_seq, offset]]``.
    The file appears under its name only once complete and on disk.
    """
    blocks: list[list[int]] = []
    offset = plain_bytes = 0
    with open(plain, "rb") as src, atomic_file(target) as fh:
        # A block at a time: a seal holds one block in memory, not the whole segment.
        while chunk := list(itertools.islice(src, block_events)):
            first = orjson.loads(chunk[0])["seq"]
            data = b"".join(chunk)
            member = gzip.compress(data, compresslevel=level, mtime=0)
            fh.write(member)
            blocks.append([first, offset])
            offset += len(member)
            plain_bytes += len(data)
    return blocks, offset, plain_bytes


def read_lines_at(plain: Path, offsets: Sequence[int], size: int, index: int, limit: int) -> list[bytes]:
    """Lines ``index ..`` (at most ``limit``) of a plain segment whose line offsets and size are
    known, by seek.  A replica's reads right after a rotation come from the closed, unsealed
    segment: a scan from its start (parsing every line of 16 MB to find the first one wanted) held
    the node's event loop for tens of ms at each rotation -- the allowed case's p99 of 50-100 ms."""
    count = len(offsets)
    if index >= count or limit <= 0:
        return []
    stop = min(count, index + limit)
    end = offsets[stop] if stop < count else size
    with open(plain, "rb") as fh:
        fh.seek(offsets[index])
        data = fh.read(end - offsets[index])
    return data.splitlines(keepends=True)
