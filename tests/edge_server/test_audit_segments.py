"""Segments, checkpoints, retention and recovery of the audit trail, on real files.

A restart reads the newest checkpoint and only the segments after it; whatever does not fit (a
checkpoint that disagrees with its segment, a foreign one, a missing segment) stops the node with
an error naming the file; a torn last line is cut off and everything before it kept.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import signal
import time
from pathlib import Path

import orjson
import pytest
from audit_trail import SECRET, write_trail

from edge_server.audit import AuditCorrupt, AuditLog
from edge_server.audit.chain import ChainKeys
from edge_server.audit.segments import scan
from edge_server.config import AuditConfig

pytestmark = pytest.mark.timeout(60)


def _reopen(audit_dir: Path, **config: object) -> AuditLog:
    log = AuditLog(audit_dir, "eu-1", "eu", SECRET, AuditConfig(segment_bytes=8192, **config))  # type: ignore[arg-type]
    log.open()
    return log


def _expected_own(events: int, keys: int = 5) -> dict[str, tuple[int, int]]:
    own: dict[str, int] = {}
    for i in range(events):
        own[f"k{i % keys}"] = own.get(f"k{i % keys}", 0) + 1 + i % 3
    return {k: (7, c) for k, c in own.items()}


def test_segments_are_bounded_sealed_and_compressed(tmp_path: Path) -> None:
    log = write_trail(tmp_path, 2000, segment_bytes=8192)
    # Memory: one offset per event of the open segment only (it was one per event of the whole
    # trail, ~8 bytes an event for ever), one integer per segment.
    assert len(log._offsets) < 60 and log.segment_count >= 10
    files = scan(tmp_path, "eu-1")
    assert len(files.sealed) >= 10 and not files.plain
    assert set(files.sealed) == set(files.heads)
    for first, path in files.sealed.items():
        lines = gzip.decompress(path.read_bytes()).splitlines()  # a plain .gz: zcat reads it
        assert orjson.loads(lines[0])["seq"] == first
        plain_size = sum(len(line) + 1 for line in lines)
        assert plain_size < 8192 + 300  # bounded: at most one batch past the setting
        assert path.stat().st_size < plain_size / 2  # compressed
        head = orjson.loads(files.heads[first].read_bytes())
        assert ChainKeys(SECRET).check(head) is None and head["events"] == len(lines)
    assert 0 < files.active.stat().st_size < 8192 + 300


def test_restart_replays_only_the_tail_and_recovers_every_count(tmp_path: Path) -> None:
    write_trail(tmp_path, 3000)
    log = _reopen(tmp_path)
    try:
        rec = log.recovered
        assert rec is not None and rec.checkpoint
        assert rec.events == 3000 and rec.next_seq == 3001
        assert rec.total_cost == sum(1 + i % 3 for i in range(3000))
        assert dict(rec.own) == _expected_own(3000)
        # Only what follows the checkpoint: far less than the trail (3000 events, ~24 segments).
        assert 0 < rec.replayed_events < 300, rec.replayed_events
        # Reads see the whole trail, across sealed segments and the open one.
        seqs = [e["seq"] for e in log.read(0, 10_000)]
        assert seqs == list(range(1, 3001))
        assert [e["seq"] for e in log.read(1234, 3)] == [1235, 1236, 1237]
    finally:
        log.close()
    # And writing continues the same chain and numbering.
    write_trail(tmp_path, 10)
    log = _reopen(tmp_path)
    try:
        assert log.last_seq == 3010 and log.recovered is not None and log.recovered.events == 3010
    finally:
        log.close()


def test_restart_time_does_not_grow_with_the_trail(tmp_path: Path) -> None:
    """The replayed part is the same for a short and a ten times longer trail (no timing asserted)."""
    short, long = tmp_path / "short", tmp_path / "long"
    write_trail(short, 600)
    write_trail(long, 6000)
    replayed = []
    for folder in (short, long):
        log = _reopen(folder)
        assert log.recovered is not None
        replayed.append(log.recovered.replayed_bytes)
        log.close()
    assert replayed[1] < 2 * 8192 + 600 and replayed[0] < 2 * 8192 + 600, replayed


def test_retention_by_size_removes_oldest_and_records_them(tmp_path: Path) -> None:
    write_trail(tmp_path, 3000, retention_bytes=6000)
    files = scan(tmp_path, "eu-1")
    kept = sum(p.stat().st_size for p in files.sealed.values())
    assert kept <= 6000 + max(p.stat().st_size for p in files.sealed.values())
    records = [orjson.loads(line) for line in files.manifest.read_bytes().splitlines()]
    assert records and all(r["reason"] == "size" for r in records)
    assert records[0]["first_seq"] == 1
    assert all(ChainKeys(SECRET).check(r) is None for r in records)
    for r in records:
        assert r["first_seq"] not in files.sealed  # gone from the node, and recorded
    assert min(files.sealed) == records[-1]["last_seq"] + 1  # what is left continues the removed
    log = _reopen(tmp_path)  # and a restart still recovers every count
    try:
        assert log.recovered is not None and dict(log.recovered.own) == _expected_own(3000)
        assert log.read(0, 5)[0]["seq"] == min(files.sealed)  # reads start at the oldest kept event
    finally:
        log.close()


def test_retention_by_age(tmp_path: Path) -> None:
    write_trail(tmp_path, 1000, ts=time.time() - 3600)  # an hour old
    write_trail(tmp_path, 1500, retention_s=600)  # the new run's seals apply a 10-minute retention
    records = [orjson.loads(line) for line in scan(tmp_path, "eu-1").manifest.read_bytes().splitlines()]
    assert records and {r["reason"] for r in records} == {"age"}
    assert all(r["last_ts"] < time.time() - 600 for r in records)


def test_a_crash_during_a_seal_is_finished_at_restart(tmp_path: Path) -> None:
    write_trail(tmp_path, 500, segment_bytes=1 << 30)  # one open segment, never sealed
    files = scan(tmp_path, "eu-1")
    files.folder.mkdir(exist_ok=True)
    # As a crash right after the rename leaves it: the segment in the folder, plain, no head.
    shutil.move(files.active, files.folder / "seg-000000000001.jsonl")
    log = _reopen(tmp_path)
    try:
        assert log.recovered is not None and log.recovered.events == 500
        assert dict(log.recovered.own) == _expected_own(500)
        assert log.recovered.replayed_events == 500
    finally:
        log.close()
    files = scan(tmp_path, "eu-1")
    assert 1 in files.sealed and 1 in files.heads and 1 in files.ckpts and not files.plain
    log = _reopen(tmp_path)
    try:
        assert log.recovered is not None and log.recovered.replayed_events == 0
        assert dict(log.recovered.own) == _expected_own(500)
    finally:
        log.close()


def test_torn_last_line_is_cut_and_everything_before_kept(tmp_path: Path) -> None:
    write_trail(tmp_path, 1000)
    active = tmp_path / "eu-1.jsonl"
    with open(active, "ab") as fh:
        fh.write(b'{"seq":1001,"id":"eu-1:1001","key":"k0","co')
    log = _reopen(tmp_path)
    try:
        assert log.recovered is not None
        assert log.recovered.truncated_bytes == len(b'{"seq":1001,"id":"eu-1:1001","key":"k0","co')
        assert log.recovered.events == 1000 and dict(log.recovered.own) == _expected_own(1000)
        assert active.read_bytes().endswith(b"}\n")
    finally:
        log.close()


def _resign(path: Path, secret: bytes = SECRET, **changes: object) -> None:
    doc = orjson.loads(path.read_bytes())
    doc.update(changes)
    path.write_bytes(orjson.dumps(ChainKeys(secret).sign(doc)))


def test_checkpoint_that_does_not_match_its_segment_is_refused(tmp_path: Path) -> None:
    write_trail(tmp_path, 2000)
    ckpt = scan(tmp_path, "eu-1").ckpts
    newest = ckpt[max(ckpt)]
    _resign(newest, last_hash="f" * 32)  # correctly signed, but not this segment's end
    with pytest.raises(AuditCorrupt, match=r"ckpt\.json: does not match its segment's head .*last_hash"):
        _reopen(tmp_path)


def test_edited_or_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    write_trail(tmp_path, 2000)
    ckpts = scan(tmp_path, "eu-1").ckpts
    newest = ckpts[max(ckpts)]
    original = newest.read_bytes()
    doc = orjson.loads(original)
    doc["own"] = [[k, [g, 0]] for k, (g, _c) in doc["own"]]  # lower every count: what a restart must never do
    newest.write_bytes(orjson.dumps(doc))
    with pytest.raises(AuditCorrupt, match="signature does not match"):
        _reopen(tmp_path)
    newest.write_bytes(original)
    _resign(newest, b"another-cluster-secret")
    with pytest.raises(AuditCorrupt, match="another key"):
        _reopen(tmp_path)


def test_a_missing_segment_after_the_checkpoint_is_refused(tmp_path: Path) -> None:
    write_trail(tmp_path, 500, segment_bytes=1 << 30)
    write_trail(tmp_path, 2000)  # seals the first big segment, then more
    files = scan(tmp_path, "eu-1")
    for first in sorted(files.ckpts)[:-1]:
        files.ckpts[first].unlink()  # keep only the newest checkpoint
    newest = max(files.ckpts)
    files.ckpts[newest].unlink()  # now none: a full replay is needed from seq 1 ...
    files.sealed[min(files.sealed)].unlink()  # ... and the first segment is gone
    with pytest.raises(AuditCorrupt, match="a segment is missing"):
        _reopen(tmp_path)


def test_a_foreign_segment_is_refused(tmp_path: Path) -> None:
    write_trail(tmp_path / "a", 300, segment_bytes=1 << 30, node="eu-1")
    write_trail(tmp_path / "b", 300, segment_bytes=1 << 30, node="us-1")
    shutil.copy(tmp_path / "b" / "us-1.jsonl", tmp_path / "a" / "eu-1.jsonl")
    with pytest.raises(AuditCorrupt, match=r"prev hash does not match|not 'eu-1'"):
        _reopen(tmp_path / "a")


def test_a_failed_write_leaves_no_trace_and_numbering_continues(tmp_path: Path) -> None:
    """A write that fails half way (a file size limit: a real EFBIG, like a full disk) is cut off."""

    async def run() -> None:
        log = AuditLog(tmp_path, "eu-1", "eu", SECRET, AuditConfig(segment_bytes=1 << 30))
        log.open()
        await log.append("k", 1, 7, "ok-1", time.time())
        size = log._size
        good = log._fd
        pipe_r, pipe_w = os.pipe()
        os.close(pipe_r)  # writes to the pipe now fail with EPIPE: nothing reaches the file
        log._fd = pipe_w
        old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            futures = [log.append("k", 2, 7, f"lost-{i}", time.time()) for i in range(3)]
            for f in futures:
                with pytest.raises(OSError, match="audit write failed"):
                    await f
        finally:
            signal.signal(signal.SIGPIPE, old)
            os.close(pipe_w)
            log._fd = good
        assert log.last_seq == 1 and log._size == size
        await log.append("k", 1, 7, "ok-2", time.time())
        log.close()

    asyncio.run(run())
    log = _reopen(tmp_path)
    try:
        assert log.recovered is not None and log.recovered.events == 2
        assert [e["request_id"] for e in log.read(0, 10)] == ["ok-1", "ok-2"]
    finally:
        log.close()


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("count", [0, 1, 4096, 9000])
def test_a_streamed_checkpoint_is_the_document_sign_would_give(tmp_path: Path, count: int, columns: bool) -> None:
    from edge_server.audit.seal import write_checkpoint

    keys = ChainKeys(SECRET)
    pairs = [(f'k"{i}\\', (1_700_000_000_000 + i, i % 7)) for i in range(count)]  # quotes escaped in keys
    own = ([k for k, _ in pairs], [e for _, e in pairs]) if columns else pairs
    doc = {"v": 1, "kind": "edge-audit-checkpoint", "node": "eu-1", "segment": 'seg-"own":[]', "last_seq": 9,
           "own": own, "events": 9, "total_cost": 12, "max_gen": 3}
    path = tmp_path / "c.ckpt.json"
    write_checkpoint(path, keys, doc)
    got = orjson.loads(path.read_bytes())
    assert keys.check(got) is None
    assert got == orjson.loads(orjson.dumps(keys.sign({**doc, "own": pairs})))
    got["own"][0:1] = [["k", [1, 99]]] if count else [["k", [1, 1]]]  # an edit is caught
    assert keys.check(got) is not None


def test_a_closed_segment_not_yet_sealed_is_read_by_its_offsets_then_from_its_blocks(tmp_path: Path) -> None:
    """A replica's next lines right after a rotation come from the closed, unsealed segment: read by
    seek from the offsets kept for it (a scan from its start held the event loop for tens of ms at
    every rotation), and the same lines once the seal has replaced it with gzip blocks."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    async def run() -> None:
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(max_workers=1)
        loop.set_default_executor(pool)
        hold = threading.Event()
        busy = loop.run_in_executor(None, hold.wait, 10.0)  # the seal queues behind this job
        log = AuditLog(tmp_path, "eu-1", "eu", SECRET, AuditConfig(segment_bytes=8192, replicate=False))
        log.open()
        try:
            for i in range(300):
                await log.append(f"k{i % 5}", 1, 7, f"req-{i}", time.time())
                if log._closed:
                    break
            assert log._closed, "no rotation within 300 events"
            first = next(iter(log._closed))
            last = log._active_first - 1
            whole = log.read_raw(first - 1, last - first + 1)
            assert [orjson.loads(line)["seq"] for line in whole] == list(range(first, last + 1))
            unsealed = {after: log.read_raw(after, 7) for after in range(first - 1, last + 1)}
            for after, lines in unsealed.items():
                assert lines == (whole[after - first + 1:] + log.read_raw(last, 7))[:7]
        finally:
            hold.set()
            await busy
        await log.wait_sealed()
        assert first not in log._closed
        try:
            for after, lines in unsealed.items():
                assert log.read_raw(after, 7) == lines
        finally:
            log.close()
            pool.shutdown()

    asyncio.run(run())
