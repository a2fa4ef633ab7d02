"""Load generation: open-loop arrivals and closed-loop users, with HDR histograms and honest latency.

Open loop fixes every request's *intended* send time in advance (constant spacing or Poisson
arrivals) and measures latency from that time, so a stalled system shows up as latency instead of
silently slowing the generator down (no coordinated omission). The generator also measures its own
scheduling lag (actual send time minus intended time): when its p99 passes ``lag_threshold_ms`` the
run is marked invalid, because the figures would then describe the generator, not the system.

Time: every record holds seconds relative to the run start, and :attr:`LoadResult.t0` is that start
on ``time.monotonic()``, the clock the fault proxies stamp their events with.

The end: the generator stops sending when the window closes, then drains: it waits for the requests
still in flight, each up to its own timeout (``drain_s``, default ``timeout_s`` + 0.5 s, so aiohttp's
timeout answers first), and records those still unanswered when it gives up (or when the run is
stopped or cancelled) as status 0 with the error ``cut at end: ...``
(:data:`~workbench.history.records.CUT_AT_END`): the run's end cut them off, which says nothing about
the system, so the error budget does not count them; the counter check counts them as unknown outcomes.

Sheds: a closed-loop user that gets a 503 or a 429 with ``Retry-After`` (seconds, or an HTTP date)
waits that long, at most :data:`RETRY_AFTER_CAP_S` and at least its think time, before its next request,
as RFC 9110 asks of a client and as real clients do (``load.honor_retry_after``, default on; off, it
sends again after its think time, which with no think time means at once: a herd that turns each shed
into the next request and measures the generator's resend loop more than the system).  The answer is
recorded as it came (a shed stays a 503).  Open loop does not wait: its arrivals are fixed in advance and
do not depend on answers (that is what open loop means), so ``honor_retry_after`` does not apply there.

Connections: one shared ``aiohttp.ClientSession`` whose ``TCPConnector`` limit defaults to
``max(64, min(1024, rate_rps / 10))`` for open loop (100 ms of arrivals in flight at once, which covers
a target answering in tens of ms) and to ``users`` for closed loop. Past the limit, requests wait in the
connector; that wait still counts as latency because it is measured from the intended time. A larger
pool is not free: when a hiccup empties it, aiohttp opens new connections for every arrival, and that
extra work can push a busy generator into a backlog it does not recover from.
"""

from __future__ import annotations

import asyncio
import bisect
import email.utils
import itertools
import json
import multiprocessing
import os
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import aiohttp

from workbench.history.records import CUT_AT_END, RequestRecord
from workbench.run.load.lean import IDLE_MAX_S, LeanSession
from workbench.run.load.model import HIST_MAX_US, LoadPlan, LoadResult, status_class

__all__ = ["RETRY_AFTER_CAP_S", "LoadGenerator", "LoadPlan", "LoadResult", "retry_after_s", "run_load", "status_class"]

_STOP_GRACE_S = 0.25  # on stop, in-flight requests get this long to answer before being cut
_MIN_SLEEP_S = 0.001  # open loop: the shortest wait for the next arrival (the loop's timer resolution)
_DRAIN_MARGIN_S = 0.5  # the default drain outlasts the request timeout by this much
RETRY_AFTER_CAP_S = 5.0  # a closed-loop user waits at most this long on a Retry-After
_RETRY_STATUSES = (429, 503)  # the answers whose Retry-After a closed-loop user honours


def retry_after_s(value: str | None) -> float:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date); 0 when absent or
    unreadable (a client that cannot read the header has nothing to honour)."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return 0.0
    return max(when.timestamp() - time.time(), 0.0)


def _allowed(body: bytes) -> bool | None:
    """The ``allowed`` field of a /v1/limits/check answer, without a full JSON parse per reply."""
    if b'"allowed": true' in body or b'"allowed":true' in body:
        return True
    if b'"allowed": false' in body or b'"allowed":false' in body:
        return False
    return None


def _error_code(body: bytes) -> str:
    """``error.code`` of a JSON error body (errors are rare: a full parse is fine here)."""
    try:
        doc = json.loads(body)
        return str(doc["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


class _Picker:
    """Weighted choice by bisecting cumulative weights: O(log n) and no allocation per pick."""

    def __init__(self, items: Sequence[str], weights: Sequence[float], rng: random.Random) -> None:
        self.items = list(items)
        self.cum = list(itertools.accumulate(weights))
        self.total = self.cum[-1]
        self.rng = rng

    def __call__(self) -> str:
        return self.items[bisect.bisect_right(self.cum, self.rng.random() * self.total)]


class LoadGenerator:
    """Runs one :class:`LoadPlan` in this process. Use :func:`run_load` unless you need the object.

    After ``run()`` returned, raised or was cancelled, :attr:`result` holds what was measured
    (``complete=False`` when it did not run to the end).
    """

    def __init__(
        self,
        plan: LoadPlan,
        on_record: Callable[[RequestRecord], None] | None = None,
        start_at: float | None = None,
    ) -> None:
        self.plan = plan
        self.load = load = plan.load
        self.on_record = on_record
        self.start_at = start_at  # run start on time.monotonic(); processes share one
        rng = random.Random(plan.seed)
        weights_by_region = plan.region_weights
        self._region = _Picker(list(weights_by_region), list(weights_by_region.values()), rng)
        tenants = plan.tenants
        n = len(tenants)
        weights = [1.0 / (i + 1) ** load.zipf_s for i in range(n)] if load.key_dist == "zipf" else [1.0] * n
        self._tenant = _Picker(tenants, weights, rng)
        self._rng = rng
        self._t0 = 0.0
        self._count = 0
        self._inflight: set[asyncio.Task[float]] = set()
        self._session: Any = None  # aiohttp.ClientSession or LeanSession (load.client)
        base = plan.url.rstrip("/")
        self._url = f"{base}/v1/skills/{plan.skill}/invoke" if load.route == "invoke" else f"{base}/v1/limits/check"
        self._bodies: dict[str, bytes] = {}
        self._headers: dict[tuple[str, str], dict[str, str]] = {}  # per (region, tenant), see _request
        self._cut_reason = "the run ended before the answer"  # why a request cancelled now was cut
        self._late_us = plan.lag_threshold_ms * 1000  # sent later than this behind its schedule: late
        self.result = LoadResult(plan, t0=0.0)

    async def run(self, stop: asyncio.Event | None = None) -> LoadResult:
        """Send until the duration (or max_requests) is reached or ``stop`` is set; return the result."""
        plan, load = self.plan, self.load
        if load.processes > 1:
            return await _run_processes(self, stop)
        session = self._session if self._session is not None else await self.prepare()
        now = time.monotonic()
        self._t0 = self.start_at if self.start_at is not None else now
        self.result = LoadResult(plan, t0=self._t0, warmed=self.result.warmed)
        sender: asyncio.Task[None] | None = None
        watcher = asyncio.create_task(stop.wait()) if stop is not None else None
        stopped = False
        try:
            if self._t0 > now:
                await asyncio.sleep(self._t0 - now)
            sender = asyncio.create_task(self._open_loop() if load.mode == "open" else self._closed_loop())
            await asyncio.wait({sender, *([watcher] if watcher else [])}, return_when=asyncio.FIRST_COMPLETED)
            if not sender.done():
                stopped = True
                self._cut_reason = "the run was stopped"
                sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            # At the end, aiohttp's own timeout fires first; on stop, answers get a short grace.
            if stopped:
                await self._drain(_STOP_GRACE_S, "the run was stopped")
            else:
                drain = plan.drain_s or plan.timeout_s + _DRAIN_MARGIN_S
                await self._drain(drain, f"no answer within the {drain:g} s drain after the sending window")
        except asyncio.CancelledError:
            stopped = True
            self._cut_reason = "the run was cancelled"
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            await self._drain(0.0, "the run was cancelled")
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            self.result.complete = not stopped
            self.result.elapsed_s = time.monotonic() - self._t0
            await session.close()
        return self.result

    async def prepare(self) -> Any:
        """Open the HTTP session (and, with the lean client, the plan's ``warm_connections``) before the
        clock starts; :meth:`run` does it itself when not done.  Returns the session."""
        plan, load = self.plan, self.load
        limit = plan.connector_limit or (
            max(64, min(1024, int(load.rate_rps / 10))) if load.mode == "open" else load.users
        )
        if load.client == "lean":
            session: Any = LeanSession(plan.url, limit, plan.timeout_s)
            session.on_phases = self._phases
            if plan.warm_connections:
                self.result.warmed = await session.warm(plan.warm_connections)
        else:
            connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=IDLE_MAX_S)
            session = aiohttp.ClientSession(connector=connector,
                                            timeout=aiohttp.ClientTimeout(total=plan.timeout_s),
                                            skip_auto_headers=("User-Agent",))
        self._session = session
        return session

    def _phases(self, status: int, pool_s: float, wire_s: float, resume_s: float) -> None:
        """Where a 503's answer time went (the lean client's per-answer callback)."""
        if status == 503:
            h = self.result.shed_phases
            h["pool"].record_value(min(max(int(pool_s * 1e6), 1), HIST_MAX_US))
            h["wire"].record_value(min(max(int(wire_s * 1e6), 1), HIST_MAX_US))
            h["resume"].record_value(min(max(int(resume_s * 1e6), 1), HIST_MAX_US))

    async def _drain(self, grace_s: float, why: str) -> None:
        """Give in-flight requests ``grace_s``, then cancel them: each is recorded as cut at the end,
        ``why`` saying how (see the module docstring)."""
        if self._inflight and grace_s > 0:
            await asyncio.wait(set(self._inflight), timeout=grace_s)
        self._cut_reason = why
        pending = set(self._inflight)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def _body(self, tenant: str) -> bytes:
        body = self._bodies.get(tenant)
        if body is None:
            doc: dict[str, Any] = {"cost": self.load.cost}
            if self.load.route == "check":
                doc["key"] = tenant
            else:
                doc["input"] = {"tenant": tenant}
            body = self._bodies[tenant] = json.dumps(doc, separators=(",", ":")).encode()
        return body

    def _budget(self) -> bool:
        """Claim one request from max_requests; False when it is used up."""
        if self.plan.max_requests and self._count >= self.plan.max_requests:
            return False
        self._count += 1
        return True

    async def _open_loop(self) -> None:
        plan, rng, mono, t0 = self.plan, self._rng, time.monotonic, self._t0
        rate, poisson, end = self.load.rate_rps, self.load.arrival == "poisson", plan.duration_s
        i = 0
        # Constant arrivals are computed from the index, not summed, so no rounding drift.
        nxt = plan.offset_s + (rng.expovariate(rate) if poisson else 0.0)
        while nxt < end:
            now = mono() - t0
            if nxt > now:
                # never shorter than the loop's timer resolution: uvloop rounds a timer to whole ms, so a
                # sleep of 0.3 ms returned at once and the loop spun (16 sleeps per request at 2,000 req/s)
                await asyncio.sleep(max(nxt - now, _MIN_SLEEP_S))
                continue
            while nxt <= now and nxt < end:  # send everything that is due, then sleep
                if not self._budget():
                    return
                if len(self._inflight) >= plan.max_inflight:
                    self.result.overflow += 1
                    self._finish(nxt, now, self._region(), "", "", self._tenant(), 0, "max_inflight reached")
                else:
                    task = asyncio.create_task(self._request(nxt, self._region(), self._tenant()))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                i += 1
                nxt = nxt + rng.expovariate(rate) if poisson else plan.offset_s + i / rate

    async def _closed_loop(self) -> None:
        async def user() -> None:
            mono, t0, end = time.monotonic, self._t0, self.plan.duration_s
            think = self.load.think_ms / 1000.0
            honor = self.load.honor_retry_after
            intended = mono() - t0
            while intended < end and self._budget():
                retry = await self._request(intended, self._region(), self._tenant())
                pause = max(think, min(retry, RETRY_AFTER_CAP_S)) if honor else think
                intended = mono() - t0 + pause
                if pause > 0 and intended < end:
                    await asyncio.sleep(pause)

        tasks = [asyncio.create_task(user()) for _ in range(self.load.users)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _request(self, intended: float, home: str, tenant: str) -> float:
        """Send one request and record it; return the seconds its ``Retry-After`` asks to wait (0 when
        the answer was not a 503 / 429 or had none)."""
        plan, route, t0 = self.plan, self.load.route, self._t0
        start = time.monotonic() - t0
        self.result.sent += 1
        lag_us = int((start - intended) * 1e6)
        self.result.lag.record_value(min(max(lag_us, 1), HIST_MAX_US))
        if lag_us > self._late_us:
            self.result.late += 1
        headers = self._headers.get((home, tenant))
        if headers is None:  # one dict per region and tenant, never changed: the lean client encodes it once
            headers = {"X-Client-Region": home, "Content-Type": "application/json"}
            if route == "invoke":
                headers["Authorization"] = f"Bearer {plan.api_keys[tenant]}"  # type: ignore[index]
            self._headers[(home, tenant)] = headers
        status, region, node, error, request_id, allowed, retried, shed = 0, "", "", "", "", None, "", ""
        wait = 0.0
        try:
            async with self._session.post(self._url, data=self._body(tenant), headers=headers) as resp:  # type: ignore[union-attr]
                data = await resp.read()
                status = resp.status
                region = resp.headers.get("X-Edge-Region", "")
                node = resp.headers.get("X-Edge-Node", "")
                request_id = resp.headers.get("X-Request-Id", "")
                retried = resp.headers.get("X-Router-Retried", "")
                if status in _RETRY_STATUSES:
                    wait = retry_after_s(resp.headers.get("Retry-After"))
                    if status == 503:
                        shed = resp.headers.get("X-Edge-Shed", "")
                if status == 200 and route == "check":
                    allowed = _allowed(data)
                elif status >= 300:
                    error = _error_code(data)
        except asyncio.CancelledError:
            self.result.cut_at_end += 1
            self._finish(intended, start, home, region, node, tenant, 0, f"{CUT_AT_END}: {self._cut_reason}")
            raise
        except TimeoutError:
            error = f"timeout after {plan.timeout_s} s"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._finish(intended, start, home, region, node, tenant, status, error, request_id, allowed, retried, shed)
        return wait

    def _finish(
        self, intended: float, start: float, home: str, region: str, node: str, key: str, status: int, error: str,
        request_id: str = "", allowed: bool | None = None, retried: str = "", shed: str = "",
    ) -> None:
        rec = RequestRecord(
            intended, start, time.monotonic() - self._t0, home, region, node, key, self.load.cost, status, error,
            request_id, self.load.route, allowed, retried, shed,
        )
        self.result.add(rec)
        if self.on_record is not None:
            self.on_record(rec)


async def run_load(
    plan: LoadPlan,
    *,
    stop: asyncio.Event | None = None,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Run ``plan`` to its end (or until ``stop`` is set) and return the result.

    To keep partial results when *cancelling*, hold the :class:`LoadGenerator` and read its
    :attr:`~LoadGenerator.result` after the cancellation. With ``plan.load.processes > 1`` the generator
    processes run on uvloop when it is installed (it keeps its schedule at about twice the rate).
    """
    return await LoadGenerator(plan, on_record).run(stop)


# -- several processes ---------------------------------------------------------------------------


def _child_plan(plan: LoadPlan, i: int) -> LoadPlan:
    """Process ``i``'s share of ``plan``.  It always keeps its records: they are the history, and the
    parent hands them to ``on_record`` (and drops them itself when its plan says not to keep them)."""
    load = plan.load
    n = load.processes
    share = plan.max_requests // n + (1 if i < plan.max_requests % n else 0) if plan.max_requests else 0
    users = load.users // n + (1 if i < load.users % n else 0)
    return replace(
        plan,
        load=replace(load, processes=1, rate_rps=load.rate_rps / n, users=max(users, 1)),
        offset_s=plan.offset_s + i / load.rate_rps,
        max_requests=share,
        seed=plan.seed * 1000 + i,
        connector_limit=(plan.connector_limit + n - 1) // n,
        warm_connections=(plan.warm_connections + n - 1) // n,
        max_inflight=max(plan.max_inflight // n, 1),
        keep_records=True,
    )


def _child_main(conn: Any, plan_dict: dict[str, Any]) -> None:
    """Entry point of a generator process: report ready, wait for the start instant, run, send back."""

    async def main() -> None:
        plan = LoadPlan.from_dict(plan_dict)
        gen = LoadGenerator(plan)
        cpu0 = time.process_time()
        await gen.prepare()  # warm connections open before the shared start instant
        conn.send("ready")
        gen.start_at = conn.recv()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(conn.fileno(), stop.set)  # any message from the parent means stop
        try:
            await gen.run(stop)
        finally:
            rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, KiB on Linux
            gen.result.procs = [{"pid": os.getpid(), "cpu_s": round(time.process_time() - cpu0, 3),
                                 "rss_peak_mb": round(rss_kb / 1024, 1)}]
            loop.remove_reader(conn.fileno())
            # the loop made the pipe non-blocking; a result of many records is larger than its buffer
            os.set_blocking(conn.fileno(), True)
            conn.send(gen.result.to_wire())

    try:
        import uvloop  # a generator process runs nothing else: take the faster loop when there is one

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        pass


async def _recv(conn: Any, within_s: float) -> Any:
    """Await one message on a multiprocessing connection without blocking the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, within_s)
    finally:
        loop.remove_reader(conn.fileno())
        os.set_blocking(conn.fileno(), True)  # readable means a message began; read all of it
    return conn.recv()


def _deliver(gen: LoadGenerator) -> None:
    """Hand the merged records of the processes to ``on_record``; keep them only if the plan says so.

    (They used to be dropped when the plan did not keep records, so a drill with two generator
    processes recorded no request at all.)"""
    if gen.on_record is not None:
        for rec in gen.result.records:
            gen.on_record(rec)
    if not gen.plan.keep_records:
        gen.result.records = []


async def _run_processes(gen: LoadGenerator, stop: asyncio.Event | None) -> LoadResult:
    """Split ``gen.plan`` over spawned processes that start on one shared instant; merge into gen.result."""
    plan = gen.plan
    n = plan.load.processes
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []

    def tell_stop() -> None:
        for c in conns:
            try:
                c.send("stop")
            except OSError:
                pass

    def merge(recvs: list[asyncio.Task[Any]], stopped: bool) -> None:
        for i, r in enumerate(recvs):
            if r.done() and not r.cancelled() and r.exception() is None:
                gen.result.merge(LoadResult.from_wire(_child_plan(plan, i), r.result()))
            else:
                gen.result.complete = False
        gen.result.complete = gen.result.complete and not stopped
        gen.result.records.sort(key=lambda r: r.intended_s)

    try:
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child_main, args=(child, _child_plan(plan, i).to_dict()), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        for i, c in enumerate(conns):
            try:
                ready = await _recv(c, 60)
            except (EOFError, OSError, TimeoutError):
                ready = None
            if ready != "ready":
                raise RuntimeError(
                    f"load generator process {i} did not start (exit code {procs[i].exitcode}); a script "
                    "that uses processes > 1 must guard its entry point with `if __name__ == '__main__':`"
                )
        start_at = time.monotonic() + 0.05
        gen.result = LoadResult(plan, t0=start_at, complete=False)
        for c in conns:
            c.send(start_at)
        bound = plan.duration_s + (plan.drain_s or plan.timeout_s) + 30
        recvs = [asyncio.create_task(_recv(c, bound)) for c in conns]
        stopper = asyncio.create_task(stop.wait()) if stop is not None else None
        stopped = False
        try:
            # asyncio.wait, not gather: cancelling us must not cancel the receivers.
            await asyncio.wait({*recvs, *([stopper] if stopper else [])}, return_when=asyncio.FIRST_COMPLETED)
            if stopper is not None and stopper.done():
                stopped = True
                tell_stop()
            await asyncio.wait(recvs)
        except asyncio.CancelledError:
            stopped = True
            tell_stop()
            await asyncio.wait(recvs, timeout=5)
            merge(recvs, stopped)
            _deliver(gen)
            raise
        finally:
            if stopper is not None:
                stopper.cancel()
            for r in recvs:
                r.cancel()
        gen.result.complete = True
        merge(recvs, stopped)
        _deliver(gen)
        return gen.result
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        for c in conns:
            c.close()
