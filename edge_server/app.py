"""The HTTP face of a node: parse, validate, ask :class:`Node`, answer in JSON.

Every error is ``{"error": {"code", "message", "field"}}`` with a 4xx status (5xx only for a failed
skill, a full key table or an unwritable audit trail) -- never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from edge_server.audit import AuditUnavailable
from edge_server.node import Node
from edge_server.skill import SkillError
from edge_server.token_bucket import CostExceedsBurst, Decision, KeyTableFull, NoLimitForKey
from edge_server.wire import SIGNATURE_HEADER, WireError, decode_delta, encode_ack

__all__ = ["NODE", "ApiError", "build_app"]

log = logging.getLogger("edge_server.app")

NODE: web.AppKey[Node] = web.AppKey("node", Node)
MAX_GOSSIP_BYTES = 32 * 1024 * 1024
JSON = "application/json"


class ApiError(Exception):
    """An error answered as JSON; ``field`` names the offending input when there is one."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message, "field": field}})
    return _json_bytes(body, status, headers)


def _json_bytes(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response from ready bytes (faster than ``web.json_response``: no charset parsing)."""
    out = {"Content-Type": "application/json"}
    if headers:
        out.update(headers)
    return web.Response(status=status, body=body, headers=out)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


def _middleware(node: Node) -> Callable:
    metrics = node.metrics
    ident = {"X-Edge-Node": node.spec.id, "X-Edge-Region": node.spec.region}

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        started = time.perf_counter()
        node.inflight += 1
        try:
            response = await handler(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)
        except web.HTTPException as exc:
            code = _HTTP_CODES.get(exc.status, "http_error")
            message = "no such route" if exc.status == 404 else exc.reason
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = error_response(exc.status, code, f"{message}: {request.method} {request.path}", headers=allow)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception:  # a bug: answer JSON, keep serving, log the traceback
            log.exception("unhandled error", extra={"path": request.path})
            response = error_response(500, "internal", "internal error")
        finally:
            node.inflight -= 1
        response.headers.update(ident)
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        metrics.observe(name, response.status, time.perf_counter() - started)
        return response

    return middleware


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes if longer (so the caller can tell it is too large).

    ``StreamReader.read(n)`` returns whatever has arrived, up to ``n``: a body that comes in several
    pieces (chunked, or simply large) must be read until EOF.
    """
    if request.content_length is not None:  # the common case: one read of exactly that many bytes
        return await request.read()
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _lenient_json(raw: bytes) -> Any:
    """The slow path for what the fast parser refuses but the standard one reads (NaN, 10**40, a lone
    surrogate), so that the error names the field instead of blaming the whole body."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON ({exc.__class__.__name__})") from None
    except RecursionError:  # a small body can nest deeper than the parser's stack allows
        raise ApiError(400, "invalid_json", "body is nested too deeply") from None


async def _json_body(request: web.Request, node: Node) -> dict[str, Any]:
    """The request's JSON object, or an :class:`ApiError` naming what is wrong with it."""
    limit = node.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"body is {request.content_length} bytes; the limit is {limit}")
    if request.content_type != JSON:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type must be {JSON}, got {request.content_type or 'none'}")
    raw = await _read_body(request, limit)
    if len(raw) > limit:
        raise ApiError(413, "body_too_large", f"body is over the limit of {limit} bytes")
    if not raw:
        raise ApiError(400, "invalid_json", "body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = _lenient_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "body must be a JSON object")
    return body


def _cost(body: dict[str, Any], node: Node) -> int:
    cost = body.get("cost", 1)
    if isinstance(cost, bool) or not isinstance(cost, int | float):
        raise ApiError(400, "invalid_field", "cost must be an integer >= 1", "cost")
    if isinstance(cost, float):
        if not cost.is_integer():
            raise ApiError(400, "invalid_field", "cost must be a whole number", "cost")
        cost = int(cost)
    if cost < 1:
        raise ApiError(400, "invalid_field", "cost must be >= 1", "cost")
    if cost > node.config.server.max_cost:
        raise ApiError(400, "invalid_field", f"cost must be <= {node.config.server.max_cost}", "cost")
    return cost


def _check_key(key: Any, node: Node) -> str:
    if not isinstance(key, str):
        raise ApiError(400, "invalid_field", "key must be a string", "key")
    if not key:
        raise ApiError(400, "invalid_field", "key must not be empty", "key")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:  # JSON can carry a lone surrogate ("\\ud800"), which is not text
        raise ApiError(400, "invalid_field", "key must be valid Unicode text", "key") from None
    if size > node.config.server.max_key_bytes:
        raise ApiError(400, "invalid_field", f"key is longer than {node.config.server.max_key_bytes} bytes", "key")
    return key


def _rate_headers(decision: Decision, request_id: str) -> dict[str, str]:
    reset = max(0, math.ceil(decision.retry_after_s)) if not decision.allowed else 0
    return {
        "RateLimit-Limit": str(int(decision.limit)),
        "RateLimit-Remaining": str(int(decision.remaining)),
        "RateLimit-Reset": str(reset),
        "X-Request-Id": request_id,
        **({} if decision.allowed else {"Retry-After-Ms": str(max(1, math.ceil(decision.retry_after_s * 1000)))}),
    }


async def _decide(node: Node, key: str, cost: int, request_id: str):
    if node.table is None:
        raise ApiError(503, "starting", "the node is still recovering its audit trail",
                       headers={"Retry-After": "1"})
    try:
        return await node.decide(key, cost, request_id)
    except NoLimitForKey:
        raise ApiError(400, "no_limit", "no configured limit matches this key", "key") from None
    except CostExceedsBurst as exc:
        raise ApiError(400, "invalid_field", f"cost {cost} exceeds the burst {exc.burst:g} of this key; "
                       "it could never be allowed", "cost") from None
    except KeyTableFull:
        node.metrics.key_table_full.inc()
        raise ApiError(503, "key_table_full", "the node holds its maximum of live keys; retry later",
                       headers={"Retry-After": "1"}) from None
    except AuditUnavailable as exc:
        raise ApiError(503, "audit_unavailable", str(exc), headers={"Retry-After": "1"}) from None


# ------------------------------------------------------------------------------------ handlers

async def healthz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response({"status": "ok", "node": node.spec.id, "region": node.spec.region,
                              "mode": node.config.mode})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    ready, reason = node.readiness()
    body = {"ready": ready, "reason": reason, "node": node.spec.id, "region": node.spec.region}
    return web.json_response(body, status=200 if ready else 503)


async def limits_check(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = await _json_body(request, node)
    if "key" not in body:
        raise ApiError(400, "missing_field", "key is required", "key")
    key = _check_key(body["key"], node)
    cost = _cost(body, node)
    request_id = request.headers.get("X-Request-Id", "")[:128] or node.new_request_id()
    outcome = await _decide(node, key, cost, request_id)
    d = outcome.decision
    return _json_bytes(orjson.dumps(
        {"allowed": d.allowed, "remaining": int(d.remaining), "limit": d.limit,
         "retry_after_ms": 0 if d.allowed else max(1, math.ceil(d.retry_after_s * 1000)),
         "request_id": request_id}), headers=_rate_headers(d, request_id))


async def invoke(request: web.Request) -> web.Response:
    node = request.app[NODE]
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        raise ApiError(401, "unauthorized", "Authorization: Bearer <api-key> is required", "Authorization",
                       headers={"WWW-Authenticate": "Bearer"})
    tenant = node.config.api_keys.get(auth[7:].strip())
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key", "Authorization",
                       headers={"WWW-Authenticate": "Bearer"})
    skill = request.match_info["skill"]
    if skill != node.skill.name:
        raise ApiError(404, "unknown_skill", f"no skill named {skill!r}", "skill")
    body = await _json_body(request, node)
    cost = _cost(body, node)
    if node.inflight > node.config.server.max_inflight:
        raise ApiError(503, "overloaded", "too many requests in flight", headers={"Retry-After": "1"})
    request_id = request.headers.get("X-Request-Id", "")[:128] or node.new_request_id()
    outcome = await _decide(node, tenant, cost, request_id)
    d = outcome.decision
    headers = _rate_headers(d, request_id)
    if not d.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(d.retry_after_s)))
        raise ApiError(429, "rate_limited", f"tenant {tenant!r} is over its limit; retry after "
                       f"{d.retry_after_s * 1000:.0f} ms", headers=headers)
    try:
        result = await node.skill.invoke(body)
    except SkillError as exc:
        node.metrics.skill_errors.inc()
        raise ApiError(502, "skill_failed", f"{exc} (tokens were spent and audited; request_id "
                       f"{request_id})", headers=headers) from None
    return _json_bytes(orjson.dumps({"result": result, "request_id": request_id, "tenant": tenant,
                                     "node": node.spec.id, "region": node.spec.region}), headers=headers)


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.Response(body=node.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


def _int_param(request: web.Request, name: str, default: int, maximum: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_query", f"{name} must be an integer", name) from None
    if value < 0:
        raise ApiError(400, "invalid_query", f"{name} must be >= 0", name)
    return min(value, maximum) if maximum is not None else value


async def state(request: web.Request) -> web.Response:
    node = request.app[NODE]
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
        "audit_total_cost": node.audit.total_cost, "keys": table.snapshot(now, keys),
    })


async def audit(request: web.Request) -> web.Response:
    node = request.app[NODE]
    after = _int_param(request, "after", 0)
    limit = _int_param(request, "limit", 1000, maximum=10_000)
    events = node.audit.read(after, limit)
    return web.json_response({"node": node.spec.id, "region": node.spec.region, "events": events,
                              "next": events[-1]["seq"] if events else after,
                              "last_seq": node.audit.last_seq})


async def gossip(request: web.Request) -> web.Response:
    node = request.app[NODE]
    if node.table is None:
        raise ApiError(503, "starting", "the node is still recovering its audit trail")
    m = node.metrics
    raw = await _read_body(request, MAX_GOSSIP_BYTES)
    try:
        if len(raw) > MAX_GOSSIP_BYTES:
            raise WireError("too_large", "gossip body too large", 413)
        delta = decode_delta(node.config.secret, raw, request.headers.get(SIGNATURE_HEADER),
                             max_key_bytes=node.config.server.max_key_bytes, known_nodes=node.node_ids)
        now = time.time()
        node.replay.check(delta, now)
    except WireError as exc:
        m.gossip_refused.labels(exc.reason).inc()
        m.gossip_messages.labels("received", "refused").inc()
        log.warning("gossip refused", extra={"reason": exc.reason, "detail": str(exc),
                                             "remote": request.remote})
        raise ApiError(exc.status, f"gossip_{exc.reason}", str(exc)) from None
    table = node.table
    assert table is not None
    if table.on_peer_boot(delta.sender, delta.boot, now):
        log.info("peer restarted", extra={"peer": delta.sender})
    table.merge(delta.sender, delta.entries, now)
    m.gossip_messages.labels("received", "ok").inc()
    m.gossip_bytes.labels("received").inc(len(raw))
    body, signature = encode_ack(node.config.secret, node.spec.id, node.boot, delta.upto)
    return web.Response(body=body, content_type=JSON, headers={SIGNATURE_HEADER: signature})


def build_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[_middleware(node)], client_max_size=MAX_GOSSIP_BYTES + 1024)
    app[NODE] = node
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/v1/limits/check", limits_check)
    app.router.add_post("/v1/skills/{skill}/invoke", invoke)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/state", state)
    app.router.add_get("/v1/audit", audit)
    app.router.add_post("/v1/gossip", gossip)
    return app
