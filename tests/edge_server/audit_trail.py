"""Helpers for the audit tests: write a real trail with :class:`AuditLog` (real files, real gzip)."""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path

from edge_server.audit import AuditLog
from edge_server.config import AuditConfig

__all__ = ["SECRET", "decompress", "recompress", "write_trail"]

SECRET = b"audit-test-secret-0123456789"


def write_trail(audit_dir: Path, events: int, *, node: str = "eu-1", segment_bytes: int = 8192,
                keys: int = 5, ts: float | None = None, retention_s: float = 0.0, retention_bytes: int = 0,
                close: bool = True) -> AuditLog:
    """``events`` grants (key ``k<i % keys>``, cost ``1 + i % 3``, one per loop turn) into a fresh or
    existing trail; every closed segment sealed before it returns."""
    config = AuditConfig(segment_bytes=segment_bytes, retention_s=retention_s, retention_bytes=retention_bytes)

    async def run() -> AuditLog:
        log = AuditLog(audit_dir, node, "eu", SECRET, config)
        log.open()
        start = time.time() if ts is None else ts
        for i in range(events):
            await log.append(f"k{i % keys}", 1 + i % 3, 7, f"req-{i}", start + i * 0.001)
        await log.wait_sealed()
        if close:
            log.close()
        return log

    return asyncio.run(run())


def decompress(path: Path) -> list[bytes]:
    return gzip.decompress(path.read_bytes()).splitlines(keepends=True)


def recompress(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(gzip.compress(b"".join(lines)))
