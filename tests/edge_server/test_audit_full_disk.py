"""A write that the file system refuses half way (a real EFBIG from a file size limit, as a full
disk gives ENOSPC): the batch fails, the half-written bytes are cut off, the numbering and the hash
chain roll back, and the trail is still whole afterwards.  Run in a child process: the limit
applies to the whole process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from audit_trail import SECRET

from edge_server.audit import AuditLog
from edge_server.audit.chain import ChainKeys
from edge_server.audit.verify import verify_node
from edge_server.config import AuditConfig

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import asyncio, resource, signal, sys, time
    from pathlib import Path
    from edge_server.audit import AuditLog, AuditUnavailable
    from edge_server.config import AuditConfig

    async def main(folder: Path, secret: bytes) -> None:
        log = AuditLog(folder, "eu-1", "eu", secret, AuditConfig(segment_bytes=1 << 30))
        log.open()
        for i in range(20):
            await log.append("k", 1, 7, f"ok-{i}", time.time())
        # The file may grow by 300 more bytes: a batch of ten events (~2.3 kB) gets half written.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (log._size + 300, resource.RLIM_INFINITY))
        lost = [log.append("k", 5, 7, f"lost-{i}", time.time()) for i in range(10)]
        failed = 0
        for f in lost:
            try:
                await f
            except AuditUnavailable as exc:
                failed += 1
                reason = str(exc)
        print("failed", failed, reason, "last_seq", log.last_seq, flush=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        await log.append("k", 1, 7, "after", time.time())
        log.close()

    asyncio.run(main(Path(sys.argv[1]), sys.argv[2].encode()))
""")


def test_half_written_batch_is_cut_off_and_the_trail_stays_whole(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), SECRET.decode()], capture_output=True,
                         text=True, timeout=30, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("failed 10 "), out.stdout
    assert "audit write failed: File too large" in out.stdout and "last_seq 20" in out.stdout, out.stdout
    data = (tmp_path / "eu-1.jsonl").read_bytes()
    assert data.endswith(b"\n") and b"lost-" not in data  # nothing of the failed batch stayed
    log = AuditLog(tmp_path, "eu-1", "eu", SECRET, AuditConfig())
    rec = log.open()
    try:
        assert rec.events == 21 and rec.truncated_bytes == 0 and rec.own["k"] == (7, 21)
        assert [e["seq"] for e in log.read(0, 100)] == list(range(1, 22))
        assert log.read(20, 1)[0]["request_id"] == "after"
    finally:
        log.close()
    report = verify_node(tmp_path, "eu-1", ChainKeys(SECRET))
    assert report.ok and report.events == 21, report.summary()
