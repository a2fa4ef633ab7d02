"""Browser tests drive Debian's chromium through Playwright (tests/support/browser.py).

Without chromium (or Playwright) they FAIL on CI (``CI=true``: .ci/run installs chromium) and skip
elsewhere, saying what is missing; ``WORKBENCH_NO_BROWSER=1`` skips them on purpose outside CI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # tests.support is the tests' own package, beside the product
    sys.path.insert(0, str(ROOT))

from tests.support.browser import NO_BROWSER_ENV, ChromiumNotFound, chromium_path, in_ci, launch  # noqa: E402


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; a failure on CI when there is none, a skip with the reason elsewhere."""
    try:
        return chromium_path()
    except ChromiumNotFound as exc:
        missing = str(exc)
    # Outside the except block, so the message is not buried under a chained traceback.
    if in_ci():
        pytest.fail(f"{missing} (CI=true: browser tests must run here)", pytrace=False)
    if os.environ.get(NO_BROWSER_ENV, "").strip() not in ("", "0"):
        pytest.skip(f"{NO_BROWSER_ENV} is set: {missing}")
    pytest.skip(missing)


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    """One headless Chromium (Playwright) per test module; each test opens fresh contexts in it."""
    with launch() as b:
        yield b
