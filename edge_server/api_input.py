"""What a request to a node carries, read and checked: its body, its JSON object, its key and cost.

Every refusal is an :class:`ApiError` naming the field (a 4xx JSON body), never a traceback; the
common case (a small body that came with its headers) is read without another coroutine.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from edge_server.node import Node

__all__ = ["JSON", "ApiError", "arrived_json_body", "check_key", "error_response", "int_param", "json_body",
           "json_bytes", "json_object", "parse_cost", "read_body", "read_body_bytes"]

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
    return json_bytes(body, status, headers)


def json_bytes(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response from ready bytes (faster than ``web.json_response``: no charset parsing)."""
    out = {"Content-Type": "application/json"}
    if headers:
        out.update(headers)
    return web.Response(status=status, body=body, headers=out)


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes if longer (so the caller can tell it is too large).

    A body that stops short, breaks its chunked framing or loses its connection is a 400 (the
    client is often gone; nothing was granted), never an unhandled error.
    """
    try:
        return await read_body_bytes(request, limit)
    except asyncio.IncompleteReadError as exc:
        short = exc.expected - len(exc.partial)
        raise ApiError(400, "incomplete_body", f"body ended {short} bytes short of its Content-Length") from None
    except (ConnectionError, HttpProcessingError) as exc:
        raise ApiError(400, "incomplete_body", f"body could not be read: {exc}") from None


async def read_body_bytes(request: web.BaseRequest, limit: int) -> bytes:
    length = request.content_length
    if length == 0:
        return b""
    content = request.content
    if length is not None and length <= limit:  # the common case: a body of a known, allowed size
        # Usually the whole body came in the same packet as the headers: take it without another
        # coroutine and wait only for what has not arrived.
        head = content.read_nowait(length)
        if len(head) == length:
            return head
        return head + await content.readexactly(length - len(head))
    # ``read(n)`` returns whatever has arrived, up to ``n``: a body that comes in several pieces
    # (chunked, or simply large) must be read until EOF.
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def lenient_json(raw: bytes) -> Any:
    """The slow path for what the fast parser refuses but the standard one reads (NaN, 10**40, a lone
    surrogate), so that the error names the field instead of blaming the whole body."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not valid JSON ({exc.__class__.__name__})") from None
    except RecursionError:  # a small body can nest deeper than the parser's stack allows
        raise ApiError(400, "invalid_json", "body is nested too deeply") from None


async def json_body(request: web.BaseRequest, node: Node) -> dict[str, Any]:
    """The request's JSON object, or an :class:`ApiError` naming what is wrong with it."""
    limit = node.config.server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise ApiError(413, "body_too_large", f"body is {length} bytes; the limit is {limit}")
    # The exact header is compared first: parsing it (for "; charset=utf-8") costs a few percent of
    # a whole small request.
    if request.headers.get("Content-Type") != JSON and request.content_type != JSON:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type must be {JSON}, got {request.content_type or 'none'}")
    raw = await read_body(request, limit)
    if len(raw) > limit:
        raise ApiError(413, "body_too_large", f"body is over the limit of {limit} bytes")
    return json_object(raw)


def arrived_json_body(request: web.BaseRequest, node: Node) -> dict[str, Any] | None:
    """The JSON object of a plain small request whose body has all arrived (nearly every request)
    without the two coroutines of :func:`json_body`; None when that path must decide."""
    length = request.content_length
    if not length or length > node.config.server.max_body_bytes or request.headers.get("Content-Type") != JSON:
        return None
    content = request.content
    if not content.is_eof():  # the parser has not seen the whole body yet
        return None
    try:
        raw = content.read_nowait(length)
    except (ConnectionError, HttpProcessingError) as exc:
        raise ApiError(400, "incomplete_body", f"body could not be read: {exc}") from None
    if len(raw) != length:
        raise ApiError(400, "incomplete_body", f"body ended after {len(raw)} of {length} bytes")
    return json_object(raw)


def json_object(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise ApiError(400, "invalid_json", "body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = lenient_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "body must be a JSON object")
    return body


def parse_cost(body: dict[str, Any], node: Node) -> int:
    if "cost" not in body:  # the common case: the default cost, nothing to check
        return 1
    cost = body["cost"]
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


def check_key(key: Any, node: Node) -> str:
    if not isinstance(key, str):
        raise ApiError(400, "invalid_field", "key must be a string", "key")
    if not key:
        raise ApiError(400, "invalid_field", "key must not be empty", "key")
    if key.isascii():  # one byte a character, no surrogate: no encoded copy needed to measure it
        size = len(key)
    else:
        size = text_bytes(key)
    if size > node.config.server.max_key_bytes:
        raise ApiError(400, "invalid_field", f"key is longer than {node.config.server.max_key_bytes} bytes", "key")
    return key


def text_bytes(key: str) -> int:
    """The UTF-8 size of a key that is not ASCII, or a 400 if it is not text (a lone surrogate)."""
    try:
        size = len(key.encode())
    except UnicodeEncodeError:  # JSON can carry a lone surrogate ("\\ud800"), which is not text
        raise ApiError(400, "invalid_field", "key must be valid Unicode text", "key") from None
    return size


def int_param(request: web.BaseRequest, name: str, default: int, maximum: int | None = None) -> int:
    """A query parameter that must be a whole number >= 0, capped at ``maximum`` (a 400 naming it otherwise)."""
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
