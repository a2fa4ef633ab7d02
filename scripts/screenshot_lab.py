"""Refresh the screenshots in docs/: JupyterLab mid-run with the live dashboard, and the run's HTML report.

One command, every process its own and ended by it (tests/support: Playwright on Debian's chromium,
a JupyterLab on loopback with temp settings):

1. copies notebooks/quickstart.ipynb into a temp folder with a longer ``duration_s`` (20 s) and an
   absolute results folder, so the repository's notebook is not touched;
2. opens it in JupyterLab, runs all cells, waits until the live chart has drawn a few seconds of the
   run, scrolls it into view and saves ``docs/jupyterlab-live.png``;
3. lets the run finish (the verdict and the static figures appear: checked), then writes the run's
   HTML report and saves ``docs/report-screenshot.png`` of it, opened offline.

Usage: .venv/bin/python scripts/screenshot_lab.py [--docs docs] [--duration-s 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.browser import CHARTS_DRAWN_JS, launch, new_page, open_until  # noqa: E402
from tests.support.lab import STATUS_JS, Lab, LabPage, notebook_copy  # noqa: E402
from workbench.ui.report import write_report  # noqa: E402

NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
LIVE = "document.querySelector('.jp-OutputArea .wb-live')"


def shoot(folder: Path, docs: Path, duration_s: float, width: int, height: int) -> dict[str, Any]:
    root = folder / "notebooks"
    root.mkdir()
    notebook_copy(NOTEBOOK, root, duration_s=duration_s)
    lab = Lab(root)
    facts: dict[str, Any] = {}
    try:
        with launch() as browser:
            page, watch = new_page(browser, width=width, height=height, offline=True, allow=(lab.base,))
            lp = LabPage(lab, page)
            lp.open(NOTEBOOK.name)
            t_run = lp.run_all()
            # Mid-run: about half of the run left (the status line says "N s left").
            lp.wait(f"{LIVE} && (() => {{ const m = /([0-9.]+) s left/.exec({STATUS_JS}); "
                    f"return m && parseFloat(m[1]) <= {duration_s * 0.5}; }})()", timeout_s=duration_s + 60)
            page.evaluate(f"() => {LIVE}.closest('.jp-Cell').scrollIntoView({{block: 'start'}})")
            time.sleep(0.8)  # the next bin lands after the scroll
            facts["live_at_s"] = round(time.monotonic() - t_run, 1)
            facts["status_line"] = lp.status()[:200]
            page.screenshot(path=str(docs / "jupyterlab-live.png"))
            lp.wait_output("every invariant held|FAILED|run failed", timeout_s=duration_s + 90)
            lp.wait_idle()
            facts["finished_after_s"] = round(time.monotonic() - t_run, 1)
            facts["page_errors"] = watch.errors[:5]
            runs = sorted((root / "results").glob("*/summary.json"))
            if not runs:
                raise SystemExit("the run left no results")
            facts["verdict"] = {k: v for k, v in json.loads(runs[-1].read_text(encoding="utf-8")).items()
                                if k in ("invariants_ok", "reasons", "generator_lag_p99_ms", "throughput_rps")}
            report = write_report([runs[-1].parent], folder / "report.html", title="quickstart — Rating Edge drill")
            page2, watch2 = new_page(browser, width=1400, height=1000, offline=True)
            facts["report_open"] = open_until(page2, report.as_uri(), CHARTS_DRAWN_JS)
            page2.screenshot(path=str(docs / "report-screenshot.png"), full_page=True)
            facts["report_errors"] = watch2.errors[:5] + watch2.blocked[:5]
    finally:
        lab.stop()
    return facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where the PNGs go")
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=1200)
    args = ap.parse_args()
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wb-shots-") as tmp:
        facts = shoot(Path(tmp), docs, args.duration_s, args.width, args.height)
    print(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
