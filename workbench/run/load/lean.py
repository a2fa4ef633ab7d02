"""A lean HTTP/1.1 client for the load generator: a pool of keep-alive connections on asyncio protocols.

Why: on a 2-core machine that also runs the router and the nodes, every microsecond the generator
spends per request is taken from the system under test, and 13,000 req/s of offered load took more CPU
than was left (the generator lagged seconds behind its schedule).  This client writes each request as
one byte string and reads the answer with a minimal parser (status line, headers, ``Content-Length``
body).  Measured (one generator process on uvloop, 1,500 req/s to an aiohttp hello-world in another
process, a machine busy with other work): 150 µs of the generator's CPU per request against 178 µs with
the aiohttp client, about 15 % less.  Most of what is left is the socket write and the kernel's loopback
delivery that the sender pays for (cProfile: about half of the generator's time in the request
coroutine's own line, where the write is), plus the generator's records and histograms; so it does
not make one Python process cheap enough for 10x the edge's capacity here.  Since then a request is
encoded once per (headers, body) pair the generator passes again, answer headers are looked up in the
raw block instead of parsed into a dict, and (in the generator) the open loop no longer spins on sleeps
shorter than uvloop's 1 ms timer: 137 -> 75 µs of the generator's CPU per request (one process on uvloop,
2,000 req/s to the low-level hello-world, medians of 3 runs of 5 s), almost all of it from the sleeps.

What it is not: a general client.  It speaks plain HTTP/1.1 to one ``http://host:port``, reads bodies
delimited by ``Content-Length`` (what the edge always sends) or by the end of the connection, and
refuses a chunked answer (:class:`LeanProtocolError`).  It offers the one call shape the generator
uses, ``async with session.post(url, data=..., headers=...) as resp`` with ``resp.status``,
``resp.headers.get(name)`` (any case) and ``await resp.read()``, and raises the same kinds of errors:
:class:`LeanConnectError` when no connection could be opened (nothing was sent), ``TimeoutError`` when
the whole request (waiting for a connection included) took longer than the session's timeout, and
:class:`LeanDisconnectedError` when the server closed the connection before answering.

The pool: at most ``limit`` connections; a request takes the most recently used idle one, else opens a
new one while under the limit, else waits (in FIFO order) for one to be handed back.  A connection
whose request timed out or was cancelled is closed, never reused (its answer may still come).  One idle
for more than :data:`IDLE_MAX_S` is closed instead of reused: a server drops a kept-alive connection
that brings no request within its header timeout (the edge's: 5 s), and a request written just as it
does is reset before any answer -- at the start of a 5x overload step, 101 requests of the connections
warmed before the step met that (``benchmarks/results/overload-shed-split.json``).  Closing first, as
HTTP clients do with a keep-alive timeout below the server's, leaves that race to servers with a
header timeout under 4 s.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp

__all__ = ["IDLE_MAX_S", "LeanConnectError", "LeanDisconnectedError", "LeanProtocolError", "LeanSession"]

IDLE_MAX_S = 4.0  # an idle connection older than this is closed, not reused (below the edge's 5 s)

_END = b"\r\n\r\n"
ENCODED_MAX = 4096  # encoded requests kept (one per tenant and region in the generator's use)


class LeanConnectError(aiohttp.ClientError, OSError):
    """No connection could be opened: the request was never sent."""


class LeanDisconnectedError(aiohttp.ClientError):
    """The server closed the connection before its answer was complete."""


class LeanProtocolError(aiohttp.ClientError):
    """An answer this client cannot read (not HTTP/1.x, chunked, a bad Content-Length)."""


class _Headers:
    """Answer headers, looked up in the raw header block when asked (any case); nothing is split or
    decoded up front.  The generator asks for four or five of an answer's ten-odd headers, and parsing
    every line into a dict was a tenth of its CPU per request."""

    __slots__ = ("_low", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw  # b"\r\nName: value\r\n...": the block after the status line, ending in \r\n
        self._low = raw.lower()

    def get(self, name: str, default: Any = None) -> Any:
        """The first header ``name`` (surrounding blanks stripped), else ``default``."""
        at = self._low.find(b"\r\n" + name.lower().encode("latin-1") + b":")
        if at < 0:
            return default
        start = at + 3 + len(name)
        return self._raw[start:self._raw.find(b"\r\n", start)].strip().decode("latin-1")

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return str(value)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        """Every header as (lower-cased name, value), in order."""
        out = []
        for line in self._raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                out.append((name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")))
        return out


class _Conn(asyncio.Protocol):
    """One connection: at most one request at a time; the parsed answer resolves ``waiter``."""

    __slots__ = ("answered_at", "buf", "closed", "transport", "waiter")

    def __init__(self) -> None:
        self.answered_at = 0.0  # time.monotonic() when the last answer was complete in the buffer
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, _Headers, bytes, bool]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.answered_at = time.monotonic()  # idle from here until its first request

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._parse(eof=False)

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self._parse(eof=True)
            if not self.waiter.done():
                self.waiter.set_exception(LeanDisconnectedError(
                    f"server closed the connection before its answer{f' ({exc})' if exc else ''}"))

    def _parse(self, eof: bool) -> None:
        buf = self.buf
        end = buf.find(_END)
        if end < 0:
            return
        assert self.waiter is not None
        first = buf.find(b"\r\n")
        status_line = bytes(buf[:first]).split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
            self.waiter.set_exception(LeanProtocolError(f"not an HTTP/1.x status line: {bytes(buf[:first])[:80]!r}"))
            return
        headers = _Headers(bytes(buf[first:end + 2]))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.waiter.set_exception(LeanProtocolError("chunked answers are not supported"))
            return
        length = headers.get("content-length")
        start = end + 4
        if length is None:
            if not eof:
                return  # the body ends with the connection
            body, keep = bytes(buf[start:]), False
        elif not length.isdigit():
            self.waiter.set_exception(LeanProtocolError(f"bad Content-Length {length!r}"))
            return
        else:
            stop = start + int(length)
            if len(buf) < stop:
                return
            body = bytes(buf[start:stop])
            del buf[:stop]
            keep = headers.get("connection", "").lower() != "close"
        self.answered_at = time.monotonic()
        self.waiter.set_result((int(status_line[1]), headers, body, keep))


class _Response:
    """What ``async with session.post(...) as resp`` gives: status, headers, the body already read."""

    __slots__ = ("_body", "headers", "status")

    def __init__(self, status: int, headers: _Headers, body: bytes) -> None:
        self.status, self.headers, self._body = status, headers, body

    async def read(self) -> bytes:
        return self._body


class _Call:
    """The async context manager of one request (the request runs on entry)."""

    __slots__ = ("args", "session")

    def __init__(self, session: LeanSession, args: tuple[str, bytes, dict[str, str]]) -> None:
        self.session, self.args = session, args

    async def __aenter__(self) -> _Response:
        return await self.session._request(*self.args)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None


class LeanSession:
    """Keep-alive connections to the one ``host:port`` of ``base_url``; see the module docstring."""

    def __init__(self, base_url: str, limit: int, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"the lean client speaks plain http to host:port, got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode()
        self.limit, self.timeout_s = max(1, limit), timeout_s
        self._idle: list[_Conn] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self.opened = 0  # connections opened so far
        # Called per answer with (status, pool_s, wire_s, resume_s): waiting for a connection (or opening
        # one), from the write to the answer complete in this process's buffer (the server, the kernel and
        # this loop's own delay in reading it), and from there until the request's task ran again.
        self.on_phases: Callable[[int, float, float, float], None] | None = None
        self._paths: dict[str, str] = {}  # url -> its path (the generator posts to one url)
        self._encoded: dict[tuple[str, int, int], tuple[dict[str, str], bytes, bytes]] = {}

    def post(self, url: str, data: bytes, headers: dict[str, str]) -> _Call:
        path = self._paths.get(url)
        if path is None:
            path = self._paths[url] = urlsplit(url).path or "/"
        return _Call(self, (path, data, headers))

    async def _acquire(self) -> _Conn:
        while True:
            stale = time.monotonic() - IDLE_MAX_S
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and conn.answered_at >= stale:
                    return conn
                if not conn.closed and conn.transport is not None:
                    conn.transport.close()  # idle too long: the server may be dropping it right now
                self._open -= 1
            if self._open < self.limit:
                self._open += 1
                try:
                    _, conn = await asyncio.get_running_loop().create_connection(_Conn, self.host, self.port)
                except OSError as exc:
                    self._open -= 1
                    self._wake()
                    raise LeanConnectError(exc.errno, f"cannot connect to {self.host}:{self.port}: {exc}") from exc
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
                self.opened += 1
                return conn
            fut: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                conn = await fut
            except BaseException:
                if fut.done() and not fut.cancelled() and fut.result() is not None:
                    self._release(fut.result(), True)  # handed over just as we were cancelled: pass it on
                raise
            if conn is not None and not conn.closed:
                return conn
            if conn is not None:
                self._open -= 1

    def _wake(self) -> None:
        """A slot opened up (a connection closed): let the oldest waiter try to open one."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _release(self, conn: _Conn, reusable: bool) -> None:
        if reusable and not conn.closed:
            while self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(conn)
                    return
            self._idle.append(conn)
            return
        if conn.transport is not None and not conn.closed:
            conn.transport.abort()
        self._open -= 1
        self._wake()

    def _encode(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        """The request's bytes.  Kept per (path, headers, body) while the caller passes the very same
        headers and body objects again (the generator does: one of each per tenant and region), so a
        request is encoded once, not per send.  The entry holds both objects, so their ids stay theirs;
        a caller must not mutate a headers mapping it already passed."""
        key = (path, id(headers), id(body))
        hit = self._encoded.get(key)
        if hit is not None and hit[0] is headers and hit[1] is body:
            return hit[2]
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        raw = b"".join((f"POST {path} HTTP/1.1\r\n".encode(), self._host_header, head.encode("latin-1"),
                        b"Content-Length: %d\r\n\r\n" % len(body), body))
        if len(self._encoded) >= ENCODED_MAX:
            self._encoded.clear()
        self._encoded[key] = (headers, body, raw)
        return raw

    async def _request(self, path: str, body: bytes, headers: dict[str, str]) -> _Response:
        raw = self._encode(path, body, headers)
        mono = time.monotonic
        began = mono()
        async with asyncio.timeout(self.timeout_s):
            conn = await self._acquire()
            ok = False
            try:
                loop = asyncio.get_running_loop()
                conn.waiter = loop.create_future()
                conn.buf.clear()
                assert conn.transport is not None
                written = mono()
                conn.transport.write(raw)
                status, resp_headers, data, keep = await conn.waiter
                answered = conn.answered_at
                ok = keep
            finally:
                conn.waiter = None
                self._release(conn, ok)
        if self.on_phases is not None:
            self.on_phases(status, written - began, answered - written, mono() - answered)
        return _Response(status, resp_headers, data)

    async def warm(self, n: int, at_once: int = 128) -> int:
        """Open up to ``n`` connections (``at_once`` connects in flight) and keep them idle: connections
        clients already hold when the run starts.  Returns how many opened; connect errors end it early."""
        n = min(n, self.limit - self._open)
        opened: list[_Conn] = []

        async def one() -> None:
            _, conn = await asyncio.get_running_loop().create_connection(_Conn, self.host, self.port)
            opened.append(conn)

        try:
            for i in range(0, max(n, 0), at_once):
                await asyncio.gather(*(one() for _ in range(min(at_once, n - i))))
        except OSError:
            pass
        self._open += len(opened)
        self.opened += len(opened)
        self._idle.extend(opened)
        return len(opened)

    async def close(self) -> None:
        """Close every connection (requests still running fail with a disconnect)."""
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()
