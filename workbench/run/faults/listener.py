"""A listening TCP socket whose accepting can be paused the way a blackholed address behaves.

A kernel blackhole drops the SYN: a client's ``connect`` neither succeeds nor is refused, it waits
and retransmits the SYN (after 1 s, 3 s, 7 s, ... on Linux) until the route comes back or the
client's own connect timeout fires.  A userspace proxy cannot drop a SYN, but the kernel does it
for us when a listener's accept queue is full.  So :meth:`Listener.pause`:

1. stops calling ``accept`` (the event loop no longer watches the socket),
2. shrinks the backlog to 0 with a second ``listen`` (Linux then keeps one connection queued), and
3. fills that one slot with a *plug*: a connection of our own to the listener.

From then on the kernel drops every new SYN, exactly like a blackhole, and the clients retransmit.
:meth:`Listener.resume` restores the backlog, drops the plug and accepts again; waiting clients
connect at their next SYN retransmission, as they would after a real route came back.

What still differs from the kernel's blackhole: a connection whose handshake was already queued
when the pause began (or that raced the plug into the one slot) is complete from the client's side
and waits unaccepted; established connections are the proxy's business (it stops reading them, so
the sender's kernel still ACKs into the socket buffers instead of retransmitting); and a connect to a
paused listener on loopback is never answered by an ICMP error, which is also what a blackhole does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

__all__ = ["BACKLOG", "Listener", "SocketFactory"]

BACKLOG = 4096  # the accept queue while serving (the nodes' own backlog)
_LINGER_RST = struct.pack("ii", 1, 0)

SocketFactory = Callable[[], socket.socket]  # a fresh TCP/IPv4 socket (in the caller's network namespace)


def _tcp_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


class Listener:
    """Accept connections on ``host:port`` and hand each accepted socket to ``on_accept``.

    ``on_accept`` is called on the event loop with a non-blocking connected socket; it owns it.
    ``make_socket`` creates the listening socket and the plug (a network-namespace backend passes a
    factory that creates them inside a namespace).
    """

    def __init__(self, host: str, port: int, on_accept: Callable[[socket.socket], None], *,
                 make_socket: SocketFactory | None = None) -> None:
        self.host = host
        self.requested_port = port
        self._on_accept = on_accept
        self._make_socket = make_socket or _tcp_socket
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        self._plugs: list[socket.socket] = []
        self._plug_addrs: set[tuple[str, int]] = set()
        self.dropped_plugs = 0

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else "serving" if self._serving else "paused"
        return f"<Listener {self.host}:{self.port} {state}>"

    @property
    def port(self) -> int:
        if self._sock is None:
            return self.requested_port
        return int(self._sock.getsockname()[1])

    @property
    def serving(self) -> bool:
        return self._serving

    def open(self) -> None:
        """Bind, listen and start accepting (call on the event loop)."""
        self._loop = asyncio.get_running_loop()
        sock = self._make_socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.resume()

    def pause(self) -> None:
        """Stop accepting and make the kernel drop new SYNs (see the module docstring)."""
        if self._sock is None or not self._serving:
            return
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._serving = False
        self._sock.listen(0)
        plug = self._make_socket()
        plug.setblocking(False)
        plug.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        host = self._sock.getsockname()[0]
        plug.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, self.port))
        with contextlib.suppress(OSError):
            self._plug_addrs.add(plug.getsockname()[:2])
        self._plugs.append(plug)
        if len(self._plug_addrs) > 64:  # plugs whose SYN the full queue dropped are never accepted
            self._plug_addrs.clear()

    def resume(self) -> None:
        """Accept again; connections the kernel queued meanwhile are accepted now (the plug is dropped)."""
        if self._sock is None or self._serving:
            return
        assert self._loop is not None
        self._sock.listen(BACKLOG)
        for plug in self._plugs:
            plug.close()  # RST: a plug still connecting stops retransmitting its SYN
        self._plugs.clear()
        self._serving = True
        self._loop.add_reader(self._sock.fileno(), self._accept_ready)
        self._accept_ready()  # what queued while paused

    def close(self) -> None:
        if self._sock is None:
            return
        if self._serving and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._serving = False
        for plug in self._plugs:
            plug.close()
        self._plugs.clear()
        self._sock.close()
        self._sock = None

    def _accept_ready(self) -> None:
        sock = self._sock
        while sock is not None and self._serving:
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNABORTED and friends: the client gave up before we accepted
                continue
            if self._plug_addrs and addr[:2] in self._plug_addrs:
                self._plug_addrs.discard(addr[:2])
                self.dropped_plugs += 1
                conn.close()
                continue
            conn.setblocking(False)
            self._on_accept(conn)
