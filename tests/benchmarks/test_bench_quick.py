"""``benchmarks/run_all.py --quick`` runs every benchmark and writes valid results (no figure is
asserted: figures from a shared test machine say nothing; the point is that `make bench` works).

A missed target never fails it: targets are reported in the results files and in targets-quick.json,
and only a full run prints their summary (benchmarks/README.md, "Targets")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
BUDGET_S = 540  # the quick run takes about 4 minutes on 2 busy cores (253 s measured); a busy CI machine gets slack

sys.path.insert(0, str(REPO))

from benchmarks._targets import check_targets, targets_of  # noqa: E402
from benchmarks.run_all import BENCHMARKS, FULL_ONLY  # noqa: E402


@pytest.mark.integration
@pytest.mark.timeout(BUDGET_S + 60)
def test_run_all_quick_writes_every_result() -> None:
    started = time.time()
    token = uuid.uuid4().hex  # inherited by every process the run starts: finds any left behind
    env = {**os.environ, "BENCH_QUICK_TEST_TOKEN": token}
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=BUDGET_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # run_all forwards the stop to the running benchmark
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=10)
        pytest.fail(f"run_all.py --quick ran over {BUDGET_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    quick_run = {s: v for s, v in BENCHMARKS.items() if s not in FULL_ONLY}
    for _script, (name, _full, _quick) in quick_run.items():
        path = RESULTS / f"{name}-quick.json"
        assert path.exists(), f"{path.name} not written\n{out[-2000:]}"
        assert path.stat().st_mtime >= started - 1, f"{path.name} is stale (not written by this run)"
        doc = json.loads(path.read_text())
        assert isinstance(doc, dict) and doc.get("quick") is True, path.name
        targets_of(doc, path.name)  # well-formed (raises naming the entry otherwise)
    assert (RESULTS / "targets-quick.json").stat().st_mtime >= started - 1
    summary = json.loads((RESULTS / "targets-quick.json").read_text())
    assert summary["quick"] is True and summary["failed"] == []
    assert set(summary["runs"]) == set(quick_run)
    for script, run in summary["runs"].items():
        assert run["status"] in ("ok", "missed"), (script, run["why"])
        check_targets(run["targets"], script)
    assert "targets (reported, never failed on)" not in out  # only a full run prints the summary
    report = RESULTS / "report-quick.html"
    assert report.exists() and report.stat().st_mtime >= started - 1
    assert report.read_text(encoding="utf-8").count("<script") >= 1
    time.sleep(0.5)
    assert not _left_behind(token), f"processes left behind: {_left_behind(token)}"


def _left_behind(token: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get("BENCH_QUICK_TEST_TOKEN") == token:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}")
        except psutil.Error:
            continue
    return found
