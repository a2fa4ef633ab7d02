"""Charts of the comparison benchmarks: plotly figures kept as JSON in the results, PNGs via kaleido.

A figure is stored in its results file (``charts``: name -> plotly JSON) so that ``run_all.py`` can
draw every chart into one HTML page without re-running anything.  PNGs need a Chrome for kaleido 1.x:
Debian's chromium through ``BROWSER_PATH``; nothing is ever downloaded -- without a browser the PNG
is skipped with a message.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from benchmarks._procs import REPO

CHROMIUM = "/usr/bin/chromium"
DOCS_IMG = REPO / "docs" / "img"


def fig_json(fig: go.Figure) -> dict[str, Any]:
    """The figure as plain JSON (what ``plotly.io.from_json`` reads back)."""
    return json.loads(fig.to_json())


def png_path(name: str) -> Path:
    """Full runs draw into docs/img, where the performance page shows them."""
    return DOCS_IMG / f"{name}.png"


def write_png(fig: go.Figure, name: str, quick: bool, width: int = 1000, height: int = 600) -> str | None:
    """Write the PNG and return its path relative to the repository, or None (with a message) when
    no browser is available to kaleido.  Quick runs draw none: their figures are smoke, and the browser
    start costs seconds of the 3-minute budget (the HTML report still has every chart)."""
    if quick:
        return None
    browser = os.environ.get("BROWSER_PATH") or (CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"))
    if not browser or not Path(browser).exists():
        print(f"  PNG {name} skipped: no chromium at {CHROMIUM} and BROWSER_PATH unset (never downloaded)")
        return None
    os.environ["BROWSER_PATH"] = browser
    path = png_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.write_image(str(path), width=width, height=height)
    except Exception as exc:  # kaleido or the browser failed: the run's figures still count
        print(f"  PNG {name} skipped: kaleido could not render ({type(exc).__name__}: {exc})".splitlines()[0])
        return None
    return os.path.relpath(path, REPO)
