"""A notebook's drill runs in a child process: progress streams back, and Stop ends it cleanly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from workbench.run.drill_worker import DrillProcess
from workbench.spec.scenario import Scenario

pytestmark = pytest.mark.integration


async def test_stop_ends_the_child_drill_cleanly_with_partial_results(tmp_path: Path):
    drill = DrillProcess(Scenario.build(name="t-stop", duration_s=30, load_rps=50), tmp_path / "run")
    ticks: list[float] = []

    async def press_stop() -> None:
        while len(ticks) < 4:  # the run is going: progress arrived from the child
            await asyncio.sleep(0.05)
        drill.stop()

    started = time.monotonic()
    presser = asyncio.create_task(press_stop())
    result = await asyncio.wait_for(drill.run(lambda snapshot, view: ticks.append(snapshot["t_s"])), 60)
    await presser
    assert time.monotonic() - started < 20  # far from the 30 s it was asked to run
    assert not result.recording.complete and "stop" in result.recording.incomplete_reason
    assert result.recording.requests and result.summary["invariants_ok"] is False
    assert (tmp_path / "run" / "meta.json").exists()
