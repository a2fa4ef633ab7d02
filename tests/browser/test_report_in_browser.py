"""A real drill's HTML report, opened in headless Chromium: every chart really drawn (plotly's SVG in
the DOM), the page within its size budget, and the open time recorded.

The issue's figure is "an HTML report with 6+ charts: <= 6 MB, opens (DOM ready, charts drawn) in
< 2 s".  Timings on a shared 2-core machine are noisy, so this test records the open time
(``benchmarks/results/report_render.json``, key ``test``) and only catches a pathological page;
``benchmarks/bench_report.py`` measures the figure (median of 5 opens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import CHARTS_DRAWN_JS, DRAWN_CHARTS_JS, new_page, open_until
from workbench.ui.report import write_report

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RESULTS_JSON = ROOT / "benchmarks" / "results" / "report_render.json"
SAVE_ENV = "WORKBENCH_SAVE_SCREENSHOTS"  # "docs" (or any folder): also save the screenshot there
MAX_BYTES = 6_000_000
SANITY_OPEN_MS = 15_000  # far above the 2 s figure: only a hung or broken page fails the test


@pytest.fixture(scope="module")
def drill_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short real drill (kill and restart a region), shared by the module: ~10 s of processes."""
    out = tmp_path_factory.mktemp("report-drill") / "drill"
    cmd = [sys.executable, "-m", "workbench.cli", "drill", "--duration-s", "6", "--kill-region-at-s", "2",
           "--restart-region-at-s", "4", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (out / "summary.json").exists(), f"the drill left no results:\n{proc.stdout}\n{proc.stderr}"
    return out


def _open_and_check(browser: Any, report: Path, min_charts: int, shot: Path) -> dict:
    page, watch = new_page(browser, width=1400, height=1000, offline=True)  # no CDN, nothing fetched
    t0 = time.perf_counter()
    timing = open_until(page, report.as_uri(), CHARTS_DRAWN_JS, timeout_s=30)
    wall_ms = (time.perf_counter() - t0) * 1000
    graphs = page.evaluate("document.querySelectorAll('.plotly-graph-div').length")
    drawn = page.evaluate(DRAWN_CHARTS_JS)
    traces = page.evaluate("document.querySelectorAll('.js-plotly-plot svg.main-svg g.trace, "
                           ".js-plotly-plot svg.main-svg g.shapelayer path').length")
    page.screenshot(path=str(shot), full_page=True)
    page.context.close()
    assert drawn == graphs >= min_charts, f"{drawn} of {graphs} charts drawn, want every one and >= {min_charts}"
    assert traces > 0, "charts have axes but no data drawn"
    assert not watch.errors, f"page errors: {watch.errors}"
    assert not watch.blocked, f"the report asked the network for {watch.blocked}"
    return {**timing, "wall_ms": round(wall_ms, 1), "charts": drawn}


def _record(key: str, entry: dict) -> None:
    """Merge this test's figures into the benchmark file (the benchmark's own keys are kept) when asked
    to (``WORKBENCH_RECORD_RENDER=1``): a plain test run must not rewrite a committed file."""
    if not os.environ.get("WORKBENCH_RECORD_RENDER"):
        print(f"render figures ({key}): {entry}")
        return
    data = json.loads(RESULTS_JSON.read_text(encoding="utf-8")) if RESULTS_JSON.exists() else {}
    data.setdefault("test", {})[key] = entry
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@pytest.mark.parametrize("runs", [1, 2], ids=["one-run", "comparison"])
def test_report_opens_with_every_chart_drawn(browser: Any, drill_results: Path, tmp_path: Path, runs: int):
    report = write_report([drill_results] * runs, tmp_path / "report.html")
    size = report.stat().st_size
    assert size <= MAX_BYTES, f"report is {size / 1e6:.2f} MB, over the 6 MB budget"
    shot = tmp_path / "report.png"
    result = _open_and_check(browser, report, 6 * runs, shot)
    assert shot.stat().st_size > 10_000
    entry = {"runs": runs, "bytes": size, **result, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "load_average_1m": round(os.getloadavg()[0], 2)}  # timings swing with the shared machine's load
    print(f"\nreport of {runs} run(s): {size / 1e6:.2f} MB, {result['charts']} charts drawn "
          f"{result['ready_ms']:.0f} ms after navigation start (wall {result['wall_ms']:.0f} ms)")
    _record(f"runs_{runs}", entry)
    assert result["ready_ms"] < SANITY_OPEN_MS, f"report took {result['ready_ms']:.0f} ms to draw its charts"
    folder = os.environ.get(SAVE_ENV, "").strip()
    if folder and runs == 1:
        dest = (ROOT / folder if not Path(folder).is_absolute() else Path(folder)) / "report-screenshot.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(shot.read_bytes())
