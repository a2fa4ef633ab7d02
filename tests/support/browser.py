"""Headless Chromium for tests, scripts and benchmarks: Playwright driving Debian's ``/usr/bin/chromium``.

Playwright for Python launches any Chromium through ``executable_path``; nothing here ever downloads a
browser (never run ``playwright install``).  The flags keep Chromium off the network on its own
(background networking, component updates, sync) and let it run as root (``--no-sandbox``, as CI does).

    with launch() as browser:
        page, watch = new_page(browser, offline=True)
        timing = open_until(page, report.as_uri(), CHARTS_DRAWN_JS)
        assert not watch.errors

``offline=True`` routes every request of the page: ``file:``, ``data:`` and ``blob:`` URLs and the
prefixes in ``allow`` (a loopback server under test) go through, anything else is aborted and noted in
``watch.blocked``, so a page that needs a CDN fails to draw and says which URL it wanted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CHARTS_DRAWN_JS",
    "CHROMIUM_FLAGS",
    "DRAWN_CHARTS_JS",
    "NO_BROWSER_ENV",
    "ChromiumNotFound",
    "PageWatch",
    "chromium_path",
    "in_ci",
    "launch",
    "new_page",
    "open_until",
]

DEFAULT_CHROMIUM = "/usr/bin/chromium"
NO_BROWSER_ENV = "WORKBENCH_NO_BROWSER"  # "1": this machine has no browser on purpose (tests skip)
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--disable-default-apps", "--disable-extensions",
    "--hide-scrollbars", "--mute-audio",
)

# plotly.py's HTML puts each figure in a ``div.plotly-graph-div``; Plotly.newPlot adds the class
# ``js-plotly-plot`` and draws into ``svg.main-svg``: a chart with that SVG was really drawn.
DRAWN_CHARTS_JS = ("[...document.querySelectorAll('.js-plotly-plot')]"
                   ".filter(d => d.querySelector('svg.main-svg')).length")
# The page is parsed and every plotly chart on it is drawn.
CHARTS_DRAWN_JS = ("document.readyState !== 'loading' && (() => {"
                   " const g = [...document.querySelectorAll('.plotly-graph-div')];"
                   " return g.length > 0 && g.every(d => d.classList.contains('js-plotly-plot')"
                   " && d.querySelector('svg.main-svg') !== null); })()")

# Installed before any page script runs: checks the condition at every animation frame and on a 5 ms
# timer (frames may be throttled) and records performance.now() -- ms since navigation start, measured
# by the page itself -- the first time it holds.
_READY_PROBE = """
(() => {
  const cond = () => { try { return !!(%s); } catch (e) { return false; } };
  const check = () => {
    if (window.__wbReadyAt !== undefined) return;
    if (cond()) { window.__wbReadyAt = performance.now(); clearInterval(timer); return; }
    requestAnimationFrame(check);
  };
  const timer = setInterval(check, 5);
  document.addEventListener('DOMContentLoaded', check);
  requestAnimationFrame(check);
})();
"""


class ChromiumNotFound(RuntimeError):
    """No Chromium binary (or no Playwright) where we look for it; the message says how to install it."""


def in_ci() -> bool:
    """True on CI (``CI=true``), where a missing browser is a failure, never a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def chromium_path() -> str:
    """``$CHROMIUM``, else Debian's ``/usr/bin/chromium``, else ``chromium`` on PATH; and Playwright importable."""
    wanted = os.environ.get("CHROMIUM", "").strip()
    candidates = [wanted] if wanted else [DEFAULT_CHROMIUM, "chromium", "chromium-browser"]
    found = next((shutil.which(c) for c in candidates if shutil.which(c)), None)
    if found is None:
        where = f"CHROMIUM={wanted!r}" if wanted else f"{DEFAULT_CHROMIUM} (or chromium on PATH)"
        raise ChromiumNotFound(f"headless Chromium is not installed: no {where}; install Debian's chromium "
                               "package (`apt-get install -y chromium`; .ci/run does it on CI)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise ChromiumNotFound("Playwright for Python is not installed: pip install -e '.[dev]' "
                               "(never `playwright install`: the tests drive Debian's chromium)") from None
    return found


@contextlib.contextmanager
def launch(*, headless: bool = True, extra_flags: Sequence[str] = ()) -> Iterator[Any]:
    """A Playwright ``Browser`` on Debian's Chromium; closed (every process of it) when the block ends."""
    from playwright.sync_api import sync_playwright

    binary = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, headless=headless,
                                    args=[*CHROMIUM_FLAGS, *extra_flags])
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageWatch:
    """What a page complained about: uncaught exceptions, console errors, requests refused offline."""

    errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


def new_page(browser: Any, *, width: int = 1400, height: int = 1000, offline: bool = False,
             allow: Sequence[str] = ()) -> tuple[Any, PageWatch]:
    """A page in a fresh context (empty profile: nothing cached); with ``offline``, the network blocked."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    watch = PageWatch()
    page.on("pageerror", lambda exc: watch.errors.append(f"uncaught: {exc}"))
    page.on("console", lambda msg: watch.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    if offline:
        local = ("file:", "data:", "blob:", "about:", *allow)

        def route(r: Any) -> None:
            url = r.request.url
            if url.startswith(local):
                r.continue_()
            else:
                watch.blocked.append(url)
                r.abort("blockedbyclient")

        context.route("**/*", route)
    return page, watch


def open_until(page: Any, url: str, condition: str, *, timeout_s: float = 30.0) -> dict[str, float | None]:
    """Open ``url`` and wait until ``condition`` (JS) holds; timings in ms, measured by the page itself.

    ``ready_ms``: navigation start -> the condition first held (checked every frame / 5 ms);
    ``dom_content_loaded_ms`` and ``load_ms`` from the Navigation Timing entry.  Use a new page for
    every open: the probe stays installed on the page.
    """
    page.add_init_script(_READY_PROBE % condition)
    page.goto(url, wait_until="load", timeout=timeout_s * 1000)
    page.wait_for_function("window.__wbReadyAt !== undefined", timeout=timeout_s * 1000, polling=10)
    ready, dcl, load = page.evaluate("""() => { const n = performance.getEntriesByType('navigation')[0];
        return [window.__wbReadyAt, n ? n.domContentLoadedEventEnd : null, n ? n.loadEventEnd : null]; }""")
    return {"ready_ms": round(float(ready), 1), "dom_content_loaded_ms": dcl and round(dcl, 1),
            "load_ms": load and round(load, 1)}
