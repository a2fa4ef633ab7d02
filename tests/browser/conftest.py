"""Browser tests need Debian's chromium.  Missing, they FAIL (CI installs it in .ci/run) unless
``WORKBENCH_NO_BROWSER=1`` says this machine has no browser on purpose -- then they skip."""

from __future__ import annotations

import os

import pytest

from workbench.browser import ChromiumNotFound, chromium_path

NO_BROWSER_ENV = "WORKBENCH_NO_BROWSER"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; a failure with the install hint when there is none (a skip only on request)."""
    try:
        return chromium_path()
    except ChromiumNotFound as exc:
        missing = str(exc)
    # Outside the except block, so the message is not buried under a chained traceback.
    if os.environ.get(NO_BROWSER_ENV, "").strip() not in ("", "0"):
        pytest.skip(f"{NO_BROWSER_ENV} is set: {missing}")
    pytest.fail(f"{missing} (set {NO_BROWSER_ENV}=1 to skip the browser tests on purpose)", pytrace=False)
