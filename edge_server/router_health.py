"""What the router knows about each node, and the active health checks that tell it.

The checks run in a thread of their own with its own event loop and its own connection pool.  A burst
of client traffic can lag the router's main loop by hundreds of milliseconds; measured there, every
check would "time out" and the router would take healthy nodes out because it is itself overloaded
(issue 13's collapse).  In the checker's thread a check's latency is the node's latency (plus at most a
few GIL switch intervals of 5 ms), and a check counts as timed out only when the checker's own loop
was not late either.  Results are handed to the main loop with ``call_soon_threadsafe``: every
mutation of :class:`NodeHealth` happens on the main loop.

Evidence (see ``docs/router.md``): a refused, unreachable or reset connection is *hard* evidence (the
process is not serving: out at once); a timeout is *soft* (out after ``fall`` in a row, never because
of one slow connect); 503 ``starting``/``draining`` takes a node out, 503 ``exhausted`` and
``overloaded`` keep it (the node is alive; the request path sheds around an overloaded node).

A check still unanswered after ``health_suspect_ms`` (50 ms; a node answers ``/readyz`` in about a
millisecond), or after 4 x the slowest of the node's last 8 answers when that is longer (a node busy
under load is not suspected for being busy), is reported at once as ``slow``: the router demotes the
node until its next answer, so a paused or blackholed node stops getting new requests ~200 ms before
its check times out.  That matters for skill calls, which are not retried once written: every invoke
sent to a silent node before it is demoted waits for the client's timeout.  ``slow`` never counts towards an ejection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import threading
import time
from collections.abc import Callable

import aiohttp

from edge_server.config import NodeSpec, RouterConfig

__all__ = ["HARD", "NOT_WRITTEN", "CheckResult", "HealthChecker", "NodeHealth", "classify"]

log = logging.getLogger("edge_server.router")

HARD = frozenset({"refused", "unreachable", "reset"})  # the node is surely not serving
_LAG_TICK_S = 0.02


class NodeHealth:
    """What the router believes about one node; mutated only by the router on its main loop."""

    __slots__ = ("answered", "checks", "ejected_until", "evidence", "fail", "healthy", "last_error",
                 "last_good_started", "last_latency_ms", "ok", "reason", "rise_needed", "spec", "timeouts")

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.healthy = False  # in rotation (subject to ejected_until)
        self.ejected_until = 0.0  # router clock; no traffic before this
        self.ok = 0  # consecutive good checks
        self.fail = 0  # consecutive failed checks
        self.timeouts = 0  # consecutive timed-out tries on the request path (reset by any answer)
        self.answered = 0  # answers seen from this node (requests and checks)
        self.evidence: str | None = None  # the reason of the last failure not yet cleared by an answer
        self.checks = 0
        self.rise_needed = 1  # a node never seen failing joins on its first good check
        self.last_latency_ms: float | None = None
        self.last_good_started = 0.0  # checker clock of the newest good check (older failures are stale)
        self.last_error: str | None = None
        self.reason = "unchecked"  # the last /readyz reason (or the failure)

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def __repr__(self) -> str:
        return (f"<NodeHealth {self.spec.id} healthy={self.healthy} ok={self.ok} fail={self.fail} "
                f"timeouts={self.timeouts} evidence={self.evidence} reason={self.reason}>")


class CheckResult:
    """One /readyz check as the checker thread saw it."""

    __slots__ = ("error", "good", "kind", "latency_ms", "reason", "started")

    def __init__(self, good: bool, kind: str, reason: str, latency_ms: float | None, started: float,
                 error: str | None = None) -> None:
        self.good, self.kind, self.reason, self.latency_ms = good, kind, reason, latency_ms
        self.started, self.error = started, error  # kind: ok, down, refused, unreachable, reset, timeout,
        # slow (no answer yet after health_suspect_ms), late (no verdict: the checker's loop lagged)

    def __repr__(self) -> str:
        return f"<CheckResult {self.kind} {self.reason} {self.latency_ms} ms>"


NOT_WRITTEN = "Cannot write to closing transport"  # aiohttp raises this before handing any byte over


def classify(exc: BaseException) -> str:
    """A client error as evidence: refused, unreachable, reset (hard), connect_timeout, timeout (soft),
    or not_written: a pooled connection the node had already closed, found closed before the request
    was written (aiohttp sends a small request's headers and body in one write, so nothing went out;
    no evidence against the node either, which may just have closed an idle connection)."""
    if isinstance(exc, aiohttp.ClientConnectionResetError) and NOT_WRITTEN in str(exc):
        return "not_written"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect_timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, TimeoutError):
            return "connect_timeout"
        if isinstance(os_error, ConnectionRefusedError) or getattr(os_error, "errno", None) == errno.ECONNREFUSED:
            return "refused"
        return "unreachable"
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | ConnectionError):
        return "reset"
    return "reset" if isinstance(exc, aiohttp.ClientConnectionError) else "timeout"


class HealthChecker:
    """Checks every node's ``/readyz`` every ``health_interval_ms`` from a thread of its own.

    A new check starts every interval even while an older one is still waiting (at most
    ``_MAX_OUTSTANDING`` per node), so a blackholed node shows ``fall`` timeouts about ``fall - 1``
    intervals after the first, not ``fall`` timeouts later.
    """

    _MAX_OUTSTANDING = 3

    def __init__(self, nodes: list[NodeSpec], rc: RouterConfig,
                 deliver: Callable[[NodeSpec, CheckResult], None]) -> None:
        self.nodes, self.rc, self.deliver = nodes, rc, deliver
        self.interval = rc.health_interval_ms / 1000
        self.timeout = rc.health_timeout_ms / 1000
        self.suspect = rc.health_suspect_ms / 1000 if 0 < rc.health_suspect_ms < rc.health_timeout_ms else 0.0
        self._session: aiohttp.ClientSession | None = None
        self._probing: set[str] = set()  # nodes with an out-of-turn check in flight
        self._recent: dict[str, collections.deque[float]] = {}  # node -> its last good check latencies (s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.lag_s = 0.0  # the checker loop's own recent lag: a timeout during a lag is not evidence

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="router-health", daemon=True)
        self._thread.start()
        self._started.wait(5)

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=self._MAX_OUTSTANDING + 1, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, skip_auto_headers=("User-Agent",)) as session:
            self._session = session
            self._started.set()
            tasks = [asyncio.create_task(self._node_loop(session, n)) for n in self.nodes]
            tasks.append(asyncio.create_task(self._lag_loop()))
            await self._stop.wait()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _lag_loop(self) -> None:
        recent: list[float] = []
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(_LAG_TICK_S)
            recent.append(max(0.0, time.monotonic() - t0 - _LAG_TICK_S))
            del recent[:-25]  # about half a second
            self.lag_s = max(recent)

    async def _node_loop(self, session: aiohttp.ClientSession, node: NodeSpec) -> None:
        outstanding: set[asyncio.Task[None]] = set()
        try:
            while True:
                t0 = time.monotonic()
                if len(outstanding) < self._MAX_OUTSTANDING:
                    task = asyncio.create_task(self._check(session, node))
                    outstanding.add(task)
                    task.add_done_callback(outstanding.discard)
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - t0)))
        finally:
            for task in list(outstanding):
                task.cancel()
            await asyncio.gather(*outstanding, return_exceptions=True)

    def check_soon(self, node: NodeSpec) -> None:
        """Check ``node`` now, out of turn (callable from any thread; at most one such check per node at
        a time): the request path saw something that may mean the node died, and the next scheduled
        check may be a whole interval away."""
        loop, session = self._loop, self._session
        if loop is None or session is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the checker is stopping
            loop.call_soon_threadsafe(self._probe, session, node)

    def _probe(self, session: aiohttp.ClientSession, node: NodeSpec) -> None:
        if node.id in self._probing:
            return
        self._probing.add(node.id)
        task = asyncio.get_running_loop().create_task(self._check(session, node))
        task.add_done_callback(lambda _: self._probing.discard(node.id))

    async def check_now(self, session: aiohttp.ClientSession, node: NodeSpec,
                        started: float | None = None) -> CheckResult:
        """One check, timed from just before the request is written to the end of the answer."""
        started = time.monotonic() if started is None else started
        try:
            async with asyncio.timeout(self.timeout):
                async with session.get(node.url + "/readyz") as resp:
                    raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            kind = classify(exc)
            if kind == "connect_timeout":
                kind = "timeout"
            late = time.monotonic() - started
            if kind == "timeout" and self.lag_s > self.timeout / 2:
                kind = "late"  # our own loop was late: says nothing about the node
            return CheckResult(False, kind, "unreachable", round(late * 1000, 3), started,
                               f"{exc.__class__.__name__}: {exc}"[:200])
        latency = round((time.monotonic() - started) * 1000, 3)
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = {}
        reason = str(doc.get("reason", "ok" if resp.status == 200 else resp.status)) if isinstance(doc, dict) \
            else str(resp.status)
        good = resp.status == 200 or (resp.status == 503 and reason in ("exhausted", "overloaded"))
        return CheckResult(good, "ok" if good else "down", reason, latency, started,
                           None if good else f"readyz {resp.status} {reason}")

    async def _check(self, session: aiohttp.ClientSession, node: NodeSpec) -> None:
        started = time.monotonic()
        recent = self._recent.setdefault(node.id, collections.deque(maxlen=8))
        after = min(max(self.suspect, 4 * max(recent, default=0.0)), 0.8 * self.timeout) if self.suspect else 0.0
        timer = asyncio.get_running_loop().call_later(after, self._slow, node, started, after) if after else None
        try:
            result = await self.check_now(session, node, started)
        finally:
            if timer is not None:
                timer.cancel()
        if result.good and result.latency_ms is not None:
            recent.append(result.latency_ms / 1000)
        self.deliver(node, result)

    def _slow(self, node: NodeSpec, started: float, after: float) -> None:
        """The check is still unanswered after ``after`` seconds: say so now (unless our own loop was
        late, when the silence may be ours)."""
        if self.lag_s > after / 2 or time.monotonic() - started > 1.5 * after:
            return
        self.deliver(node, CheckResult(False, "slow", "slow", None, started,
                                       f"no answer within {after * 1000:.0f} ms"))
