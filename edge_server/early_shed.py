"""Quick 503s from the raw bytes: a request the admission gate would refuse is answered before aiohttp
parses it.

Past capacity most requests are sheds (nine in ten at 10x), and the CPU a shed costs is taken from the
requests being served on the same cores.  Through aiohttp a shed costs a parsed request, a handler
task, a response object and its serialisation: ~50 µs of the router's CPU (``benchmarks/bench_shed.py``),
about what forwarding a check costs.  :class:`EarlyShed` is called by the connection guard
(:mod:`edge_server.conn_guard`) with the first chunk of a new request on a connection that is not
serving one; when the gate has no slot and would not queue (:meth:`edge_server.admission.Gate.refusal`)
and the chunk is exactly one complete, plain request on a gated route, it returns the whole 503 answer as
bytes, written straight to the socket.  Anything else goes to aiohttp untouched, which then sheds or
serves as before: a partial or pipelined chunk, a chunked or ``Expect`` body, ``Connection: close``,
HTTP/1.0, a path that is not gated.  The answer is the same as aiohttp's path would give (status,
JSON error, ``Retry-After``, ``X-Edge-Shed``), the shed is counted in the gate like any other.

The check costs nothing while a slot is free (two integer comparisons), so a server that is not
overloaded never parses anything twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from edge_server.admission import Gate

__all__ = ["EarlyShed", "shed_answer"]

_END = b"\r\n\r\n"
_PLAIN_BODY_ONLY = (b"\r\ntransfer-encoding:", b"\r\nexpect:", b"\r\nconnection: close", b"\r\nconnection:close")
_LENGTH = b"\r\ncontent-length:"


def shed_answer(code: str, message: str, reason: str, headers: Mapping[str, str]) -> bytes:
    """A complete HTTP/1.1 503 answer (kept alive) with the edge's error body and shed headers."""
    body = json.dumps({"error": {"code": code, "message": message, "field": None}}).encode()
    lines = ["HTTP/1.1 503 Service Unavailable", "Content-Type: application/json; charset=utf-8",
             f"Content-Length: {len(body)}", "Retry-After: 1", "Retry-After-Ms: 100", f"X-Edge-Shed: {reason}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class EarlyShed:
    """``early(chunk) -> bytes | None``: the 503 to write for ``chunk``, or None to hand it to aiohttp.

    ``route_of(path)`` names the gated route of a raw path (query included), None when the path is not
    gated; ``answer(reason)`` is the 503 for a shed reason (cached per reason by the caller or here);
    ``on_shed(route)`` counts the shed in the server's request metrics.
    """

    __slots__ = ("_answers", "answer", "gate", "on_shed", "route_of", "taken")

    def __init__(self, gate: Gate, route_of: Callable[[bytes], str | None], answer: Callable[[str], bytes],
                 on_shed: Callable[[str], None]) -> None:
        self.gate, self.route_of, self.answer, self.on_shed = gate, route_of, answer, on_shed
        self._answers: dict[str, bytes] = {}
        self.taken = 0  # requests answered here (also counted in the gate's sheds)

    def __call__(self, data: bytes) -> bytes | None:
        gate = self.gate
        if gate.inflight < gate.limit and not gate.queued:
            return None  # a slot is free: the normal path takes it
        reason = gate.refusal()
        if reason is None:
            return None  # it may queue: the normal path waits
        end = data.find(_END)
        line_end = data.find(b"\r\n")
        if end < 0 or line_end <= 0:
            return None
        parts = data[:line_end].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return None
        route = self.route_of(parts[1])
        if route is None:
            return None
        head = data[line_end:end + 2].lower()
        for marker in _PLAIN_BODY_ONLY:
            if marker in head:
                return None
        length = 0
        at = head.find(_LENGTH)
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            value = head[at + len(_LENGTH):stop].strip()
            if not value.isdigit():
                return None
            length = int(value)
        if end + 4 + length != len(data):
            return None  # not exactly one whole request (body still coming, or pipelined)
        gate.refuse(reason)
        self.taken += 1
        self.on_shed(route)
        answer = self._answers.get(reason)
        if answer is None:
            answer = self._answers[reason] = self.answer(reason)
        return answer
