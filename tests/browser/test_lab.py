"""The notebooks in a real JupyterLab in headless Chromium, as a user meets them.

One JupyterLab for the module (tests/support/lab.py).  Every notebook opens with its kernel idle and
its parameters cell shown; Run All on the quickstart shows the live chart, which draws and changes,
and leaves the verdict with no error output; Stop ends a run at once and the notebook says the run
is incomplete.  Results go to temp folders, never to the repository's notebooks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import new_page
from tests.support.lab import STOP_BUTTON, Lab, LabPage, notebook_copy
from workbench.history import Recording

pytestmark = [pytest.mark.integration, pytest.mark.notebooks, pytest.mark.timeout(300)]

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lab") / "notebooks"
    root.mkdir()
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook_copy(nb, root)
    quickstart = NOTEBOOKS / "quickstart.ipynb"
    notebook_copy(quickstart, root, dst_name="live.ipynb", name="live", duration_s=10.0)  # a few bins to draw
    notebook_copy(quickstart, root, dst_name="stop.ipynb", name="stop", duration_s=60.0)  # long: to be stopped
    server = Lab(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def lab_page(lab: Lab, browser: Any, tmp_path: Path) -> Iterator[LabPage]:
    page, watch = new_page(browser, width=1500, height=1100, offline=True, allow=(lab.base,))
    try:
        yield LabPage(lab, page, debug_dir=tmp_path)
    finally:
        lab.remember_children()
        page.context.close()
    assert not watch.blocked, f"JupyterLab asked the network for {watch.blocked[:5]}"


def test_every_notebook_opens_with_its_parameters(lab_page: LabPage):
    for nb in sorted(NOTEBOOKS.glob("*.ipynb")):
        lab_page.open(nb.name)
        text = lab_page.text()
        assert "duration_s" in text and "results_dir" in text, f"{nb.name}: no parameters cell shown"
        lab_page.evaluate("window.jupyterapp.commands.execute('kernelmenu:shutdown')")


def test_run_all_draws_live_charts_that_change_then_the_verdict(lab_page: LabPage):
    lab_page.open("live.ipynb")
    t_run = lab_page.run_all()
    first = lab_page.wait("(() => { const el = document.querySelector('.jp-OutputArea .wb-live');"
                          " return el && +el.dataset.points > 0; })()", timeout_s=90)
    assert first
    shown_after_s = time.monotonic() - t_run
    before = lab_page.live()
    time.sleep(2.0)
    after = lab_page.live()
    assert before is not None and after is not None
    assert after["draws"] > before["draws"], f"the live chart did not redraw in 2 s: {before} -> {after}"
    assert after["points"] > before["points"], f"no new points in 2 s: {before} -> {after}"
    assert after["pixels"] != before["pixels"], "the canvases drew the same picture"
    assert "s left" in lab_page.status()
    lab_page.wait_output("every invariant held|FAILED|run failed", timeout_s=120)
    lab_page.wait_idle()
    text = lab_page.output_text()
    assert "every invariant held" in text, f"the run did not pass in JupyterLab:\n{text[-2000:]}"
    assert lab_page.errors() == [], f"error outputs: {lab_page.errors()}"
    assert lab_page.live() is None, "the live widget was left behind"
    assert lab_page.plotly_outputs() >= 6, f"{lab_page.plotly_outputs()} static figures after the run"
    drawn = lab_page.evaluate("document.querySelectorAll('.jp-OutputArea .js-plotly-plot svg.main-svg').length")
    assert drawn >= 1, "JupyterLab drew none of the static figures in view"
    print(f"\nlive chart drawn {shown_after_s:.1f} s after Run All; {after['draws']} redraws by then")


def test_stop_ends_the_run_at_once_and_the_notebook_says_incomplete(lab: Lab, lab_page: LabPage):
    lab_page.open("stop.ipynb")
    lab_page.run_all()
    lab_page.wait("(() => { const el = document.querySelector('.jp-OutputArea .wb-live');"
                  " return el && +el.dataset.points > 0; })()", timeout_s=90)
    clicked_wall = time.time()
    lab_page.page.click(STOP_BUTTON, timeout=5000)
    lab_page.wait_output("incomplete", timeout_s=60)
    ended_s = time.time() - clicked_wall
    lab_page.wait_idle()
    text = lab_page.output_text()
    assert "incomplete" in text and "(incomplete)" in text
    # The checking cell refuses an incomplete run: that is the one error the notebook shows.
    errors = lab_page.errors()
    assert len(errors) == 1 and "run incomplete" in errors[0], errors
    folders = [p.parent for p in (lab.root / "results").glob("stop*/summary.json")]
    assert len(folders) == 1, f"results: {folders}"
    rec = Recording.load(folders[0])
    assert not rec.complete and rec.incomplete_reason
    last_send = max(r.start_s for r in rec.requests)
    after_click_s = rec.started_wall + last_send - clicked_wall
    summary = json.loads((folders[0] / "summary.json").read_text(encoding="utf-8"))
    print(f"\nStop: last request sent {after_click_s:.2f} s after the click; verdict shown after {ended_s:.1f} s; "
          f"{summary.get('requests')} requests")
    assert after_click_s < 1.0, f"requests were still sent {after_click_s:.2f} s after Stop"
