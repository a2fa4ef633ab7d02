"""``POST /v1/limits/check`` answered from the raw bytes: the hot route without aiohttp's request path.

``benchmarks/bench_ceiling.py`` (wrk on one core, the server on the other) measured the check at 18,668
req/s against 40,467 for the fastest aiohttp hello-world answering GET (0.47; the goal is 0.80) and
0.65 of the same hello-world answering the same POST -- and that POST hello-world is itself only 0.72
of the GET one: a parsed request, a payload stream, a handler task, a response object and its
serialisation cost more than the whole decision.  No work inside the handler can reach the goal.

:class:`FastCheck` is called by the connection guard (:mod:`edge_server.conn_guard`) with a chunk that
arrives on a connection where aiohttp serves nothing (its handler waits for a next request, nothing
queued, no partial request buffered in its parser).  When the chunk is exactly one complete, plain
HTTP/1.1 ``POST /v1/limits/check`` -- ``Content-Length`` body all there, ``Content-Type:
application/json``, only known harmless headers, no chunked body, ``Expect``, ``Connection: close``
or HTTP/1.0 -- whose JSON body passes the handler's own checks (:func:`edge_server.api_input.check_key`,
:func:`edge_server.api_input.parse_cost`), it takes a gate slot, asks :meth:`edge_server.node.Node.decide`
(eventual and strict mode alike: the same call as the handler), waits for the audit write's future by a
callback (no task) and writes the same answer the handler gives (status, ``RateLimit-*``, request id,
identity headers, JSON body) straight to the transport, counted in the same request metrics.

Anything else goes to aiohttp untouched, which answers as before, errors included: a validation doubt
(bad JSON, a missing or invalid field), an unknown header, a query string, a decision that raises (no
limit for the key, a cost over the burst, a full key table), a full gate, a passed deadline, a node
still starting.  The decision is taken once: a raising one takes nothing, so aiohttp decides again and
words the error.  Only a failed audit write (its tokens already given back) is worded here, by the
handler's own error function.

Answers on a connection never change order: while a fast answer waits for its audit write, the guard
holds the connection's next bytes and replays them once it is written; and a connection whose bytes
aiohttp may still hold in its parser (a request split over reads, pipelined requests, a chunked body)
stays with aiohttp until the guard saw those bytes end at a request boundary (:func:`frame`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler

from edge_server.admission import Gate
from edge_server.api_input import ApiError, check_key, parse_cost
from edge_server.node import Node
from edge_server.strict_gossip import AfterWrite
from edge_server.token_bucket import Decision

__all__ = ["ROUTE", "FastCheck", "aiohttp_idle", "aiohttp_quiet", "frame", "render"]

log = logging.getLogger("edge_server.fast_check")

ROUTE = "/v1/limits/check"
_LINE = b"POST /v1/limits/check HTTP/1.1"
_END = b"\r\n\r\n"
# Headers that change nothing in the handler's answer; any other header sends the request to aiohttp.
_HARMLESS = frozenset({b"host", b"user-agent", b"accept", b"accept-encoding"})
_CONTROLS = bytes(c for c in range(32) if c != 9) + b"\x7f"
_REASONS = {200: "OK", 400: "Bad Request", 429: "Too Many Requests", 503: "Service Unavailable"}
# The private state of aiohttp's connection handler that says it serves nothing (checked at start).
_HANDLER_STATE = ("_waiter", "_messages", "_request_in_progress", "_force_close", "_close",
                  "_next_keepalive_close_time", "_keepalive_timeout", "_loop")
MAX_UNPARSED = 64 * 1024  # past this many bytes of an unfinished request, a connection stays with aiohttp


def aiohttp_idle(inner: Any) -> bool:
    """aiohttp's handler of a connection waits for a next request and has none queued or running."""
    waiter = inner._waiter
    return (waiter is not None and not waiter.done() and not inner._messages and not inner._request_in_progress
            and not inner._force_close and not inner._close)


def aiohttp_quiet(inner: Any) -> bool:
    """aiohttp's handler of a connection has no request queued or running (it may not wait yet: a new
    connection).  An answer written now cannot overtake one of aiohttp's."""
    return not getattr(inner, "_messages", None) and not getattr(inner, "_request_in_progress", False)


def frame(buf: bytes) -> int:
    """The offset just past the last whole request in ``buf`` (0: none whole yet), or -1 when the bytes
    cannot be framed as aiohttp would (chunked, an upgrade, bare line feeds, a bad length): then the
    connection's bytes stay with aiohttp for good.  Only for bytes given to aiohttp, not the hot path."""
    at = 0
    size = len(buf)
    while at < size:
        end = buf.find(_END, at)
        if end < 0:
            head = buf[at:]
            return at if head.count(b"\n") == head.count(b"\r\n") else -1
        head = buf[at:end + 2]
        if head.count(b"\n") != head.count(b"\r\n") or b"\r\n " in head or b"\r\n\t" in head:
            return -1
        low = head.lower()
        if b"\r\ntransfer-encoding:" in low or b"\r\nupgrade:" in low:
            return -1
        length = 0
        marker = low.find(b"\r\ncontent-length:")
        if marker >= 0:
            if low.find(b"\r\ncontent-length:", marker + 2) >= 0:
                return -1
            value = low[marker + 17:low.find(b"\r\n", marker + 2)].strip()
            if not value.isdigit():
                return -1
            length = int(value)
        stop = end + 4 + length
        if stop > size:
            return at
        at = stop
    return at


def render(status: int, headers: dict[str, str], body: bytes) -> bytes:
    """A kept-alive HTTP/1.1 answer, its headers in the order aiohttp's ``web.Response`` writes them."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    lines.append(f"Content-Length: {len(body)}\r\nDate: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n")
    return "\r\n".join(lines).encode("latin-1") + body


class FastCheck:
    """``fast(proto, data) -> bool``: True when the check in ``data`` is taken here (answered now or once
    its audit write is done, then ``proto.answered()``), False to hand ``data`` to aiohttp.

    ``answer(decision, request_id) -> (body, headers)`` is the handler's answer; ``error(exc, cost)`` its
    :class:`ApiError` for a failed audit write; ``ready()`` False while the handler must serve (the node
    is starting, or the adaptive limit is not running yet).
    """

    __slots__ = ("answer", "error", "gate", "node", "ready")

    def __init__(self, node: Node, gate: Gate, answer: Callable[[Decision, str], tuple[bytes, dict[str, str]]],
                 error: Callable[[BaseException, int], ApiError], ready: Callable[[], bool]) -> None:
        self.node, self.gate, self.answer, self.error, self.ready = node, gate, answer, error, ready

    @staticmethod
    def supported() -> bool:
        """aiohttp's handler still has the state :func:`aiohttp_idle` reads (else: off, and say so)."""
        slots = {s for k in RequestHandler.__mro__ for s in getattr(k, "__slots__", ())}
        missing = [a for a in _HANDLER_STATE if a not in slots]
        if missing:
            log.warning("fast check off: this aiohttp's connection handler lacks %s", ", ".join(missing))
        return not missing

    def __call__(self, proto: Any, data: bytes) -> bool:
        if not data.startswith(_LINE):
            return False
        started = time.perf_counter()
        end = data.find(_END)
        if end < 0 or data[30:32] != b"\r\n":
            return False
        head = data[32:end]
        # Text only, no control character but the line breaks and tabs: aiohttp's parser may refuse others.
        if not head.isascii() or len(head.translate(None, _CONTROLS)) + 2 * head.count(b"\r\n") != len(head):
            return False
        length = -1
        ctype = request_id = deadline = None
        seen: set[bytes] = set()
        for line in head.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                return False
            name = name.lower()
            value = value.strip(b" \t")
            if name in _HARMLESS:
                if name in seen:  # aiohttp refuses a second Host, for one
                    return False
                seen.add(name)
                continue
            if name == b"content-length":
                if length >= 0 or not value.isdigit():
                    return False
                length = int(value)
            elif name == b"content-type":
                if ctype is not None:
                    return False
                ctype = value
            elif name == b"x-request-id":
                if request_id is not None or not value.isascii():
                    return False
                request_id = value.decode()
                if not request_id.isprintable():
                    return False
            elif name == b"x-edge-deadline-ms":
                if deadline is not None:
                    return False
                deadline = value
            elif name != b"connection" or value.lower() != b"keep-alive":
                return False
        node = self.node
        if (ctype != b"application/json" or length <= 0 or length > node.config.server.max_body_bytes
                or end + 4 + length != len(data)):
            return False
        gate = self.gate
        if gate.inflight >= gate.limit or gate.queued or not self.ready():
            return False
        if deadline is not None and (not deadline.isdigit() or time.time() * 1000 > int(deadline)):
            return False
        try:
            body = orjson.loads(data[end + 4:])
            if not isinstance(body, dict) or "key" not in body:
                return False
            key = check_key(body["key"], node)
            cost = parse_cost(body, node)
        except (orjson.JSONDecodeError, ApiError):
            return False
        rid = request_id[:128] if request_id else node.new_request_id()
        gate.inflight += 1
        try:
            decision, written = node.decide(key, cost, rid)
        except Exception:  # no limit, over the burst, a full table: nothing taken; aiohttp words it
            gate.inflight -= 1
            return False
        node.metrics.hot.raw_checks += 1
        if written is None:
            self._send(proto, decision, rid, started)
            return True
        node.inflight += 1
        proto.busy = True
        proto.held = []
        future = written.write if isinstance(written, AfterWrite) else written  # strict: the lease re-check after
        future.add_done_callback(lambda f: self._written(proto, f, written, decision, rid, cost, started))
        return True

    def _written(self, proto: Any, future: Any, written: Any, decision: Decision, rid: str, cost: int,
                 started: float) -> None:
        """The audit write is done: answer (a lease that ended meanwhile turns it into a denial)."""
        self.node.inflight -= 1
        exc = future.exception() if not future.cancelled() else ApiError(503, "cancelled", "cancelled")
        if exc is None:
            if isinstance(written, AfterWrite) and (revoked := written.confirm()) is not None:
                decision = revoked
            self._send(proto, decision, rid, started)
        else:
            err = exc if isinstance(exc, ApiError) else self.error(exc, cost)
            doc = orjson.dumps({"error": {"code": err.code, "message": err.message, "field": err.field}})
            headers = {"Content-Type": "application/json", **err.headers, **self.node.ident}
            self._write(proto, render(err.status, headers, doc), err.status, started)
        proto.answered()

    def _send(self, proto: Any, decision: Decision, rid: str, started: float) -> None:
        body, headers = self.answer(decision, rid)
        self._write(proto, render(200, headers, body), 200, started)

    def _write(self, proto: Any, answer: bytes, status: int, started: float) -> None:
        self.gate.leave()
        transport = proto.transport
        if transport is not None and not transport.is_closing():
            transport.write(answer)
        inner = proto.inner  # a kept-alive connection busy here is not idle for aiohttp's keep-alive timer
        inner._next_keepalive_close_time = inner._loop.time() + inner._keepalive_timeout
        self.node.metrics.observe(ROUTE, status, time.perf_counter() - started)
