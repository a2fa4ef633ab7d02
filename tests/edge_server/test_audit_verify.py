"""``edge-server audit verify``: every kind of tampering is caught and named; a good trail, archived
(compressed) segments and a torn last line pass.  Trails are real files written by ``AuditLog``;
the command runs as a real process where its exit status is the point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from audit_trail import SECRET, decompress, recompress, write_trail

from edge_server.audit.chain import ChainKeys
from edge_server.audit.segments import scan
from edge_server.audit.verify import NodeReport, verify_paths

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, secret: bytes | None = SECRET) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if secret is not None:
        env["EDGE_CLUSTER_SECRET"] = secret.decode()
    return subprocess.run([sys.executable, "-m", "edge_server", "audit", *args], capture_output=True, text=True,
                          timeout=30, cwd=REPO, env=env)


def _verify(folder: Path, secret: bytes = SECRET) -> NodeReport:
    (report,) = verify_paths([folder], ChainKeys(secret))
    return report


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    """eu-1: 1500 events, ~12 sealed segments and an open one."""
    write_trail(tmp_path, 1500)
    return tmp_path


def _segment(folder: Path, index: int) -> Path:
    files = scan(folder, "eu-1")
    return files.sealed[sorted(files.sealed)[index]]


def test_a_good_trail_verifies_with_exit_0(trail: Path) -> None:
    report = _verify(trail)
    assert report.ok and report.events == 1500 and report.sealed >= 10, report.summary()
    out = _cli("verify", str(trail))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "eu-1: ok: 1500 events (seq 1..1500)" in out.stdout
    # Archived sealed segments alone (moved elsewhere, no open segment) verify too, named by the
    # archive folder or by the node's folder inside it.
    archive = trail / "archive"
    archive.mkdir()
    (trail / "eu-1").rename(archive / "eu-1")
    for folder in (archive, archive / "eu-1"):
        report = _verify(folder)
        assert report.ok and report.node == "eu-1" and report.sealed >= 10, report.summary()
        assert report.events == report.last_seq < 1500


def test_an_edited_event_in_a_sealed_segment_is_named(trail: Path) -> None:
    seg = _segment(trail, 3)
    lines = decompress(seg)
    ev = orjson.loads(lines[10])
    ev["cost"] = 1000
    lines[10] = orjson.dumps(ev) + b"\n"
    recompress(seg, lines)
    report = _verify(trail)
    assert not report.ok and report.problem is not None
    assert report.problem.file == seg and report.problem.line == 12 and report.problem.seq == ev["seq"] + 1
    assert "prev hash does not match" in report.problem.what
    out = _cli("verify", str(trail))
    assert out.returncode == 1 and f"{seg}:12: seq {ev['seq'] + 1}:" in out.stdout, out.stdout


def test_an_edited_last_event_of_a_sealed_segment_is_caught_by_its_head(trail: Path) -> None:
    seg = _segment(trail, 2)
    lines = decompress(seg)
    lines[-1] = lines[-1].replace(b'"cost":', b'"cost":9')
    recompress(seg, lines)
    report = _verify(trail)
    assert report.problem is not None and report.problem.file == seg
    assert "last_hash" in report.problem.what and "signed head" in report.problem.what


def test_a_deleted_event_is_named(trail: Path) -> None:
    active = trail / "eu-1.jsonl"
    lines = active.read_bytes().splitlines(keepends=True)
    gone = orjson.loads(lines[5])["seq"]
    del lines[5]
    active.write_bytes(b"".join(lines))
    report = _verify(trail)
    assert report.problem is not None and report.problem.file == active and report.problem.line == 6
    assert report.problem.seq == gone + 1 and "missing" in report.problem.what


def test_reordered_events_are_named(trail: Path) -> None:
    seg = _segment(trail, 1)
    lines = decompress(seg)
    lines[20], lines[21] = lines[21], lines[20]
    recompress(seg, lines)
    report = _verify(trail)
    assert report.problem is not None and report.problem.line == 21
    assert "expected" in report.problem.what


def test_a_truncated_sealed_segment_is_caught(trail: Path) -> None:
    seg = _segment(trail, 4)
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) // 2])  # cut the compressed file
    report = _verify(trail)
    assert report.problem is not None and report.problem.file == seg
    # Cut whole lines off its end instead (recompressed): the head still holds the real end.
    seg.write_bytes(data)
    lines = decompress(seg)
    recompress(seg, lines[:-5])
    report = _verify(trail)
    assert report.problem is not None and report.problem.file == seg and "signed head" in report.problem.what


def test_a_deleted_segment_is_named(trail: Path) -> None:
    files = scan(trail, "eu-1")
    first = sorted(files.sealed)[2]
    files.sealed[first].unlink()
    files.heads[first].unlink()
    report = _verify(trail)
    assert report.problem is not None and report.problem.seq == first
    assert "missing" in report.problem.what and "manifest does not record" in report.problem.what


def test_an_edited_head_and_a_foreign_trail_are_refused(trail: Path) -> None:
    files = scan(trail, "eu-1")
    head_path = files.heads[sorted(files.heads)[1]]
    head = orjson.loads(head_path.read_bytes())
    original = head_path.read_bytes()
    head["events"] -= 1
    head_path.write_bytes(orjson.dumps(head))
    report = _verify(trail)
    assert report.problem is not None and report.problem.file == head_path
    assert "signature does not match" in report.problem.what
    head_path.write_bytes(original)
    report = _verify(trail, b"another-cluster-secret")  # someone else's trail, or the wrong secret
    assert report.problem is not None and "another key" in report.problem.what
    out = _cli("verify", str(trail), secret=b"another-cluster-secret")
    assert out.returncode == 1


def test_a_torn_last_line_is_reported_as_such_not_as_tampering(trail: Path) -> None:
    with open(trail / "eu-1.jsonl", "ab") as fh:
        fh.write(b'{"seq":1501,"id":"eu-1:15')
    out = _cli("verify", str(trail))
    assert out.returncode == 0, out.stdout
    assert "torn write" in out.stdout and "eu-1: ok: 1500 events" in out.stdout


def test_removed_segments_are_accepted_only_as_the_manifest_records(tmp_path: Path) -> None:
    write_trail(tmp_path, 2000, retention_bytes=5000)
    report = _verify(tmp_path)
    assert report.ok and report.removed > 0 and report.events + report.removed_events == 2000, report.summary()
    manifest = scan(tmp_path, "eu-1").manifest
    lines = manifest.read_bytes().splitlines(keepends=True)
    rec = orjson.loads(lines[0])
    rec["last_seq"] += 1  # claim a different range was removed
    manifest.write_bytes(orjson.dumps(rec) + b"\n" + b"".join(lines[1:]))
    report = _verify(tmp_path)
    assert report.problem is not None and report.problem.file == manifest and report.problem.line == 1


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    write_trail(tmp_path, 10)
    assert _cli("verify", str(tmp_path), secret=None).returncode == 2  # no secret
    out = _cli("verify", str(tmp_path / "nope"))
    assert out.returncode == 2 and "not a folder" in out.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli("verify", str(empty)).returncode == 2
    assert _cli("verify").returncode == 2
    assert _cli("frobnicate", str(tmp_path)).returncode == 2
    assert "Traceback" not in out.stderr
