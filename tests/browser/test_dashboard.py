"""``workbench dashboard NOTEBOOK``: Voila serves the quickstart as a wall screen -- the page appears while
the drill runs, the live chart draws and grows, no code is shown, and the run leaves its verdict.
(Bad input: tests/workbench/test_dashboard_cli.py.)"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import new_page
from tests.support.lab import ServerProcess, free_port

pytestmark = [pytest.mark.integration, pytest.mark.notebooks, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
LIVE = "document.querySelector('.wb-live')"


@pytest.fixture()
def dashboard(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    port = free_port()
    cmd = [sys.executable, "-m", "workbench.cli", "dashboard", str(NOTEBOOK), "--port", str(port),
           "-p", "duration_s", "8", "-p", "name", "wall"]
    server = ServerProcess(cmd, tmp_path, {}, tmp_path / "dashboard.log")
    try:
        server.wait_port(port, timeout_s=60)  # a GET of the page would start the run
        yield server, f"http://127.0.0.1:{port}/"
    finally:
        server.stop()


def test_dashboard_shows_the_live_run_without_code(browser: Any, dashboard: tuple[ServerProcess, str],
                                                   tmp_path: Path):
    server, url = dashboard
    page, watch = new_page(browser, width=1500, height=1100, offline=True, allow=(url.rstrip("/"),))
    t0 = time.monotonic()
    page.goto(url, wait_until="commit", timeout=120_000)
    page.wait_for_function(f"() => {LIVE} && +{LIVE}.dataset.points > 0", timeout=120_000, polling=200)
    server.remember_children()
    shown_s = time.monotonic() - t0
    before = page.evaluate(f"() => +{LIVE}.dataset.points")
    time.sleep(2.0)
    after = page.evaluate(f"() => {LIVE} ? +{LIVE}.dataset.points : -1")
    assert after > before, f"the live chart did not grow in 2 s ({before} -> {after} points)"
    body = page.inner_text("body")
    assert "Scenario.build" not in body and "run_with_dashboard" not in body, "code is shown on the wall screen"
    page.wait_for_function("() => /every invariant held|FAILED|run failed/.test(document.body.innerText)",
                           timeout=120_000, polling=500)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    # The wall screen must show the verdict, whichever it is (a loaded host may fail the drill's bounds):
    # held, or FAILED with its reasons.
    body = page.inner_text("body")
    assert "every invariant held" in body or ("FAILED" in body and ":" in body.split("FAILED", 1)[1]), body[-2000:]
    assert (tmp_path / "results").is_dir() and list((tmp_path / "results").glob("wall*/summary.json")), \
        "the run's results did not land in ./results of the folder the command ran in"
    # Voila's page template links Font Awesome's CSS from a CDN (icons only); nothing else may leave.
    other = [u for u in watch.blocked if "fontawesome" not in u]
    assert not other, f"the dashboard asked the network for {other[:5]}"
    print(f"\ndashboard: live chart drawn {shown_s:.1f} s after the page was requested")
