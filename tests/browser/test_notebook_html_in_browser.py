"""``workbench run NOTEBOOK --html``: the exported page, opened in headless Chromium with the network
blocked, draws every static figure the notebook left (plotly.js embedded once, no CDN needed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from workbench.browser import CHARTS_DRAWN_JS, DRAWN_CHARTS_JS, Browser
from workbench.run.notebooks import run_notebook

pytestmark = [pytest.mark.integration, pytest.mark.notebooks, pytest.mark.timeout(300)]

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


async def _open(page: Path, shot: Path) -> tuple[dict, int, int, list[str]]:
    async with Browser(width=1400, height=1000) as b:
        await b.block_network()
        timing = await b.open_until(page.as_uri(), CHARTS_DRAWN_JS, timeout_s=30)
        graphs = await b.evaluate("document.querySelectorAll('.plotly-graph-div').length")
        drawn = await b.evaluate(DRAWN_CHARTS_JS)
        await b.screenshot(shot, full_page=True)
        return timing, graphs, drawn, list(b.console)


def test_exported_quickstart_draws_every_figure_offline(chromium: str, tmp_path: Path):
    # Sync test: papermill runs its own event loop; the browser gets one of its own afterwards.
    run = run_notebook(NOTEBOOK, {}, tmp_path / "quickstart.ipynb", cell_timeout=300, html=True, log_output=False)
    assert run.ok, f"quickstart failed at cell {run.failed_cell}: {run.error}"
    assert run.html and Path(run.html).exists()
    timing, graphs, drawn, errors = asyncio.run(_open(Path(run.html), tmp_path / "quickstart-html.png"))
    assert drawn == graphs >= 6, f"{drawn} of {graphs} figures drawn"
    assert not errors, f"page errors: {errors}"
    print(f"\nexported quickstart: {drawn} figures drawn {timing['ready_ms']:.0f} ms after navigation start")
