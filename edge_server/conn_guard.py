"""Slow and idle clients cannot hold a server's connections: a protocol wrapper around aiohttp's.

aiohttp has no header timeout: a connection that sends nothing, or sends its headers a byte a second,
is kept until the keep-alive timeout (an hour for the low-level server).  A few thousand of them
exhaust the file descriptors and the memory of a node or of the router.  :class:`ConnectionGuard` is
the protocol factory given to ``loop.create_server`` (or returned by a ``web.Server``): each
connection's protocol is aiohttp's own handler, wrapped so that

* the request headers must be complete (``\\r\\n\\r\\n`` seen) within ``header_timeout_s`` of the
  connection opening, or of the first byte of a next request on a kept-alive connection; otherwise the
  connection is aborted and counted (``idle`` when nothing came, ``slow_headers`` when something did);
* past ``max_connections`` open connections, the one waiting longest for its headers (else the oldest
  idle kept-alive one) is closed to make room (``evicted``); when every connection is busy serving a
  request, the new one is closed at once (``over_capacity``).

A connection is "busy" from its headers' end until its handler finishes (the server calls
:meth:`ConnectionGuard.done` with the request's transport), so a slow skill call is never cut.

The guard also sees every new request's first bytes before aiohttp does: with an ``early`` hook
(:class:`edge_server.early_shed.EarlyShed`) a request the admission gate would refuse anyway is answered
503 from those bytes and never reaches aiohttp (the cheapest shed there is), unless aiohttp still has
a pipelined request of that connection queued or running, whose answer must go first; with a ``fast`` hook
(:class:`edge_server.fast_check.FastCheck`) a plain check is served from them.  For the fast hook the
guard keeps answers in order: it holds a connection's bytes while a fast answer is pending, and tracks
(``unparsed``) whether aiohttp's parser may hold part of a request, in which case the bytes go to aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from edge_server.fast_check import MAX_UNPARSED, aiohttp_idle, aiohttp_quiet, frame

__all__ = ["ConnectionGuard", "GuardedProtocol"]

_END = b"\r\n\r\n"


class GuardedProtocol(asyncio.Protocol):
    """Forwards every event to the wrapped aiohttp handler; tracks the header deadline."""

    __slots__ = ("busy", "guard", "held", "inner", "tail", "timer", "transport", "unparsed")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.tail = b""  # the last bytes seen while waiting for headers (the end may span two reads)
        self.held: list[bytes] | None = None  # bytes that came while a fast answer was pending
        # The bytes given to aiohttp past their last whole request (b"": its parser holds nothing), or
        # None once they could not be framed: then this connection's requests all go to aiohttp.
        self.unparsed: bytes | None = b""

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.guard._opened(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        held = self.held
        if held is not None:  # a fast answer is pending: these bytes wait for it (answers keep their order)
            held.append(data)
            return
        if not self.busy:
            early = self.guard.early
            if early is not None and not self.tail and aiohttp_quiet(self.inner):
                answer = early(data)
                if answer is not None:  # a whole request, shed: aiohttp never sees it
                    self._disarm()
                    self.guard._waiting.pop(self, None)
                    assert self.transport is not None
                    self.transport.write(answer)
                    return
            fast = self.guard.fast
            if fast is not None:
                if not self.unparsed and self.unparsed is not None and aiohttp_idle(self.inner) and fast(self, data):
                    if self.timer is not None:
                        self._disarm()
                        self.guard._waiting.pop(self, None)
                    return
                self._mirror(data)
            seen = self.tail + data
            if _END in seen:
                self.busy = True
                self.tail = b""
                if self.timer is not None:  # armed (a new connection, or headers in pieces): nearly never
                    self._disarm()
                    self.guard._waiting.pop(self, None)
            else:
                self.tail = seen[-3:]
                if self.timer is None:
                    self._arm()
        elif self.guard.fast is not None:
            self._mirror(data)
        self.inner.data_received(data)

    def _mirror(self, data: bytes) -> None:
        """Follow where aiohttp's parser is in this connection's bytes (off the hot path)."""
        unparsed = self.unparsed
        if unparsed is None:
            return
        buf = unparsed + data if unparsed else data
        at = frame(buf)
        self.unparsed = None if at < 0 or len(buf) - at > MAX_UNPARSED else buf[at:]

    def answered(self) -> None:
        """The pending fast answer is written: what came meanwhile is served now, in order."""
        self.busy = False
        held, self.held = self.held, None
        if held and self.transport is not None and not self.transport.is_closing():
            self.data_received(b"".join(held))

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.held = None
        self._disarm()
        self.guard._closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- the guard's side
    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.guard.header_timeout_s, self._late)
        self.guard._waiting[self] = None

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _late(self) -> None:
        self.timer = None
        self.guard._abort(self, "slow_headers" if self.tail else "idle")

    def idle(self) -> None:
        """The request on this connection is answered: the next one starts a new header deadline."""
        self.busy = False


class ConnectionGuard:
    """Protocol factory wrapping ``make_protocol()``; ``closed`` counts aborted connections by reason."""

    def __init__(self, make_protocol: Callable[[], Any], header_timeout_s: float, max_connections: int,
                 on_close: Callable[[str], None] | None = None,
                 early: Callable[[bytes], bytes | None] | None = None,
                 fast: Callable[[GuardedProtocol, bytes], bool] | None = None) -> None:
        self.make_protocol = make_protocol
        self.early = early  # a new request's first chunk -> the answer to write instead of serving it, or None
        self.fast = fast  # (connection, a new request's first chunk) -> True when it serves it
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.on_close = on_close
        self.open: dict[GuardedProtocol, None] = {}  # insertion order = age
        self._waiting: dict[GuardedProtocol, None] = {}  # waiting for headers, oldest first
        self._by_transport: dict[Any, GuardedProtocol] = {}
        self.closed = {"idle": 0, "slow_headers": 0, "evicted": 0, "over_capacity": 0}

    def __repr__(self) -> str:
        return f"<ConnectionGuard open={len(self.open)}/{self.max_connections} closed={self.closed}>"

    def __call__(self) -> GuardedProtocol:
        return GuardedProtocol(self, self.make_protocol())

    def done(self, transport: Any) -> None:
        """Called by the server when a request's handler returned (its transport identifies it)."""
        proto = self._by_transport.get(transport)
        if proto is not None:
            proto.idle()

    def _opened(self, proto: GuardedProtocol) -> None:
        if len(self.open) >= self.max_connections:
            victim = next(iter(self._waiting), None)
            if victim is None:
                victim = next((p for p in self.open if not p.busy), None)
            if victim is None:  # everyone is being served: this one cannot be
                self._count("over_capacity")
                assert proto.transport is not None
                proto.transport.abort()
            else:
                self._abort(victim, "evicted")
        self.open[proto] = None
        self._by_transport[proto.transport] = proto
        proto._arm()  # a new connection must send its headers in time too

    def _closed(self, proto: GuardedProtocol) -> None:
        self.open.pop(proto, None)
        self._waiting.pop(proto, None)
        self._by_transport.pop(proto.transport, None)

    def _abort(self, proto: GuardedProtocol, reason: str) -> None:
        proto._disarm()
        self._waiting.pop(proto, None)
        self._count(reason)
        if proto.transport is not None:
            proto.transport.abort()

    def _count(self, reason: str) -> None:
        self.closed[reason] += 1
        if self.on_close is not None:
            self.on_close(reason)
