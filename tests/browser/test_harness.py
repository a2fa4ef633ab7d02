"""The browser harness itself: Debian's chromium under Playwright, offline pages, and a clean exit."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from tests.support.browser import ChromiumNotFound, chromium_path, launch, new_page

pytestmark = pytest.mark.integration

PAGE = """<!DOCTYPE html><html><body><h1 id=t>hello</h1>
<script>setTimeout(() => { document.body.dataset.late = 'yes'; }, 150);</script>
<img src="http://127.0.0.2:9/remote.png"></body></html>"""


def _chromium_children() -> set[int]:
    me = psutil.Process()
    return {p.pid for p in me.children(recursive=True) if "chrom" in (p.name() or "").lower()}


def test_missing_chromium_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(ChromiumNotFound, match="install Debian's chromium package"):
        chromium_path()


def test_open_evaluate_wait_screenshot_offline_and_clean_exit(chromium: str, tmp_path: Path):
    page_file = tmp_path / "page.html"
    page_file.write_text(PAGE, encoding="utf-8")
    with launch() as browser:
        assert _chromium_children(), "no chromium process under the test"
        page, watch = new_page(browser, width=640, height=480, offline=True)
        page.goto(page_file.as_uri())
        assert page.inner_text("#t") == "hello"
        assert page.evaluate("new Promise(r => setTimeout(() => r(6 * 7), 10))") == 42
        page.wait_for_function("document.body.dataset.late === 'yes'", timeout=5000)
        with pytest.raises(Exception, match="Timeout"):
            page.wait_for_function("false", timeout=300)
        with pytest.raises(Exception, match="no_such_name"):
            page.evaluate("no_such_name.x")
        png = page.screenshot(path=str(tmp_path / "shot.png"))
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "shot.png").stat().st_size == len(png)
        assert page.evaluate("[innerWidth, innerHeight]") == [640, 480]
        assert watch.blocked == ["http://127.0.0.2:9/remote.png"], "the remote image was not refused offline"
    assert _gone(), "a Chromium process outlived the block"


def test_an_error_inside_the_block_still_ends_chromium(chromium: str):
    with pytest.raises(RuntimeError, match="boom"), launch():
        assert _chromium_children()
        raise RuntimeError("boom")
    assert _gone(), "a Chromium process outlived the block"


def _gone(within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [pid for pid in _chromium_children() if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.05)
    return False
