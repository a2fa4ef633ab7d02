"""A small headless-Chromium driver over the Chrome DevTools Protocol, with no new dependency.

Why not Playwright/Selenium: they download their own browser (impossible here) or need a driver
binary; the DevTools Protocol over a websocket is all we need to open a page, wait for it, run
JavaScript and take a screenshot, and aiohttp (already a dependency) speaks websockets.

How: Debian's ``/usr/bin/chromium`` (``CHROMIUM`` overrides) is started headless with a new, empty
profile folder and ``--remote-debugging-port=0``; Chromium picks a free port and writes it to
``DevToolsActivePort`` in the profile.  We connect to the browser's websocket, create one page
target and attach to it in "flat" mode, so every page command travels over that one socket with a
``sessionId``.  Leaving :class:`Browser` (``async with``) kills Chromium's whole process group and
removes the profile, also when an error or a cancellation ends the block.

    async with Browser() as b:
        await b.set_viewport(1400, 1000)
        await b.open("file:///tmp/report.html")
        await b.wait_for("document.querySelectorAll('svg.main-svg').length > 0")
        await b.screenshot("shot.png")
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["CHARTS_DRAWN_JS", "CHROMIUM_FLAGS", "DRAWN_CHARTS_JS", "Browser", "BrowserError", "ChromiumNotFound",
           "OpenTiming", "chromium_path"]

DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google's hosts, which a
# closed network refuses; --no-sandbox because CI runs as root.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
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


class BrowserError(RuntimeError):
    """Chromium did not start, a page did not load, a script threw, a wait timed out."""


class ChromiumNotFound(BrowserError):
    """No Chromium binary where we look for it."""


def chromium_path() -> str:
    """The Chromium binary to run: ``$CHROMIUM``, else Debian's ``/usr/bin/chromium``, else ``chromium`` on PATH."""
    wanted = os.environ.get("CHROMIUM", "").strip()
    candidates = [wanted] if wanted else [DEFAULT_CHROMIUM, "chromium", "chromium-browser"]
    for cand in candidates:
        found = shutil.which(cand)
        if found:
            return found
    where = f"CHROMIUM={wanted!r}" if wanted else f"{DEFAULT_CHROMIUM} (or chromium on PATH)"
    raise ChromiumNotFound(
        f"headless Chromium is not installed: no {where}; install Debian's chromium package "
        "(`apt-get install -y chromium`; .ci/run does it on CI) or point CHROMIUM at a Chromium binary.")


class OpenTiming(dict):
    """Timings of one page open, in ms; ``ready_ms`` is navigation start -> the condition first held."""


# Installed before any page script runs: checks the condition at every animation frame and on a
# 5 ms timer (frames may be throttled) and records performance.now() -- ms since navigation start,
# measured by the page itself -- the first time it holds.
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


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class Browser:
    """One headless Chromium with one page (tab); use as ``async with Browser() as b``."""

    def __init__(self, *, width: int = 1400, height: int = 1000, extra_flags: Sequence[str] = (),
                 start_timeout_s: float = 30.0, command_timeout_s: float = 60.0) -> None:
        self.binary = chromium_path()  # fail early, before any process or folder exists
        self.width, self.height = width, height
        self.extra_flags = tuple(extra_flags)
        self.start_timeout_s = start_timeout_s
        self.command_timeout_s = command_timeout_s
        self.profile: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []
        self._session_id: str | None = None
        self._target_id: str | None = None
        self._log: Any = None
        self.console: list[str] = []  # page console errors and uncaught exceptions, for diagnosis

    # ------------------------------------------------------------------ life cycle
    async def __aenter__(self) -> Browser:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start Chromium, connect to it and open one page target of the configured size."""
        self.profile, self._log = self._new_profile()
        args = [self.binary, *CHROMIUM_FLAGS, *self.extra_flags, f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
                f"--window-size={self.width},{self.height}", "about:blank"]
        # A new session: Chromium's zygote and renderers share its process group, killed as one at close.
        self.proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                         stdout=self._log, stderr=self._log, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if port_file.exists():
                lines = port_file.read_text(encoding="utf-8").split()
                if len(lines) >= 2:
                    break
            if self.proc.returncode is not None:
                raise BrowserError(f"Chromium exited with status {self.proc.returncode} at start: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise BrowserError(f"Chromium did not open its DevTools port in {self.start_timeout_s:g} s: "
                                   f"{self._log_tail()}")
            await asyncio.sleep(0.05)
        port, path = int(lines[0]), lines[1]
        self._http = aiohttp.ClientSession()
        # Screenshots of big viewports exceed aiohttp's default 4 MB message limit.
        self._ws = await self._http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0, autoping=True)
        self._reader = asyncio.create_task(self._read_loop())
        target = await self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        self._target_id = target["targetId"]
        attached = await self.send("Target.attachToTarget", {"targetId": self._target_id, "flatten": True},
                                   session=False)
        self._session_id = attached["sessionId"]
        for domain in ("Page", "Runtime"):
            await self.send(f"{domain}.enable")
        await self.set_viewport(self.width, self.height)

    async def close(self) -> None:
        """Kill Chromium (its whole process group) and remove the profile; safe to call twice."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
            self._reader = None
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 2)
            self._ws = None
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.close()
            self._http = None
        if self.proc is not None:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created at start, no other
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 10)
            self.proc = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("browser closed"))
        self._pending.clear()
        if self._log is not None:
            self._log.close()  # it lives in the profile folder, removed just below
            self._log = None
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    @staticmethod
    def _new_profile() -> tuple[Path, Any]:
        """A new empty profile folder, and Chromium's log file inside it (read back when it fails)."""
        profile = Path(tempfile.mkdtemp(prefix="wb-chromium-"))
        return profile, (profile / "chromium.log").open("wb")

    def _log_tail(self, n: int = 1500) -> str:
        if self._log is None:
            return ""
        with contextlib.suppress(Exception):
            self._log.flush()
            return Path(self._log.name).read_bytes()[-n:].decode("utf-8", "replace").strip()
        return ""

    # ------------------------------------------------------------------ protocol
    async def _read_loop(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(BrowserError(f"{data['error'].get('message')} "
                                                       f"({data['error'].get('data', '')})"))
                    else:
                        fut.set_result(data.get("result", {}))
                continue
            method = data.get("method", "")
            params = data.get("params", {})
            if method == "Runtime.exceptionThrown":
                self.console.append(str(params.get("exceptionDetails", {}).get("exception", {}).get("description")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            for name, fut in list(self._events):
                if name == method and not fut.done():
                    fut.set_result(params)
        for fut in self._pending.values():  # the socket closed: Chromium died
            if not fut.done():
                fut.set_exception(BrowserError(f"Chromium closed the DevTools connection: {self._log_tail()}"))

    async def send(self, method: str, params: dict[str, Any] | None = None, *, session: bool = True,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """Send one DevTools command (to the page unless ``session=False``) and return its result."""
        if self._ws is None or self._ws.closed:
            raise BrowserError("the browser is not running")
        msg: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session and self._session_id:
            msg["sessionId"] = self._session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg["id"]] = fut
        await self._ws.send_str(json.dumps(msg))
        try:
            return await asyncio.wait_for(fut, timeout_s or self.command_timeout_s)
        except TimeoutError:
            raise BrowserError(f"{method}: no answer in {timeout_s or self.command_timeout_s:g} s") from None
        finally:
            self._pending.pop(msg["id"], None)

    def _expect(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next event ``method``; register it *before* the command that causes it."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events.append((method, fut))
        fut.add_done_callback(lambda f: self._events.remove((method, f)) if (method, f) in self._events else None)
        return fut

    # ------------------------------------------------------------------ page
    async def set_viewport(self, width: int, height: int, scale: float = 1.0) -> None:
        """Size of the page's viewport in CSS pixels (and so of screenshots)."""
        self.width, self.height = width, height
        await self.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False})

    async def block_network(self, patterns: Sequence[str] = ("http://*", "https://*")) -> None:
        """Fail every request matching ``patterns`` (default: all of http and https): proves a page works offline."""
        await self.send("Network.enable")
        await self.send("Network.setBlockedURLs", {"urls": list(patterns)})

    async def add_init_script(self, source: str) -> str:
        """Run ``source`` in every new document before its own scripts; returns an id for removal."""
        res = await self.send("Page.addScriptToEvaluateOnNewDocument", {"source": source})
        return str(res["identifier"])

    async def remove_init_script(self, identifier: str) -> None:
        await self.send("Page.removeScriptToEvaluateOnNewDocument", {"identifier": identifier})

    async def open(self, url: str, *, timeout_s: float = 30.0, wait_load: bool = True) -> float:
        """Navigate to ``url`` (file://, http://, about:) and wait for its load event; returns seconds taken."""
        loaded = self._expect("Page.loadEventFired")
        t0 = time.perf_counter()
        try:
            res = await self.send("Page.navigate", {"url": url}, timeout_s=timeout_s)
            if res.get("errorText"):
                raise BrowserError(f"cannot open {url}: {res['errorText']}")
            if wait_load:
                try:
                    await asyncio.wait_for(loaded, timeout_s)
                except TimeoutError:
                    raise BrowserError(f"{url}: no load event in {timeout_s:g} s") from None
        finally:
            loaded.cancel()
        return time.perf_counter() - t0

    async def evaluate(self, expression: str, *, await_promise: bool = True, timeout_s: float | None = None) -> Any:
        """Evaluate a JavaScript expression in the page and return its value (JSON-able values only)."""
        res = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": await_promise, "userGesture": True},
                              timeout_s=timeout_s)
        if "exceptionDetails" in res:
            details = res["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error: {text}")
        return res.get("result", {}).get("value")

    async def wait_for(self, condition: str, *, timeout_s: float = 10.0, poll_s: float = 0.05) -> Any:
        """Poll a JavaScript expression until it is truthy; its value, or BrowserError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        last_error = ""
        while True:
            try:
                value = await self.evaluate(condition, timeout_s=max(1.0, timeout_s))
                if value:
                    return value
            except BrowserError as exc:  # a page between documents, a not-yet-defined global, ...
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout_s:g} s waiting for: {condition.strip()[:200]}"
                                   + (f" (last error: {last_error})" if last_error else ""))
            await asyncio.sleep(poll_s)

    async def screenshot(self, path: str | os.PathLike[str] | None = None, *, full_page: bool = False) -> bytes:
        """A PNG of the viewport (or of the whole page); written to ``path`` when given."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = await self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
            params["captureBeyondViewport"] = True
        res = await self.send("Page.captureScreenshot", params)
        png = base64.b64decode(res["data"])
        if path is not None:
            _write_file(Path(path), png)
        return png

    async def open_until(self, url: str, condition: str, *, timeout_s: float = 30.0) -> OpenTiming:
        """Open ``url`` and wait until ``condition`` (JS) holds; timings measured by the page itself.

        ``ready_ms``: navigation start -> first moment the condition held (checked every frame / 5 ms);
        ``dom_content_loaded_ms`` and ``load_ms`` from the Navigation Timing entry; ``wall_ms``: from
        our Page.navigate to seeing the condition, so it includes the protocol round trips.
        """
        probe = await self.add_init_script(_READY_PROBE % condition)
        t0 = time.perf_counter()
        try:
            await self.open(url, timeout_s=timeout_s)
            ready = await self.wait_for("window.__wbReadyAt", timeout_s=timeout_s, poll_s=0.01)
            wall_ms = (time.perf_counter() - t0) * 1000
        finally:
            await self.remove_init_script(probe)
        nav = await self.evaluate("(() => { const n = performance.getEntriesByType('navigation')[0];"
                                  " return n ? [n.domContentLoadedEventEnd, n.loadEventEnd] : [null, null]; })()")
        return OpenTiming(ready_ms=round(float(ready), 1), dom_content_loaded_ms=nav[0] and round(nav[0], 1),
                          load_ms=nav[1] and round(nav[1], 1), wall_ms=round(wall_ms, 1))
