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

The one case where the gate would take a request that finds no slot is a queue that is empty: a
stalled queue (most recent waiters timed out) still takes one waiter, the probe whose outcome tells
when slots free in time again.  But a request let through meets the gate only when its handler runs,
a loop turn or two later, so every request read in this turn sees the same empty queue: at 10x
capacity whole turns' worth went through as "probes", ~42 % of the router's sheds, each then shed by
the handler at aiohttp's price.  Free slots have the same flaw: a slot is taken only when the
handler runs, so a turn that read a thousand requests with ten free slots sent all thousand on.  So
while the queue is empty *and stalled*, a turn lets through only the slots free at its start plus
about the slots expected to free before those handlers run -- the completions (:attr:`Gate.done`) of
the last two turns, at least one: the probe -- and sheds the rest here (``queue_stalled``, as the
handler would have).  A queue that is not stalled (a server that is not overloaded: no waiter ever
timed out) is not touched and costs one more comparison.  Under overload the probes queue all the
time; once no waiter has come for ``share_ttl_s`` (1 s), the overload has passed and the share is old
news: the gate's queue is marked as moving again (:meth:`Gate.unstall`) and the normal path takes over.
:attr:`EarlyShed.let_through` counts the requests let by under the budget.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping

from edge_server.admission import QUEUE_STALLED, STALLED_SHARE, Gate

__all__ = ["EarlyShed", "shed_answer"]

_END = b"\r\n\r\n"
_PLAIN_BODY_ONLY = (b"\r\ntransfer-encoding:", b"\r\nexpect:", b"\r\nconnection: close", b"\r\nconnection:close")
_LENGTH = b"\r\ncontent-length:"
STALE_TURN_S = 0.1  # completions counted over a longer gap than this say nothing about the next turn
SHARE_TTL_S = 1.0  # no waiter's outcome for this long: the queue's share is old news, the overload has passed


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
    ``on_shed(route)`` counts the shed in the server's request metrics.  Completions counted over more
    than ``stale_s`` between two turns that found the queue empty and stalled are not an estimate of
    the next turn's: that turn lets one probe through.
    """

    __slots__ = ("_answers", "_credit", "_done_mark", "_last_done", "_turn_at", "_turn_open", "answer", "gate",
                 "let_through", "on_shed", "route_of", "share_ttl_s", "stale_s", "taken")

    def __init__(self, gate: Gate, route_of: Callable[[bytes], str | None], answer: Callable[[str], bytes],
                 on_shed: Callable[[str], None], stale_s: float = STALE_TURN_S,
                 share_ttl_s: float = SHARE_TTL_S) -> None:
        self.gate, self.route_of, self.answer, self.on_shed = gate, route_of, answer, on_shed
        self.stale_s, self.share_ttl_s = stale_s, share_ttl_s
        self._answers: dict[str, bytes] = {}
        self.taken = 0  # requests answered here (also counted in the gate's sheds)
        self.let_through = 0  # requests let through while the queue was empty and stalled (see the module)
        # Per loop turn that found the queue empty and stalled: requests it may still let through, and
        # the completions counted at its start and over the turn before (the estimate of the next ones).
        self._turn_open = False
        self._turn_at = 0.0
        self._credit = 0
        self._done_mark = gate.done
        self._last_done = 0

    def _end_turn(self) -> None:
        self._turn_open = False

    def _probe_credit(self) -> bool:
        """Whether this turn may let one more request through while the queue is empty and stalled."""
        if not self._turn_open:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called outside a loop (a unit test): every request is let through
                return True
            now = loop.time()
            gate = self.gate
            done = gate.done - self._done_mark
            free = max(0, gate.limit - gate.inflight)
            stale = now - self._turn_at > self.stale_s
            if time.monotonic() - gate.outcome_at > self.share_ttl_s:
                # No waiter for a while: the overload has passed (under overload the probes queue all the
                # time), and a share that old says nothing.  The normal path takes over.
                gate.unstall()
                return True
            if stale:
                done, self._last_done = 0, 0
            self._credit = free + max(1, done + self._last_done)
            self._done_mark, self._last_done, self._turn_at = self.gate.done, done, now
            self._turn_open = True
            loop.call_soon(self._end_turn)
        if self._credit <= 0:
            return False
        self._credit -= 1
        self.let_through += 1
        return True

    def __call__(self, data: bytes) -> bytes | None:
        gate = self.gate
        if gate.inflight < gate.limit and not gate.queued:
            if gate.queue_ok >= STALLED_SHARE:
                return None  # a slot is free: the normal path takes it
            probe, reason = True, QUEUE_STALLED  # free slots, but every request of this turn sees them
        else:
            reason = gate.refusal()
            probe = False
            if reason is None:
                if gate.queued or gate.queue_ok >= STALLED_SHARE:
                    return None  # it may queue and the queue moves: the normal path waits
                probe, reason = True, QUEUE_STALLED  # an empty, stalled queue: a probe, if this turn has credit
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
        if probe and self._probe_credit():
            return None
        gate.refuse(reason)
        self.taken += 1
        self.on_shed(route)
        answer = self._answers.get(reason)
        if answer is None:
            answer = self._answers[reason] = self.answer(reason)
        return answer
