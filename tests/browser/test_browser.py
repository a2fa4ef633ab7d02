"""The DevTools driver itself: pages, scripts, waits, screenshots, and a clean exit on every path."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil
import pytest

from workbench.browser import Browser, BrowserError, ChromiumNotFound

pytestmark = pytest.mark.integration

PAGE = """<!DOCTYPE html><html><body><h1 id=t>hello</h1>
<script>setTimeout(() => { document.body.dataset.late = 'yes'; }, 150);</script></body></html>"""


def test_missing_chromium_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(ChromiumNotFound, match="install Debian's chromium package"):
        Browser()


async def test_open_evaluate_wait_screenshot_and_clean_exit(chromium: str, tmp_path: Path):
    page = tmp_path / "page.html"
    page.write_text(PAGE, encoding="utf-8")
    async with Browser(width=640, height=480) as b:
        pid, profile = b.proc.pid, b.profile
        assert profile is not None and (profile / "DevToolsActivePort").exists()
        await b.open(page.as_uri())
        assert await b.evaluate("document.getElementById('t').textContent") == "hello"
        assert await b.evaluate("new Promise(r => setTimeout(() => r(6 * 7), 10))") == 42
        assert await b.wait_for("document.body.dataset.late", timeout_s=5) == "yes"
        with pytest.raises(BrowserError, match="timed out"):
            await b.wait_for("false", timeout_s=0.3)
        with pytest.raises(BrowserError, match="JavaScript error"):
            await b.evaluate("no_such_name.x")
        png = await b.screenshot(tmp_path / "shot.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "shot.png").stat().st_size == len(png)
        assert await b.evaluate("[innerWidth, innerHeight]") == [640, 480]
    assert not profile.exists()
    assert await _group_gone(pid), "a Chromium process outlived the block"


async def test_an_error_inside_the_block_still_kills_chromium(chromium: str):
    with pytest.raises(RuntimeError, match="boom"):
        async with Browser() as b:
            pid, profile = b.proc.pid, b.profile
            raise RuntimeError("boom")
    assert not profile.exists()
    assert await _group_gone(pid), "a Chromium process outlived the block"


async def _group_gone(pgid: int, within_s: float = 5.0) -> bool:
    """True once no process of the group is left (orphaned renderers are reaped by init a moment later)."""
    for _ in range(int(within_s / 0.05)):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        alive = [p for p in psutil.process_iter(["status"])
                 if _pgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        await asyncio.sleep(0.05)
    return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
