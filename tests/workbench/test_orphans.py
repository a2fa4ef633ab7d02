"""A workbench killed with ``kill -9`` leaves no node or router serving: the kernel kills them with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from edge_server.lifeline import ENV, die_with_parent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

LAUNCHER = textwrap.dedent("""
    import asyncio, json, sys
    from workbench.run.cluster import Cluster
    from workbench.spec.scenario import Scenario

    async def main():
        scenario = Scenario.build(name="t-orphans", duration_s=2.0)
        async with Cluster.launch(scenario, sys.argv[1]) as cluster:
            pids = [p.pid for p in [*cluster.nodes.values(), cluster.router]]
            print(json.dumps(pids), flush=True)
            await asyncio.sleep(60)

    asyncio.run(main())
""")


def _gone(pids: list[int], timeout_s: float) -> list[int]:
    """The pids still running (zombies count as gone) after waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.1)
    return alive


def test_cluster_processes_die_with_a_killed_workbench(tmp_path: Path) -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    pids: list[int] = []
    try:
        line = launcher.stdout.readline() if launcher.stdout else ""
        assert line, "the launcher printed no pids (see its stderr above)"
        pids = json.loads(line)
        assert len(pids) == 4 and all(psutil.pid_exists(p) for p in pids)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        assert _gone(pids, 10.0) == [], "nodes outlived the workbench that started them"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid in pids:  # never leave one behind, whatever failed above
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_lifeline_is_off_unless_asked() -> None:
    assert die_with_parent({}) is False
    assert die_with_parent({ENV: "not-a-pid"}) is False
