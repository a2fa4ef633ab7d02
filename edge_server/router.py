"""The geo-router: sends each client to the nearest healthy region, fails over without client errors.

It stands in for latency-aware DNS / a global load balancer, but fails over in milliseconds rather
than tens of seconds because detection happens on the request path:

* **Routing.** The home region comes from ``X-Client-Region`` (missing or unknown: the first region of
  the cluster file, said so in ``X-Router-Region-Fallback``).  Regions are tried nearest first by
  ``router.latency_ms`` (self = 0, a missing entry falls back to the reverse direction, then to
  infinity); inside a region, healthy nodes take turns (round-robin).
* **Health.** Every node's ``/readyz`` is checked every ``health_interval_ms``.  A failed check takes a
  node out at once; it comes back only after ``rise`` consecutive good checks (hysteresis: a flapping
  node does not bounce traffic).  A connection error or timeout on a forwarded request ejects the node
  at once for at least ``eject_ms`` (passive ejection).  ``/readyz`` 503 ``exhausted`` counts as good:
  the limit is global, so moving the load to another region creates no tokens; the node answers 429
  with a hint itself and the router sheds that key (below).
* **Retries.** A request whose first attempt never reached a node (connect refused, connect timeout,
  or the connection reset/closed before any response byte) is retried once on the next-nearest other
  region.  This is safe for ``/v1/limits/check`` and invoke because no decision was returned; in the one
  ambiguous case (a node killed after auditing a grant but before answering) the retry carries the same
  ``X-Request-Id``, so the orphan audit event is identifiable and tokens can only be over-spent, never
  over-admitted.  Nothing is retried once a node started answering.
* **Back-pressure.** After a 429 (or a ``/v1/limits/check`` answer ``allowed: false``) for a limiter key
  the router answers that key's next requests itself (429 ``shed_by_router``) until the hint expires,
  capped at ``SHED_CAP_S`` and at the key's ``burst / rate`` (the bucket refills while the router
  sheds, so no token is lost unless the bucket would overflow) and never for windows under
  ``SHED_MIN_S``.  A hint counts only for what it surely says (see :func:`edge_server.shedding.retry_seconds`), so the
  router does not refuse requests the node would have granted.  A 503 ``overloaded`` ejects that node
  for ``OVERLOAD_EJECT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from edge_server.config import ClusterConfig, NodeSpec
from edge_server.router_metrics import RouterMetrics
from edge_server.shedding import COARSE_SHED_S, SHED_CAP_S, SHED_MIN_S, Shedder, retry_seconds

__all__ = ["COARSE_SHED_S", "OVERLOAD_EJECT_S", "ROUTER", "SHED_CAP_S", "SHED_MIN_S", "NodeHealth", "Router",
           "RouterMetrics", "Shedder", "build_router_app"]

log = logging.getLogger("edge_server.router")

OVERLOAD_EJECT_S = 0.25  # a node that answered 503 overloaded gets no new traffic this long
MAX_EJECTION_SHARE = 0.5  # passive ejection never takes out more than this share of the nodes
INLINE_BODY_MAX = 1 << 20  # responses up to this size are read whole; larger ones are streamed
FALLBACK_HEADER = "X-Router-Region-Fallback"
REGION_HEADER = "X-Client-Region"
JSON = "application/json"
_DROP_REQUEST = frozenset(h.lower() for h in ("Host", "Connection", "Keep-Alive", "Content-Length",
                                             "Transfer-Encoding", "Upgrade", "TE", "Proxy-Connection"))
_DROP_RESPONSE = frozenset(h.lower() for h in ("Connection", "Keep-Alive", "Content-Length", "Transfer-Encoding",
                                              "Upgrade", "Server", "Date"))
# Errors raised before any response byte arrived: the request never produced a decision.
_NEVER_ANSWERED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.ServerDisconnectedError,
                   aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """The node's error shape, so clients parse router and node errors alike."""
    body = json.dumps({"error": {"code": code, "message": message, "field": field}})
    return web.Response(status=status, text=body, content_type=JSON, headers=headers)


class NodeHealth:
    """What the router believes about one node; mutated only by :class:`Router`."""

    __slots__ = ("checks", "ejected_until", "fail", "healthy", "last_error", "last_latency_ms", "ok", "reason",
                 "rise_needed", "spec")

    def __init__(self, spec: NodeSpec) -> None:
        self.spec = spec
        self.healthy = False  # in rotation (subject to ejected_until)
        self.ejected_until = 0.0  # router clock; no traffic before this
        self.ok = 0  # consecutive good checks
        self.fail = 0  # consecutive failed checks
        self.checks = 0
        self.rise_needed = 1  # a node never seen failing joins on its first good check
        self.last_latency_ms: float | None = None
        self.last_error: str | None = None
        self.reason = "unchecked"  # the last /readyz reason (or the failure)

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def __repr__(self) -> str:
        return (f"<NodeHealth {self.spec.id} healthy={self.healthy} ok={self.ok} fail={self.fail} "
                f"reason={self.reason}>")


def _route_of(path: str) -> str:
    if path == "/v1/limits/check":
        return path
    if path.startswith("/v1/skills/") and path.endswith("/invoke"):
        return "/v1/skills/{skill}/invoke"
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


class Router:
    """Routing table, health state, shedding and the forwarding path of one router process."""

    def __init__(self, config: ClusterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.rc = config.router
        self.clock = clock
        self.nodes = {n.id: NodeHealth(n) for n in config.nodes}
        self.regions = {r.name: tuple(self.nodes[n.id] for n in r.nodes) for r in config.regions}
        self.default_region = config.regions[0].name
        self.order = {home: self._order(home) for home in self.regions}
        self._rr = {name: itertools.count() for name in self.regions}
        self.counters = dict.fromkeys(("forwarded", "retried", "failed", "shed", "ejections", "no_healthy"), 0)
        self.shedder = Shedder(clock, self._window_cap)
        self.metrics = RouterMetrics()
        self.session: aiohttp.ClientSession | None = None
        self.check_session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=self.rc.request_timeout_ms / 1000,
                                              sock_connect=self.rc.connect_timeout_ms / 1000)
        self._check_timeout = aiohttp.ClientTimeout(total=self.rc.health_timeout_ms / 1000)
        self._ids = itertools.count(1)
        self._boot = int(time.time() * 1000)

    # ------------------------------------------------------------------------------ routing table

    def _order(self, home: str) -> tuple[str, ...]:
        """Regions nearest first from ``home``; ties keep the cluster file's order."""
        lat = self.rc.latency_ms
        index = {name: i for i, name in enumerate(self.regions)}

        def distance(region: str) -> float:
            if region == home:
                return 0.0
            return lat.get(home, {}).get(region, lat.get(region, {}).get(home, math.inf))

        return tuple(sorted(self.regions, key=lambda r: (distance(r), index[r])))

    def _window_cap(self, key: str) -> float:
        limit = self.config.limit_for(key)
        return SHED_CAP_S if limit is None else limit.burst / limit.rate

    def pick(self, home: str, exclude_region: str | None = None,
             exclude_node: NodeHealth | None = None) -> NodeHealth | None:
        """The next node of the nearest region with a usable node, round-robin inside the region."""
        now = self.clock()
        for region in self.order[home]:
            if region == exclude_region:
                continue
            nodes = [n for n in self.regions[region] if n is not exclude_node and n.usable(now)]
            if nodes:
                return nodes[next(self._rr[region]) % len(nodes)] if len(nodes) > 1 else nodes[0]
        return None

    def routing(self) -> dict[str, str | None]:
        """Where each home region's clients go right now."""
        out: dict[str, str | None] = {}
        now = self.clock()
        for home, order in self.order.items():
            out[home] = next((r for r in order if any(n.usable(now) for n in self.regions[r])), None)
        return out

    # ------------------------------------------------------------------------------ health

    def record_check(self, node: NodeHealth, good: bool, reason: str, latency_ms: float | None,
                     error: str | None = None) -> None:
        """Apply one active check result with hysteresis: out at once, back after ``rise_needed`` goods."""
        node.checks += 1
        node.last_latency_ms = latency_ms
        node.reason = reason
        if good:
            node.ok += 1
            node.fail = 0
            if not node.healthy and node.ok >= node.rise_needed:
                node.healthy = True
                log.info("node in rotation", extra={"node": node.spec.id, "checks_ok": node.ok})
            return
        node.ok = 0
        node.fail += 1
        node.last_error = error or reason
        if node.healthy:
            node.healthy = False
            log.warning("node out of rotation", extra={"node": node.spec.id, "error": node.last_error})
        node.rise_needed = self.rc.rise

    def eject(self, node: NodeHealth, seconds: float, reason: str, error: str | None = None) -> None:
        """Passive ejection; ``overloaded`` only pauses traffic, anything else also demands ``rise`` checks.

        Like Envoy's max ejection percent: one request's failure never takes out more than
        ``MAX_EJECTION_SHARE`` of the nodes.  When a region dies, slow answers elsewhere (the survivors
        taking its load) must not empty the routing table; the active checks still remove nodes that
        really fail.
        """
        now = self.clock()
        if node.usable(now):
            out = sum(1 for n in self.nodes.values() if not n.usable(now))
            if out + 1 > MAX_EJECTION_SHARE * len(self.nodes):
                self.counters["ejections_refused"] = self.counters.get("ejections_refused", 0) + 1
                log.warning("ejection refused: too many nodes out already",
                            extra={"node": node.spec.id, "reason": reason, "out": out, "error": error})
                return
        node.ejected_until = max(node.ejected_until, self.clock() + seconds)
        if reason != "overloaded":
            node.healthy = False
            node.ok = 0
            node.rise_needed = self.rc.rise
            node.last_error = error or reason
        self.counters["ejections"] += 1
        self.metrics.ejections.labels(node.spec.id, reason).inc()
        log.warning("node ejected", extra={"node": node.spec.id, "reason": reason, "error": error,
                                           "seconds": seconds})

    async def check_once(self, node: NodeHealth) -> None:
        assert self.check_session is not None
        started = time.perf_counter()
        try:
            async with self.check_session.get(node.spec.url + "/readyz", timeout=self._check_timeout) as resp:
                doc = _json_object(await resp.read()) or {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.record_check(node, False, "unreachable", None, f"{exc.__class__.__name__}: {exc}"[:200])
            return
        latency = (time.perf_counter() - started) * 1000
        reason = str(doc.get("reason", "ok" if resp.status == 200 else resp.status))
        good = resp.status == 200 or (resp.status == 503 and reason == "exhausted")
        self.record_check(node, good, reason, round(latency, 3), None if good else f"readyz {resp.status} {reason}")

    async def check_loop(self, node: NodeHealth) -> None:
        interval = self.rc.health_interval_ms / 1000
        while True:
            started = self.clock()
            await self.check_once(node)
            await asyncio.sleep(max(0.0, interval - (self.clock() - started)))

    # ------------------------------------------------------------------------------ forwarding

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Forward one ``/v1`` request; see the module docstring for retries and shedding."""
        raw_home = request.headers.get(REGION_HEADER)
        extra: dict[str, str] = {}
        if raw_home in self.regions:
            home = raw_home
        else:
            home = self.default_region
            extra[FALLBACK_HEADER] = f"{home}; reason={'unknown' if raw_home else 'missing'}"
        route = _route_of(request.path)
        body = await request.read()
        key, parsed = self._limiter_key(route, request, body)
        if key is not None and self.shedder:
            if parsed is None and route != "/v1/limits/check":
                parsed = _json_object(body)
            left = self.shedder.remaining(key, _cost_of(parsed))
            if left > 0:
                return self._shed(route, home, key, left, extra)
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST)
        if "X-Request-Id" not in headers:
            headers["X-Request-Id"] = f"rt-{self._boot}-{next(self._ids)}"
        node = self.pick(home)
        if node is None:
            self.counters["no_healthy"] += 1
            self.metrics.count(route, 503, home, "-")
            return error_response(503, "no_healthy_region", f"no region has a healthy node for home region {home}",
                                  headers=extra)
        url_tail = request.raw_path
        assert self.session is not None
        for attempt in (0, 1):
            started = time.perf_counter()
            try:
                resp = await self.session.request(request.method, node.spec.url + url_tail, data=body or None,
                                                  headers=headers, timeout=self._timeout, allow_redirects=False)
            except _NEVER_ANSWERED as exc:
                self.eject(node, self.rc.eject_ms / 1000, "connect", f"{exc.__class__.__name__}: {exc}"[:200])
                failed = node
                node = self.pick(home, exclude_region=failed.spec.region) or self.pick(home, exclude_node=failed)
                if attempt == 0 and node is not None:
                    self.counters["retried"] += 1
                    self.metrics.retries.labels(home, node.spec.region).inc()
                    extra["X-Router-Retried"] = failed.spec.id
                    continue
                return self._fail(route, home, 502, "upstream_unreachable",
                                  f"node {failed.spec.id} could not be reached ({exc.__class__.__name__})", extra)
            except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
                self.eject(node, self.rc.eject_ms / 1000, "timeout", exc.__class__.__name__)
                return self._fail(route, home, 504, "upstream_timeout", f"node {node.spec.id} did not answer in "
                                  f"{self.rc.request_timeout_ms:g} ms; not retried (it may have acted)", extra)
            return await self._relay(request, resp, node, route, home, key, body, parsed, extra, started)
        raise AssertionError("unreachable")  # pragma: no cover

    def _limiter_key(self, route: str, request: web.Request, body: bytes) -> tuple[str | None, dict | None]:
        """The key the node will limit on: the tenant of the bearer, or the body's ``key``."""
        if route == "/v1/skills/{skill}/invoke":
            auth = request.headers.get("Authorization", "")
            return (self.config.api_keys.get(auth[7:].strip()) if auth.startswith("Bearer ") else None), None
        if route == "/v1/limits/check" and self.shedder:  # parse only when there is something to shed
            parsed = _json_object(body)
            key = parsed.get("key") if parsed else None
            return (key if isinstance(key, str) else None), parsed
        return None, None

    async def _relay(self, request: web.Request, resp: aiohttp.ClientResponse, node: NodeHealth, route: str,
                     home: str, key: str | None, body: bytes, parsed: dict | None, extra: dict[str, str],
                     started: float) -> web.StreamResponse:
        """Stream the node's answer back; learn shedding and overload hints from it on the way."""
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
            self.eject(node, self.rc.eject_ms / 1000, "broken_response", exc.__class__.__name__)
            return self._fail(route, home, 502, "upstream_broken", f"node {node.spec.id} broke off its answer "
                              f"({exc.__class__.__name__}); not retried", extra)
        self.counters["forwarded"] += 1
        self.metrics.observe_upstream(region, time.perf_counter() - started)
        self.metrics.count(route, resp.status, home, region)
        return out

    def _learn(self, route: str, resp: aiohttp.ClientResponse, node: NodeHealth, key: str | None, body: bytes,
               parsed: dict | None, data: bytes) -> None:
        status = resp.status
        if status == 429 and key is not None:
            retry_s = retry_seconds(resp.headers)
            if parsed is None:
                parsed = _json_object(body)
            self.shedder.learn(key, retry_s, _cost_of(parsed))
        elif route == "/v1/limits/check" and status == 200 and resp.headers.get("RateLimit-Reset", "0") != "0":
            doc = _json_object(data) or {}
            if doc.get("allowed") is False and isinstance(doc.get("retry_after_ms"), int | float):
                if parsed is None:
                    parsed = _json_object(body)
                k = parsed.get("key") if parsed else None
                if isinstance(k, str):
                    self.shedder.learn(k, doc["retry_after_ms"] / 1000, _cost_of(parsed))
        elif status == 503:
            doc = _json_object(data) or {}
            if (doc.get("error") or {}).get("code") == "overloaded":
                self.eject(node, OVERLOAD_EJECT_S, "overloaded")

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
        nodes = [{"id": n.spec.id, "region": n.spec.region, "url": n.spec.url, "healthy": n.healthy,
                  "usable": n.usable(now), "ejected_for_ms": max(0.0, round((n.ejected_until - now) * 1000, 3)),
                  "ejected_until": n.ejected_until if n.ejected_until > now else None,
                  "consecutive_ok": n.ok, "consecutive_fail": n.fail, "checks": n.checks, "reason": n.reason,
                  "last_check_ms": n.last_latency_ms, "last_error": n.last_error} for n in self.nodes.values()]
        regions = {name: {"nodes": len(ns), "healthy": sum(1 for n in ns if n.usable(now)),
                          "order": list(self.order[name])} for name, ns in self.regions.items()}
        return {"clock": now, "default_region": self.default_region, "nodes": nodes, "regions": regions,
                "routing": self.routing(), "counters": dict(self.counters), "shedding_keys": len(self.shedder)}


ROUTER: web.AppKey[Router] = web.AppKey("router", Router)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every router-made error is JSON in the node's shape, never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        message = "no such route" if exc.status == 404 else exc.reason
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"),
                              f"{message}: {request.method} {request.path}")
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal", "internal router error")


async def _proxy(request: web.Request) -> web.StreamResponse:
    return await request.app[ROUTER].handle(request)


async def _state(request: web.Request) -> web.Response:
    return web.json_response(request.app[ROUTER].state())


async def _healthz(request: web.Request) -> web.Response:
    router = request.app[ROUTER]
    return web.json_response({"status": "ok", "node": "router", "routing": router.routing()})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[ROUTER].metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4"})


def build_router_app(router: Router, connector_limit: int = 8192) -> web.Application:
    """The router's aiohttp app; its cleanup context owns the client sessions and the health checks."""
    app = web.Application(middlewares=[_errors], client_max_size=router.config.server.max_body_bytes + 1)
    app[ROUTER] = router

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # One shared keep-alive pool for forwarding, sized for thousands of concurrent requests; health
        # checks get their own small pool so a saturated forwarding pool cannot delay them.
        router.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connector_limit, limit_per_host=0, keepalive_timeout=30),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        router.check_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(4, 2 * len(router.nodes))))
        # One round of checks before serving, so the first requests already have somewhere to go.
        await asyncio.gather(*(router.check_once(n) for n in router.nodes.values()))
        tasks = [asyncio.create_task(router.check_loop(n), name=f"check-{n.spec.id}") for n in router.nodes.values()]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await router.session.close()
            await router.check_session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/router/state", _state)
    app.router.add_route("*", "/v1/{tail:.*}", _proxy)
    return app
