"""A listening socket that accepts every pending connection at once, not one per loop iteration.

Why: uvloop (libuv) accepts one connection per turn of the event loop.  Under load a turn of the
router's loop takes 100-250 ms (thousands of sockets ready, every skill answer relayed), so it took
in four to ten new connections a second while clients opened hundreds: measured in
``benchmarks/bench_overload.py`` at 2x capacity, the router's accept queue stood at 600-4,096
connections for seconds (``ss -ltn``), ``strace`` counted 7 ``accept4`` calls in one second, the
kernel dropped SYNs once the queue was full, and the requests on those connections were answered
7-15 s after they were sent -- before any admission gate or deadline of ours could see them.  A
shed is only quick once the request has been read.  (asyncio's own loop accepts up to ``backlog``
connections per turn; uvloop does not.)

:class:`Listener` owns a non-blocking listening socket and a reader callback that accepts up to
``batch`` connections per readiness event; each one is handed to the loop with
``connect_accepted_socket`` (uvloop and asyncio both have it), so the protocol and transport are the
loop's usual ones.  When the process is out of file descriptors (``EMFILE``) it stops accepting for
``RETRY_S`` instead of spinning on a listener that stays readable.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["BATCH", "RETRY_S", "Listener"]

BATCH = 1024  # connections accepted per readiness event at most (the loop's other work still runs)
RETRY_S = 0.1  # out of file descriptors or memory: accept again after this long
_RESOURCE = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Listener:
    """``await Listener.start(factory, host, port, backlog=...)``; :meth:`close` stops accepting.

    ``accepted`` counts connections taken in, ``accept_calls`` the reader callbacks that took at least
    one (their ratio says how many were waiting per turn of the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Callable[[], Any],
                 batch: int = BATCH) -> None:
        self.loop, self.sock, self.factory, self.batch = loop, sock, factory, batch
        self.sockets = [sock]
        self.accepted = 0
        self.accept_calls = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def start(cls, factory: Callable[[], Any], host: str, port: int, *, backlog: int = 4096,
                    batch: int = BATCH) -> Listener:
        """Bind ``host:port`` (``SO_REUSEADDR``, as ``create_server(reuse_address=True)``) and listen."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return cls(loop, sock, factory, batch)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _on_readable(self) -> None:
        took = 0
        while took < self.batch:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue  # the client gave up while queued: nothing to do
            except OSError as exc:
                if exc.errno in _RESOURCE and not self._closed:
                    self.loop.remove_reader(self.sock.fileno())
                    self._retry = self.loop.call_later(RETRY_S, self._resume)
                break
            took += 1
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))
            self._tasks.add(task)
            task.add_done_callback(self._connected)
        if took:
            self.accepted += took
            self.accept_calls += 1

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a connection that failed to set up is just gone

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections already taken in stay open)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
