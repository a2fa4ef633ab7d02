"""``workbench run NOTEBOOK --html``: the exported page, opened in headless Chromium with the network
blocked, draws every static figure the notebook left (plotly.js embedded once, no CDN needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import CHARTS_DRAWN_JS, DRAWN_CHARTS_JS, new_page, open_until
from workbench.run.notebooks import run_notebook

pytestmark = [pytest.mark.integration, pytest.mark.notebooks, pytest.mark.timeout(300)]

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"


def test_exported_quickstart_draws_every_figure_offline(browser: Any, tmp_path: Path):
    run = run_notebook(NOTEBOOK, {}, tmp_path / "quickstart.ipynb", cell_timeout=300, html=True, log_output=False)
    assert run.ok, f"quickstart failed at cell {run.failed_cell}: {run.error}"
    assert run.html and Path(run.html).exists()
    page, watch = new_page(browser, offline=True)
    timing = open_until(page, Path(run.html).as_uri(), CHARTS_DRAWN_JS, timeout_s=30)
    graphs = page.evaluate("document.querySelectorAll('.plotly-graph-div').length")
    drawn = page.evaluate(DRAWN_CHARTS_JS)
    page.screenshot(path=str(tmp_path / "quickstart-html.png"), full_page=True)
    assert drawn == graphs >= 6, f"{drawn} of {graphs} figures drawn"
    assert not watch.errors, f"page errors: {watch.errors}"
    assert plotly_scripts(page) == 1, "plotly.js should be embedded exactly once"
    print(f"\nexported quickstart: {drawn} figures drawn {timing['ready_ms']:.0f} ms after navigation start; "
          f"requests refused offline: {watch.blocked}")


def plotly_scripts(page: Any) -> int:
    """Inline scripts that are a plotly.js bundle (full or basic: both start with plotly's banner)."""
    return page.evaluate("[...document.scripts].filter(s => !s.src && s.text.length > 1e6"
                         " && /plotly\\.js.{0,30} v\\d/.test(s.text.slice(0, 300))).length")
