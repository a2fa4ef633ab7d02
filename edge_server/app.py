"""The HTTP face of a node: parse, validate, ask :class:`Node`, answer in JSON.

Every error is ``{"error": {"code", "message", "field"}}`` with a 4xx status (5xx only for a failed
skill, a full key table or an unwritable audit trail) -- never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from edge_server.admission import AdaptiveLimit, Gate
from edge_server.api_input import (
    JSON,
    ApiError,
    arrived_json_body,
    check_key,
    error_response,
    json_body,
    parse_cost,
)
from edge_server.audit import AuditUnavailable
from edge_server.commit import client_gone, send_continue
from edge_server.conn_guard import ConnectionGuard
from edge_server.early_shed import EarlyShed, shed_answer
from edge_server.fast_check import FastCheck
from edge_server.node import Node
from edge_server.overload_metrics import OverloadCollector
from edge_server.peer_api import audit, audit_replica, audit_replica_held, audit_replica_read, gossip, strict_messages
from edge_server.skill import SkillError
from edge_server.strict.table import CostExceedsNodeCap
from edge_server.strict_gossip import LEASE_ENDED
from edge_server.token_bucket import CostExceedsBurst, Decision, KeyTableFull, NoLimitForKey

__all__ = ["ROUTES", "ApiError", "EdgeServer", "build_server"]

log = logging.getLogger("edge_server.app")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


Handler = Callable[[Node, web.BaseRequest], Awaitable[web.StreamResponse]]
INVOKE_PREFIX, INVOKE_SUFFIX = "/v1/skills/", "/invoke"
# Admission (docs/router.md, "Load shedding"): only the two decision routes are gated; health,
# metrics, state, audit and gossip always get through (an overloaded node must still say so, and
# keep its peers' view of its count fresh).
GATED = frozenset({"/v1/limits/check", INVOKE_PREFIX + "{skill}" + INVOKE_SUFFIX})
DEADLINE_HEADER = "X-Edge-Deadline-Ms"  # unix ms set by the router: past it, the try is refused ungranted
SHED_HEADER = "X-Edge-Shed"  # on a 503 that refused a request before any decision (safe to retry)


def _skill_of(raw_path: str) -> str | None:
    """``{skill}`` of ``/v1/skills/{skill}/invoke``, percent-decoded; None for any other path."""
    path = raw_path.partition("?")[0]
    if path.startswith(INVOKE_PREFIX) and path.endswith(INVOKE_SUFFIX):
        skill = unquote(path[len(INVOKE_PREFIX):-len(INVOKE_SUFFIX)])
        if skill and "/" not in skill:
            return skill
    return None


class EdgeServer:
    """Routes requests to handlers and wraps them: JSON errors, identity headers, in-flight count, metrics.

    A table lookup on aiohttp's low-level server rather than a ``web.Application`` with a middleware:
    the application router costs ~3 µs and a middleware ~5 µs a request here, together a fifth of a
    bare request, and this edge serves nothing but a handful of fixed routes.
    """

    def __init__(self, node: Node, routes: list[tuple[str, str, Handler]]) -> None:
        self.node = node
        self.routes: dict[str, dict[str, Handler]] = {}
        for method, path, handler in routes:
            self.routes.setdefault(path, {})[method] = handler
        self.ident = node.ident
        sv = node.config.server
        self.gate = Gate(sv.max_inflight, sv.queue_max, sv.queue_timeout_ms / 1000)
        self.adaptive = (AdaptiveLimit(self.gate, sv.lag_target_ms / 1000, sv.lag_interval_ms / 1000, sv.min_inflight)
                         if sv.lag_target_ms > 0 else None)
        self._adaptive_task: asyncio.Task[None] | None = None  # started by the first gated request (a loop runs)
        self.guard: ConnectionGuard | None = None

    async def _admit(self) -> None:
        """Wait for a slot in the queue, or refuse before any decision (a quick 503, no token)."""
        reason = await self.gate.enter()
        if reason is not None:
            raise _shed(reason, _SHED_MESSAGE)

    def _resolve(self, request: web.BaseRequest) -> tuple[str, Handler]:
        path = request.raw_path.partition("?")[0]
        methods = self.routes.get(path)
        if methods is None and _skill_of(path) is not None:
            path = INVOKE_PREFIX + "{skill}" + INVOKE_SUFFIX
            methods = self.routes.get(path)
        if methods is None:
            raise ApiError(404, "not_found", f"no such route: {request.method} {request.path}")
        handler = methods.get(request.method)
        if handler is None:
            raise ApiError(405, "method_not_allowed", f"method not allowed: {request.method} {request.path}",
                           headers={"Allow": ",".join(sorted(methods))})
        return path, handler

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        node = self.node
        started = time.perf_counter()
        node.inflight += 1
        route = "unmatched"
        gated = False
        try:
            route, handler = self._resolve(request)
            if route in GATED:
                if self._adaptive_task is None and self.adaptive is not None:
                    self._adaptive_task = asyncio.get_running_loop().create_task(self.adaptive.run())
                deadline = request.headers.get(DEADLINE_HEADER)
                if deadline is not None and deadline.isdigit() and time.time() * 1000 > int(deadline):
                    self.gate.shed["deadline"] = self.gate.shed.get("deadline", 0) + 1
                    raise _shed("deadline", "the request's deadline passed before the node could act on it")
                if not self.gate.try_enter():
                    await self._admit()
                gated = True
            response = await handler(node, request)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
        except web.HTTPException as exc:
            code = _HTTP_CODES.get(exc.status, "http_error")
            response = error_response(exc.status, code, f"{exc.reason}: {request.method} {request.path}")
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception:  # a bug: answer JSON, keep serving, log the traceback
            log.exception("unhandled error", extra={"path": request.path})
            response = error_response(500, "internal", "internal error")
        finally:
            node.inflight -= 1
            if gated:
                self.gate.leave()
            if self.guard is not None:
                self.guard.done(request.transport)
        if "X-Edge-Node" not in response.headers:
            response.headers.update(self.ident)
        node.metrics.observe(route, response.status, time.perf_counter() - started)
        return response


def _rate_headers(node: Node, decision: Decision, request_id: str) -> dict[str, str]:
    """The IETF RateLimit-* headers, the request id, and the node's identity (all in one dict)."""
    headers = {
        "Content-Type": JSON,
        "RateLimit-Limit": str(int(decision.limit)),
        "RateLimit-Remaining": str(int(decision.remaining)),
        "RateLimit-Reset": "0",
        "X-Request-Id": request_id,
        **node.ident,
    }
    if not decision.allowed:
        headers["RateLimit-Reset"] = str(max(0, math.ceil(decision.retry_after_s)))
        headers["Retry-After-Ms"] = str(max(1, math.ceil(decision.retry_after_s * 1000)))
    return headers


def _decision_error(exc: Exception, cost: int, node: Node) -> ApiError:
    """What a refused decision (or a failed audit write) means for the caller."""
    if isinstance(exc, NoLimitForKey):
        return ApiError(400, "no_limit", "no configured limit matches this key", "key")
    if isinstance(exc, CostExceedsNodeCap):
        return ApiError(400, "invalid_field", f"cost {cost} exceeds {exc.cap:.4g}, the most rights of this key "
                        f"(burst {exc.burst:g}) one node can hold in strict mode; it could never be allowed", "cost")
    if isinstance(exc, CostExceedsBurst):
        return ApiError(400, "invalid_field", f"cost {cost} exceeds the burst {exc.burst:g} of this key; "
                        "it could never be allowed", "cost")
    if isinstance(exc, KeyTableFull):
        node.metrics.key_table_full.inc()
        return ApiError(503, "key_table_full", "the node holds its maximum of live keys; retry later",
                        headers={"Retry-After": "1"})
    return ApiError(503, "audit_unavailable", str(exc), headers={"Retry-After": "1"})


DECISION_ERRORS = (NoLimitForKey, CostExceedsBurst, KeyTableFull, AuditUnavailable)
STARTING = ApiError(503, "starting", "the node is still recovering its audit trail", headers={"Retry-After": "1"})


# ------------------------------------------------------------------------------------ handlers

async def healthz(node: Node, request: web.BaseRequest) -> web.Response:
    return web.json_response({"status": "ok", "node": node.spec.id, "region": node.spec.region,
                              "mode": node.config.mode})


async def readyz(node: Node, request: web.BaseRequest) -> web.Response:
    ready, reason = node.readiness()
    body = {"ready": ready, "reason": reason, "node": node.spec.id, "region": node.spec.region}
    return web.json_response(body, status=200 if ready else 503)


async def limits_check(node: Node, request: web.BaseRequest) -> web.Response:
    body = arrived_json_body(request, node)
    if body is None:
        body = await json_body(request, node)
    if "key" not in body:
        raise ApiError(400, "missing_field", "key is required", "key")
    key = check_key(body["key"], node)
    cost = parse_cost(body, node)
    request_id = request.headers.get("X-Request-Id", "")[:128] or node.new_request_id()
    if node.table is None and node.strict is None:
        raise STARTING
    try:
        d, written = node.decide(key, cost, request_id)
        if written is not None and (revoked := await written) is not None:
            d = revoked  # strict mode: the lease ended during the write; the answer is a denial
    except DECISION_ERRORS as exc:
        raise _decision_error(exc, cost, node) from None
    body, headers = check_answer(node, d, request_id)
    return web.Response(body=body, headers=headers)


def check_answer(node: Node, d: Decision, request_id: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a check's answer (aiohttp's handler and the raw-bytes path alike)."""
    doc = {"allowed": d.allowed, "remaining": int(d.remaining), "limit": d.limit,
           "retry_after_ms": 0 if d.allowed else max(1, math.ceil(d.retry_after_s * 1000)), "request_id": request_id}
    if d.reason:
        doc["reason"] = d.reason
    return orjson.dumps(doc), _rate_headers(node, d, request_id)


async def invoke(node: Node, request: web.BaseRequest) -> web.Response:
    """A skill call.  With ``Expect: 100-continue`` (the router's commit protocol, :mod:`edge_server.commit`)
    the node answers ``100 Continue`` first and decides only once the body came, so a try the router sent
    elsewhere instead spent no token here and called no skill.  Any caller: a request whose connection
    closed is dropped before the decision and before the skill call (``edge_invoke_dropped_total``)."""
    expect = request.headers.get("Expect")
    if expect is not None:
        if expect.lower() != "100-continue":
            raise ApiError(417, "expectation_failed", "Expect must be 100-continue", "Expect")
        if not await send_continue(request):
            raise _dropped(node, "uncommitted")
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        raise ApiError(401, "unauthorized", "Authorization: Bearer <api-key> is required", "Authorization",
                       headers={"WWW-Authenticate": "Bearer"})
    tenant = node.config.api_keys.get(auth[7:].strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key", "Authorization",
                       headers={"WWW-Authenticate": "Bearer"})
    skill = _skill_of(request.raw_path)
    if skill != node.skill.name:
        raise ApiError(404, "unknown_skill", f"no skill named {skill!r}", "skill")
    try:
        body = await (_committed_body(request, node) if expect is not None else json_body(request, node))
    except ApiError:
        if client_gone(request):  # the body, or the rest of it, never came
            raise _dropped(node, "uncommitted" if expect is not None else "before_decision") from None
        raise
    cost = parse_cost(body, node)
    request_id = request.headers.get("X-Request-Id", "")[:128] or node.new_request_id()
    if node.table is None and node.strict is None:
        raise STARTING
    if client_gone(request):
        raise _dropped(node, "before_decision")
    try:
        d, written = node.decide(tenant, cost, request_id)
        if written is not None and (revoked := await written) is not None:
            d = revoked
    except DECISION_ERRORS as exc:
        raise _decision_error(exc, cost, node) from None
    headers = _rate_headers(node, d, request_id)
    if not d.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(d.retry_after_s)))
        if d.reason == LEASE_ENDED:
            raise ApiError(429, LEASE_ENDED, f"the lease behind this grant ended before the answer could leave "
                           f"(the node was paused); its tokens are spent (request_id {request_id}); retry after "
                           f"{d.retry_after_s * 1000:.0f} ms", headers=headers)
        raise ApiError(429, "rate_limited", f"tenant {tenant!r} is over its limit; retry after "
                       f"{d.retry_after_s * 1000:.0f} ms", headers=headers)
    if client_gone(request):  # the tokens are spent and audited, the skill is not called
        raise _dropped(node, "before_skill")
    called = time.perf_counter()
    result: Any = None
    try:
        result = await node.skill.invoke(body)
    except SkillError as exc:
        node.metrics.skill_errors.inc()
        raise ApiError(502, "skill_failed", f"{exc} (tokens were spent and audited; request_id "
                       f"{request_id})", headers=headers) from None
    finally:
        if client_gone(request):
            # The caller (the router, after its request timeout) left while the skill ran: its 504 is
            # traced here by request id, with how long the skill call took on our clock and, for the
            # simulated skill, the latency it drew (a gap between them is our own loop's lateness).
            node.metrics.skill_calls_client_gone.inc()
            drawn = result.get("latency_ms") if isinstance(result, dict) else None
            log.warning("skill call outlived its caller", extra={
                "request_id": request_id, "tenant": tenant, "skill_s": round(time.perf_counter() - called, 3),
                "skill_drawn_ms": drawn})
    return web.Response(body=orjson.dumps({"result": result, "request_id": request_id, "tenant": tenant,
                                           "node": node.spec.id, "region": node.spec.region}), headers=headers)


async def _committed_body(request: web.BaseRequest, node: Node) -> dict[str, Any]:
    """The body after a ``100 Continue``: the router sends it only to the try it chose, so one that
    does not come (the connection closes, or nothing within ``header_timeout_ms``) is a try the router
    gave to another region or gave up: dropped, nothing decided."""
    try:
        async with asyncio.timeout(node.config.server.header_timeout_ms / 1000):
            return await json_body(request, node)
    except TimeoutError:
        raise _dropped(node, "uncommitted") from None


def _dropped(node: Node, stage: str) -> ApiError:
    """A request whose caller is gone: counted, answered 499 to nobody (nginx's "client closed request")."""
    node.metrics.invoke_dropped.labels(stage).inc()
    return ApiError(499, "client_gone", f"the caller closed the connection ({stage}); the skill was not called")


async def metrics(node: Node, request: web.BaseRequest) -> web.Response:
    return web.Response(body=node.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


async def state(node: Node, request: web.BaseRequest) -> web.Response:
    if node.strict is not None:  # strict mode: rights, lease and incarnation (and the spend, as in eventual)
        wanted = request.query.get("keys")
        return web.json_response({"node": node.spec.id, "region": node.spec.region, "time": time.time(),
                                  "boot": node.boot, "mode": "strict", "audit_last_seq": node.audit.last_seq,
                                  "audit_total_cost": node.audit.total_cost, "strict": node.strict.state(),
                                  "keys": node.strict.spend_views([k for k in wanted.split(",") if k]
                                                                  if wanted else None)})
    table = node.table
    if table is None:
        raise ApiError(503, "starting", "the node is still recovering its audit trail")
    now = time.time()
    wanted = request.query.get("keys")
    keys = [k for k in wanted.split(",") if k] if wanted else None
    return web.json_response({
        "node": node.spec.id, "region": node.spec.region, "time": now, "boot": node.boot,
        "change_seq": table.change_seq, "live_peers": sorted(table.live_peers()),
        "key_count": table.key_count(), "audit_last_seq": node.audit.last_seq,
        "audit_total_cost": node.audit.total_cost, "audit_segments": node.audit.segment_count,
        "audit_unsealed": node.audit.unsealed, "audit_replicas": node.replicas.status(),
        "audit_replication": node.replicator.status(now) if node.replicator is not None else None,
        "keys": table.snapshot(now, keys),
    })


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("POST", "/v1/limits/check", limits_check),
    ("POST", INVOKE_PREFIX + "{skill}" + INVOKE_SUFFIX, invoke),
    ("GET", "/metrics", metrics),
    ("GET", "/v1/state", state),
    ("GET", "/v1/audit", audit),
    ("POST", "/v1/audit/replica", audit_replica),
    ("GET", "/v1/audit/replica", audit_replica_read),
    ("GET", "/v1/audit/replica/held", audit_replica_held),
    ("POST", "/v1/gossip", gossip),
    ("POST", "/v1/strict", strict_messages),
]


def _shed(reason: str, message: str) -> ApiError:
    return ApiError(503, "overloaded", message, headers={"Retry-After": "1", "Retry-After-Ms": "100",
                                                        SHED_HEADER: reason})


_SHED_MESSAGE = "too many requests in flight"


def _early_shed(edge: EdgeServer) -> EarlyShed:
    """The guard's hook that sheds a gated request from its raw bytes (:mod:`edge_server.early_shed`) with
    the same 503 as the gate's path in :meth:`EdgeServer.__call__`."""

    def route_of(path: bytes) -> str | None:
        p = path.partition(b"?")[0].decode("latin-1")
        if p == "/v1/limits/check":
            return p
        return INVOKE_PREFIX + "{skill}" + INVOKE_SUFFIX if _skill_of(p) is not None else None

    def answer(reason: str) -> bytes:
        return shed_answer("overloaded", _SHED_MESSAGE, reason, edge.ident)

    return EarlyShed(edge.gate, route_of, answer, lambda route: edge.node.metrics.observe(route, 503, 0.0))


def _fast_check(edge: EdgeServer) -> FastCheck | None:
    """The guard's hook that serves a plain check from its raw bytes (:mod:`edge_server.fast_check`) with
    the handler's own decision call, answer and error words; None if this aiohttp does not allow it."""
    if not FastCheck.supported():
        return None
    node = edge.node

    def ready() -> bool:  # the handler's path while the node starts, and until it started the adaptive limit
        return (node.table is not None or node.strict is not None) and (
            edge.adaptive is None or edge._adaptive_task is not None)

    return FastCheck(node, edge.gate, lambda d, rid: check_answer(node, d, rid),
                     lambda exc, cost: _decision_error(exc, cost, node), ready)


class _GuardedServer(web.Server):
    """aiohttp's low-level server whose connections go through a :class:`ConnectionGuard`."""

    guard: ConnectionGuard

    def __call__(self) -> Any:
        return self.guard()


def build_server(node: Node) -> web.Server:
    """The node's HTTP server (run it with ``web.ServerRunner``): admission gate, slow-client guard."""
    edge = EdgeServer(node, ROUTES)
    server = _GuardedServer(edge, access_log=None)
    sv = node.config.server
    server.guard = edge.guard = ConnectionGuard(lambda: web.Server.__call__(server), sv.header_timeout_ms / 1000,
                                                sv.max_connections, early=_early_shed(edge),
                                                fast=_fast_check(edge) if sv.fast_check else None)
    node.metrics.registry.register(OverloadCollector("edge", lambda: (edge.gate, edge.guard), edge.adaptive))
    return server
