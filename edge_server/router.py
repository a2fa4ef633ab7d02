"""The geo-router: sends each client to the nearest healthy region, fails over without client errors,
and never takes the regions out because it is itself overloaded.  ``docs/router.md`` is the long form.

* **Routing.** The home region comes from ``X-Client-Region`` (missing or unknown: the first region of
  the cluster file, said so in ``X-Router-Region-Fallback``).  Regions are tried nearest first by
  ``router.latency_ms``; inside a region nodes take turns.  Nodes with no failure evidence come before
  nodes kept in rotation despite evidence (the ejection cap, below).
* **Health.** ``/readyz`` of every node every ``health_interval_ms``, from a thread with its own loop
  and connections (:mod:`edge_server.router_health`).  Out of rotation: at once for hard evidence
  (refused, unreachable, reset) or 503 starting/draining; after ``fall`` timeouts in a row; back after
  ``rise`` good checks.  On the request path: refused/reset take the node out for ``eject_ms``;
  ``timeout_eject_count`` timed-out tries in a row on a node that had answered do too; a slow connect
  only demotes the node (never an ejection).  A timeout while the router's own loop lagged is no
  evidence at all.
* **Never a self-inflicted outage.** At most ``max_ejected_share`` of the nodes are out of rotation at
  once, whatever the path (checks, passive ejection, overload pauses): past it the node stays in,
  demoted.  With fewer than ``panic_threshold`` of the nodes in rotation, nodes out of rotation without
  failure evidence (rising after a restart, never checked) get traffic too.
* **Retries.** A try that never reached a node (refused, unreachable, connect timeout) or that a node
  shed before deciding (503 with ``X-Edge-Shed``) is retried once on the next region.  A try in flight
  is hedged on ``/v1/limits/check`` (a second try on the next region after ``check_try_timeout_ms``
  while the first keeps waiting; the first answer wins, and the loser is followed to its answer so that
  a grant by both tries is a counted double grant, :mod:`edge_server.hedge_watch`).  An invoke is committed once
  (:mod:`edge_server.commit`): its tries ask for ``100 Continue`` and only the first node to say it gets
  the body; a try with no ``100 Continue`` (reset, closed, or none within ``invoke_header_timeout_ms``)
  did nothing and is retried or hedged, a try that got the body never is (``retry_inflight_invoke``
  turns the protocol off and hedges after ``invoke_try_timeout_ms``, for skills safe to run twice).
  Every retry is paid from a retry budget (:class:`edge_server.admission.RetryBudget`).  Each try
  carries ``X-Edge-Deadline-Ms``: a node that gets it late (paused, queued) refuses it without granting.
* **Shedding.** At most ``max_inflight`` requests in flight, ``queue_max`` more waiting at most
  ``queue_timeout_ms``; the rest get a quick 503 ``router_overloaded`` with ``Retry-After``.  After a 429
  for a key, that key is answered 429 by the router itself for a while (:mod:`edge_server.shedding`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from edge_server.admission import AdaptiveLimit, Gate, RetryBudget
from edge_server.commit import Claim, CommitPayload
from edge_server.config import ClusterConfig
from edge_server.early_shed import EarlyShed, shed_answer
from edge_server.hedge_watch import HedgeWatch, discard, first_done, granted
from edge_server.overload_metrics import OverloadCollector
from edge_server.router_health import NodeHealth, classify
from edge_server.router_metrics import RouterMetrics
from edge_server.routing import RoutingTable
from edge_server.shedding import COARSE_SHED_S, SHED_CAP_S, SHED_MIN_S, Shedder, retry_seconds

__all__ = ["COARSE_SHED_S", "DEADLINE_HEADER", "OVERLOAD_EJECT_S", "SHED_CAP_S", "SHED_HEADER", "SHED_MIN_S",
           "NodeHealth", "Router", "RouterMetrics", "Shedder", "error_response"]

log = logging.getLogger("edge_server.router")

OVERLOAD_EJECT_S = 0.25  # a node that shed a request gets no new traffic this long (under the cap)
INLINE_BODY_MAX = 1 << 20  # responses up to this size are read whole; larger ones are streamed
FALLBACK_HEADER = "X-Router-Region-Fallback"
REGION_HEADER = "X-Client-Region"
DEADLINE_HEADER = "X-Edge-Deadline-Ms"  # unix ms after which the node must not act on the try
LOOP_LAG_SHED = "loop_lag"  # shed reason: a connect timed out while the router's own loop lagged
SHED_HEADER = "X-Edge-Shed"  # on a node's 503: it shed the request before deciding (safe to retry)
CHECK_ROUTE, INVOKE_ROUTE = "/v1/limits/check", "/v1/skills/{skill}/invoke"
# Tries that certainly never reached a node: retried on every route, invoke too (nothing ran).
_NOT_REACHED = frozenset({"refused", "unreachable", "connect_timeout", "not_written"})
_DROP_REQUEST = frozenset(h.lower() for h in ("Host", "Connection", "Keep-Alive", "Content-Length",
                                             "Transfer-Encoding", "Upgrade", "TE", "Proxy-Connection", "Expect"))
_DROP_RESPONSE = frozenset(h.lower() for h in ("Connection", "Keep-Alive", "Content-Length", "Transfer-Encoding",
                                              "Upgrade", "Server", "Date"))


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """The node's error shape, so clients parse router and node errors alike."""
    body = json.dumps({"error": {"code": code, "message": message, "field": field}})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def _overloaded_message(reason: str) -> str:
    return f"the router is at capacity ({reason}); retry later"


def _route_of(path: str) -> str:
    if path == CHECK_ROUTE:
        return path
    if path.startswith("/v1/skills/") and path.endswith("/invoke"):
        return INVOKE_ROUTE
    return "/v1/other"


def _cost_of(body: dict[str, Any] | None) -> int:
    cost = body.get("cost", 1) if body else 1
    return cost if isinstance(cost, int) and not isinstance(cost, bool) and cost >= 1 else 1


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


class Router(RoutingTable):
    """Admission, shedding and the forwarding path of one router process, over its routing table."""

    def __init__(self, config: ClusterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, clock)
        rc = self.rc
        self.shedder = Shedder(clock, self._window_cap)
        self.gate = Gate(rc.max_inflight, rc.queue_max, rc.queue_timeout_ms / 1000)
        self.adaptive = (AdaptiveLimit(self.gate, rc.lag_target_ms / 1000, rc.lag_interval_ms / 1000, rc.min_inflight)
                         if rc.lag_target_ms > 0 else None)
        self.budget = RetryBudget(rc.retry_budget_ratio, rc.retry_budget_min_per_s, clock)
        self.guard: Any = None  # the ConnectionGuard when served by router_main (slow clients)
        self.metrics.registry.register(OverloadCollector("router", lambda: (self.gate, self.guard), self.adaptive))
        self.session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=rc.request_timeout_ms / 1000,
                                              sock_connect=rc.connect_timeout_ms / 1000)
        # Routes whose tries are hedged after a per-try timeout (seconds); the others wait for their answer.
        # Invoke tries are hedged either way: before their node's 100 Continue (the commit protocol, where
        # a hedge can never run the skill twice) or, with retry_inflight_invoke, even while it runs.
        self._per_try: dict[str, float] = {CHECK_ROUTE: rc.check_try_timeout_ms / 1000}
        self._commit = not rc.retry_inflight_invoke
        self._per_try[INVOKE_ROUTE] = (rc.invoke_header_timeout_ms if self._commit else rc.invoke_try_timeout_ms) / 1000
        self._ids = itertools.count(1)
        self._boot = int(time.time() * 1000)
        # A hedged check's losing try is followed to its answer, not cancelled: double grants are counted.
        self.hedges = HedgeWatch(self.counters, lambda r, result: self.metrics.hedge_losers.labels(r, result).inc())

    # ------------------------------------------------------------------------------ routing table

    def _window_cap(self, key: str) -> float:
        limit = self.config.limit_for(key)
        return SHED_CAP_S if limit is None else limit.burst / limit.rate

    def early_shed(self) -> EarlyShed:
        """The connection guard's hook that answers a gated request from its raw bytes when the gate
        would refuse it anyway (:mod:`edge_server.early_shed`): the same 503 as :meth:`handle`'s."""

        def route_of(path: bytes) -> str | None:
            p = path.partition(b"?")[0]
            if not p.startswith(b"/v1/") or p.startswith(b"/v1/router/"):
                return None  # only /v1 traffic is gated (the router's own state is not)
            return _route_of(p.decode("latin-1"))

        def on_shed(route: str) -> None:
            self.counters["overload_shed"] += 1
            self.metrics.count(route, 503, "-", "-")

        def answer(reason: str) -> bytes:
            return shed_answer("router_overloaded", _overloaded_message(reason), reason, {})

        return EarlyShed(self.gate, route_of, answer, on_shed)

    # ------------------------------------------------------------------------------ forwarding

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Admission first (a quick 503 past the gate), then :meth:`forward`."""
        gate = self.gate
        if not gate.try_enter():
            reason = await gate.enter()
            if reason is not None:
                self.counters["overload_shed"] += 1
                self.metrics.count(_route_of(request.path), 503, "-", "-")
                if self.guard is not None:  # the connection is free for its next request (and its deadline)
                    self.guard.done(request.transport)
                return error_response(503, "router_overloaded", _overloaded_message(reason),
                                      headers={"Retry-After": "1", "Retry-After-Ms": "100", SHED_HEADER: reason})
        try:
            return await self.forward(request)
        finally:
            gate.leave()
            if self.guard is not None:
                self.guard.done(request.transport)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Forward one ``/v1`` request; see the module docstring for retries and shedding."""
        raw_home = request.headers.get(REGION_HEADER)
        extra: dict[str, str] = {}
        if raw_home in self.regions:
            home = raw_home
        else:
            home = self.default_region
            extra[FALLBACK_HEADER] = f"{home}; reason={'unknown' if raw_home else 'missing'}"
        route = _route_of(request.path)
        try:
            async with asyncio.timeout(self.rc.header_timeout_ms / 1000):
                body = await request.read()
        except TimeoutError:
            return self._fail(route, home, 408, "body_timeout", "the request body did not arrive in time", extra)
        key, parsed = self._limiter_key(route, request, body)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST)
        if "X-Request-Id" not in headers:
            headers["X-Request-Id"] = f"rt-{self._boot}-{next(self._ids)}"
        node = self.pick(home)
        if node is None:
            self.counters["no_healthy"] += 1
            self.metrics.count(route, 503, home, "-")
            return error_response(503, "no_healthy_region", f"no region has a node for home region {home}",
                                  headers={"Retry-After": "1", **extra})
        if key is not None and self.shedder:
            parsed, left = self._shed_left(route, key, body, parsed, node.spec.id)
            if left > 0:
                return self._shed(route, home, key, left, extra)
        self.budget.request()
        return await self._tries(request, route, home, node, key, body, parsed, headers, extra)

    async def _tries(self, request: web.Request, route: str, home: str, first: NodeHealth, key: str | None,
                     body: bytes, parsed: dict | None, headers: CIMultiDict[str], extra: dict[str, str]
                     ) -> web.StreamResponse:
        """At most two tries.  A try that never reached its node, or that the node shed, is retried at
        once; on the hedged routes a try still unanswered after the per-try timeout gets a second one on
        the next region *while it keeps waiting*: the first answer wins, the other try is cancelled (a
        check's is followed to its answer instead, to count a double grant).
        Without a retry budget the first try simply goes on waiting, so a slow answer (our own lag, a
        busy node) is never turned into an error.  An invoke under the commit protocol counts as
        answered at its node's ``100 Continue``: the first such try gets the body and the others are
        cancelled unsent; after that nothing is hedged or retried (the skill may run)."""
        assert self.session is not None
        session, loop = self.session, asyncio.get_running_loop()
        per_try = self._per_try.get(route)
        total = self.rc.request_timeout_ms / 1000
        ends = loop.time() + total
        pending: dict[asyncio.Task[aiohttp.ClientResponse], tuple[NodeHealth, float]] = {}
        deadlines: dict[asyncio.Task[aiohttp.ClientResponse], float] = {}  # loop time of each try's deadline
        tries, hedged, reason, last = 0, False, "", first
        won: tuple[str, bool] | None = None  # a hedged check's answer: (its node, whether it granted)

        def committed(winner: asyncio.Task[aiohttp.ClientResponse]) -> None:
            """``winner``'s node said 100 Continue first: it alone gets the body, the others are dropped."""
            node, started = pending.get(winner, (first, 0.0))
            self.metrics.observe_continue(node.spec.region, time.perf_counter() - started)
            for task in [t for t in pending if t is not winner]:
                del pending[task]
                self.counters["invoke_tries_cancelled"] += 1
                task.cancel()
                task.add_done_callback(discard)

        claim = Claim(committed) if route == INVOKE_ROUTE and self._commit else None

        def launch(node: NodeHealth) -> None:
            """Send a try.  Its deadline: for the first try of a hedged route twice the per-try timeout
            (by then the router has most likely got its answer elsewhere: a node that only gets to the
            try later, paused or queued, must not grant it); for the last try, the rest of the request."""
            nonlocal tries, last
            tries, last = tries + 1, node
            hdrs = headers if tries == 1 else CIMultiDict(headers)  # the first try owns the request's copy
            budget_s = 2 * per_try if per_try is not None and tries == 1 else ends - loop.time()
            # The try is written on a later turn of our loop: when the loop lags, that is later still.
            budget_s += self.current_lag()
            hdrs[DEADLINE_HEADER] = str(int((time.time() + budget_s) * 1000))
            data: Any = body or None
            if claim is not None:
                data = CommitPayload(body, claim, hdrs.get("Content-Type"))
            task = asyncio.ensure_future(session.request(request.method, node.spec.url + request.raw_path,
                                                         data=data, headers=hdrs, timeout=self.try_timeout(),
                                                         allow_redirects=False, expect100=claim is not None))
            if claim is not None:
                data.owner = task
            pending[task] = (node, time.perf_counter())
            deadlines[task] = loop.time() + budget_s

        launch(first)
        try:
            while pending:
                wait = ends - loop.time()
                hedge_due = per_try is not None and not hedged and tries == 1 and (claim is None or
                                                                                   claim.holder is None)
                if wait <= 0:
                    break
                done = await first_done(loop, list(pending), min(wait, per_try) if hedge_due else wait)
                if not done:
                    if not hedge_due:
                        break  # the whole request timed out
                    if claim is not None and claim.holder is not None:
                        continue  # its node said 100 Continue in time: wait for its answer
                    if self.current_lag() > per_try / 2:
                        # Our own loop is late, so the answer (or the 100 Continue) may be waiting in
                        # our buffers: a hedge now would add a try (a connection, a node's work, and on
                        # the check route a second grant under one request id) to an overloaded
                        # router; wait one more per-try timeout instead.
                        self.counters["hedges_deferred"] += 1
                        continue
                    hedged = True
                    slow = next(iter(pending.values()))[0]
                    self.try_failed(slow, "timeout", f"no answer within the per-try timeout of {per_try:g} s")
                    nxt = self._retry_target(home, slow)
                    if nxt is not None:
                        reason = "timeout"
                        launch(nxt)
                    continue
                for task in done:
                    if task not in pending:
                        continue  # cancelled: another try was given the body
                    node, started = pending.pop(task)
                    exc = task.exception()
                    if exc is not None:
                        kind = classify(exc)
                        self.try_failed(node, kind, f"{exc.__class__.__name__}: {exc}"[:200])
                        if pending:
                            continue  # the other try may still answer
                        acted = claim is None or claim.holder is task
                        nxt = (self._retry_target(home, node) if tries < 2 and (
                            kind in _NOT_REACHED or (per_try is not None and not (claim and acted))) else None)
                        if nxt is None:
                            return self._try_error(route, home, node, kind, self._retried(extra, first, node,
                                                                                          reason), acted)
                        reason = kind
                        launch(nxt)
                        continue
                    resp = task.result()
                    self.answered(node)
                    shed = resp.headers.get(SHED_HEADER) if resp.status == 503 else None
                    if shed is not None:  # the node refused before deciding: safe to send anywhere
                        if shed != "deadline":  # a late try says nothing about the node (we may be late)
                            self.take_out(node, "overloaded", OVERLOAD_EJECT_S)
                        nxt = None if pending or tries >= 2 else self._retry_target(home, node)
                        if pending or nxt is not None:
                            resp.release()
                            if nxt is not None:
                                reason = f"shed:{shed}"
                                launch(nxt)
                            continue
                    out = await self._relay(request, resp, node, route, home, key, body, parsed,
                                            self._retried(extra, first, node, reason), started)
                    if pending and route == CHECK_ROUTE:  # a hedged check: its other try may grant as well
                        won = (node.spec.id, isinstance(out, web.Response) and isinstance(out.body, bytes)
                               and granted(out.status, out.body))
                    return out
            for node, _ in pending.values():
                if not (hedged and node is first):  # the first was already judged at its per-try timeout
                    self.try_failed(node, "timeout", f"no answer within {total:g} s")
            # Where the request waited, for whoever traces a 504: which tries were still out, how long
            # each had run, whether a node had said 100 Continue, and how late our own loop was.
            now_pc = time.perf_counter()
            log.warning("request timed out", extra={
                "route": route, "home": home, "request_id": headers.get("X-Request-Id", ""), "tries": tries,
                "hedged": hedged, "timeout_s": total, "loop_lag_ms": round(self.current_lag() * 1000, 1),
                "continued_by": (pending[claim.holder][0].spec.id if claim is not None and claim.holder in pending
                                 else None),
                "pending": [(n.spec.id, round(now_pc - t0, 3)) for n, t0 in pending.values()]})
            return self._try_error(route, home, last, "timeout", self._retried(extra, first, last, reason),
                                   claim is None or claim.holder is not None)
        finally:
            if won is not None and per_try is not None:
                # Followed for as long as its node may act on it (its deadline), plus one per-try
                # timeout for the answer to come back: see edge_server.hedge_watch.
                now = loop.time()
                self.hedges.watch(route, headers.get("X-Request-Id", ""),
                                  [(t, n.spec.id, deadlines[t] - now + per_try) for t, (n, _) in pending.items()],
                                  *won)
            else:
                for task in pending:
                    task.cancel()
                    task.add_done_callback(discard)

    def try_timeout(self) -> aiohttp.ClientTimeout:
        """A try's client timeout.  While our own loop lags (by more than a quarter of the connect
        timeout), the connect timeout grows by twice the lag:
        a connect that the kernel completed at once but that our busy loop saw late is no slow node.
        Without this, 4,000 closed-loop users lagged the loop by 1.3 s, every new connect "timed out"
        at 250 ms, no connection ever reached the pool, and 99.7 % of requests got 502 for as long as the
        load lasted (benchmarks/bench_overload.py)."""
        lag = self.current_lag()
        connect = self._timeout.sock_connect or 0.0
        if lag <= connect / 4:
            return self._timeout
        return aiohttp.ClientTimeout(total=self._timeout.total, sock_connect=connect + 2 * lag)

    @staticmethod
    def _retried(extra: dict[str, str], first: NodeHealth, node: NodeHealth, reason: str) -> dict[str, str]:
        if node is not first:
            extra["X-Router-Retried"] = first.spec.id
            extra["X-Router-Retry-Reason"] = reason
        return extra

    def _retry_target(self, home: str, failed: NodeHealth) -> NodeHealth | None:
        node = self.pick(home, exclude_region=failed.spec.region) or self.pick(home, exclude_node=failed)
        if node is None:
            return None
        if not self.budget.try_retry():
            self.counters["retry_budget_exhausted"] += 1
            self.metrics.retry_budget_exhausted.inc()
            return None
        self.counters["retried"] += 1
        self.metrics.retries.labels(home, node.spec.region).inc()
        return node

    def _try_error(self, route: str, home: str, node: NodeHealth, kind: str, extra: dict[str, str],
                   acted: bool = True) -> web.Response:
        """The answer for a request whose last try failed; ``acted`` False: no node was given the body of
        this skill call (the commit protocol), so nothing ran, whatever the connection did."""
        nid = node.spec.id
        if kind == "connect_timeout" and self.current_lag() > (self._timeout.sock_connect or 0.0) / 4:
            # Our own loop was late, not the node: the request never reached it (no token, no skill
            # call), so it is the router's overload and is answered as a shed, with Retry-After.
            self.gate.shed[LOOP_LAG_SHED] = self.gate.shed.get(LOOP_LAG_SHED, 0) + 1
            self.counters["overload_shed"] += 1
            return self._fail(route, home, 503, "router_overloaded", "the router is at capacity (its own loop "
                              "lagged while connecting); retry later",
                              {**extra, "Retry-After": "1", "Retry-After-Ms": "100", SHED_HEADER: LOOP_LAG_SHED})
        if kind in _NOT_REACHED:
            return self._fail(route, home, 502, "upstream_unreachable", f"node {nid} could not be reached ({kind})",
                              extra)
        if not acted:
            return self._fail(route, home, 502 if kind != "timeout" else 504, "upstream_unreachable",
                              f"node {nid} did not accept the request ({kind}) and no other region could take "
                              "it; the skill was not called", {**extra, "Retry-After": "1"})
        if kind == "timeout":
            return self._fail(route, home, 504, "upstream_timeout", f"node {nid} did not answer in time; not "
                              "retried (it may have acted)", extra)
        return self._fail(route, home, 502, "upstream_broken", f"node {nid} dropped the connection ({kind}); not "
                          "retried (it may have acted)", extra)

    def _limiter_key(self, route: str, request: web.Request, body: bytes) -> tuple[str | None, dict | None]:
        """The key the node will limit on: the tenant of the bearer, or the body's ``key``."""
        if route == INVOKE_ROUTE:
            auth = request.headers.get("Authorization", "")
            return (self.config.api_keys.get(auth[7:].strip()) if auth.startswith("Bearer ") else None), None
        if route == CHECK_ROUTE and self.shedder:  # parse only when there is something to shed
            parsed = _json_object(body)
            key = parsed.get("key") if parsed else None
            return (key if isinstance(key, str) else None), parsed
        return None, None

    async def _relay(self, request: web.Request, resp: aiohttp.ClientResponse, node: NodeHealth, route: str,
                     home: str, key: str | None, body: bytes, parsed: dict | None, extra: dict[str, str],
                     started: float) -> web.StreamResponse:
        """Stream the node's answer back; learn shedding hints from it on the way."""
        region = node.spec.region
        out_headers = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in _DROP_RESPONSE)
        out_headers.update(extra)
        try:
            async with resp:
                length = resp.content_length
                if length is not None and length <= INLINE_BODY_MAX:
                    data = await resp.read()
                    self._learn(route, resp, node, key, body, parsed, data)
                    out: web.StreamResponse = web.Response(status=resp.status, body=data, headers=out_headers)
                else:
                    out = web.StreamResponse(status=resp.status, headers=out_headers)
                    await out.prepare(request)
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        await out.write(chunk)
                    await out.write_eof()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The node started answering: never retry, it may have acted.
            self.try_failed(node, "reset", exc.__class__.__name__)
            return self._fail(route, home, 502, "upstream_broken", f"node {node.spec.id} broke off its answer "
                              f"({exc.__class__.__name__}); not retried", extra)
        self.counters["forwarded"] += 1
        self.metrics.observe_upstream(region, time.perf_counter() - started)
        self.metrics.count(route, resp.status, home, region)
        return out

    def _learn(self, route: str, resp: aiohttp.ClientResponse, node: NodeHealth, key: str | None, body: bytes,
               parsed: dict | None, data: bytes) -> None:
        status = resp.status
        scope = node.spec.id  # a denial speaks for its node's view only (edge_server.shedding)
        if status == 429 and key is not None:
            if parsed is None:
                parsed = _json_object(body)
            self.shedder.learn(key, retry_seconds(resp.headers), _cost_of(parsed), scope)
        elif route == CHECK_ROUTE and status == 200 and resp.headers.get("RateLimit-Reset", "0") != "0":
            doc = _json_object(data) or {}
            if doc.get("allowed") is False and isinstance(doc.get("retry_after_ms"), int | float):
                if parsed is None:
                    parsed = _json_object(body)
                k = parsed.get("key") if parsed else None
                if isinstance(k, str):
                    self.shedder.learn(k, doc["retry_after_ms"] / 1000, _cost_of(parsed), scope)

    def _shed_left(self, route: str, key: str, body: bytes, parsed: dict | None,
                   scope: str) -> tuple[dict | None, float]:
        """The body as parsed (once) and how long ``key`` is still shed within ``scope``."""
        if parsed is None and route != CHECK_ROUTE:
            parsed = _json_object(body)
        return parsed, self.shedder.remaining(key, _cost_of(parsed), scope)

    def _shed(self, route: str, home: str, key: str, left: float, extra: dict[str, str]) -> web.Response:
        self.counters["shed"] += 1
        self.metrics.shed.labels(route).inc()
        self.metrics.count(route, 429, home, "-")
        headers = {"Retry-After": str(max(1, math.ceil(left))), "X-Router-Shed-Ms": str(math.ceil(left * 1000)),
                   **extra}
        return error_response(429, "shed_by_router", f"key {key!r} was just refused by a node; the router sheds "
                              f"it for {left * 1000:.0f} ms more", headers=headers)

    def _fail(self, route: str, home: str, status: int, code: str, message: str,
              extra: dict[str, str]) -> web.Response:
        self.counters["failed"] += 1
        self.metrics.count(route, status, home, "-")
        return error_response(status, code, message, headers=extra)

    # ------------------------------------------------------------------------------ introspection

    def state(self) -> dict[str, Any]:
        now = self.clock()
        regions = {name: {"nodes": len(ns), "healthy": sum(1 for n in ns if n.usable(now)),
                          "order": list(self.order[name])} for name, ns in self.regions.items()}
        return {"clock": now, "default_region": self.default_region, "nodes": self.node_states(now),
                "regions": regions, "routing": self.routing(), "counters": dict(self.counters),
                "shedding_keys": len(self.shedder), "panic": self.in_panic(now), "max_out": self.max_out,
                "inflight": self.gate.inflight, "inflight_limit": self.gate.limit, "queued": self.gate.queued,
                "loop_lag_ms": round(self.loop_lag_s * 1000, 3), "retry_budget_left": round(self.budget.left(), 1),
                "double_grants_recent": list(self.hedges.recent)}

    async def watch_loop_lag(self, tick_s: float = 0.02) -> None:
        """Our own loop's lag over the last ~0.5 s (a timeout judged during a lag is no evidence)."""
        recent: list[float] = []
        while True:
            t0 = time.monotonic()
            self._lag_due = t0 + tick_s
            await asyncio.sleep(tick_s)
            recent.append(max(0.0, time.monotonic() - t0 - tick_s))
            del recent[:-25]
            self.loop_lag_s = max(recent)
            self.refresh_gauges()


