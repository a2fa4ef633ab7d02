"""A node's boot id: wall-clock milliseconds at start, but never lower than the last boot's + 1.

Peers refuse a message whose ``(boot, seq)`` is not newer than the last one they saw from that node
(:class:`edge_server.wire.ReplayGuard`).  A boot id taken from the wall clock alone goes backwards when
a node restarts with its clock set back (NTP step, a VM restored from a snapshot): every peer would
refuse it as ``replayed`` until its clock passed the old boot, and it would admit almost nothing
(found by the simulator: 1 of 545 requests in 13 s).  So the last boot id is kept in the node's data
directory and the next one is ``max(now_ms, last + 1)``.  A node that lost its data directory falls
back to the wall clock (it restarts cold anyway; peers accept it once its clock passes the old boot).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["next_boot", "take_boot"]


def next_boot(now_ms: int, last: int | None) -> int:
    """The pure rule: the wall clock, unless that would not grow past the last boot."""
    return now_ms if last is None or now_ms > last else last + 1


def take_boot(data_dir: Path, node_id: str, now_ms: int) -> int:
    """Read the last boot id of ``node_id`` from ``data_dir``, choose the next, persist it, return it."""
    path = Path(data_dir) / f"{node_id}.boot"
    try:
        last: int | None = int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        last = None  # first start, lost data directory, or a torn file: the wall clock decides
    boot = next_boot(now_ms, last)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(f"{boot}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable data directory is reported by the audit trail's own checks
    return boot
