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

:meth:`Listener.refuse` is the other outage a relay must mirror: a dead target.  Connecting straight
to a killed process is refused at once (RST to the SYN); through a relay that accepted first it
would be a connection that resets after the request went out, which a client must treat as "may have
acted".  So while the target is down the listener closes its listening socket (new connects are
refused by the kernel) and a second, never-listening socket bound to the same port with
``SO_REUSEPORT`` keeps the port ours, so the listener can come back on it when the target does.

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

    Three states: serving; paused (:meth:`pause`, a blackhole: SYNs dropped); refusing (:meth:`refuse`,
    a dead target: SYNs answered with RST).  A pause wins over a refusal while both are asked for.
    ``on_accept`` is called on the event loop with a non-blocking connected socket; it owns it.
    ``make_socket`` creates every socket (a network-namespace backend creates them inside a namespace).
    """

    def __init__(self, host: str, port: int, on_accept: Callable[[socket.socket], None], *,
                 make_socket: SocketFactory | None = None) -> None:
        self.host = host
        self.requested_port = port
        self._on_accept = on_accept
        self._make_socket = make_socket or _tcp_socket
        self._port = port
        self._sock: socket.socket | None = None  # the listening socket (None while refusing)
        self._reserve: socket.socket | None = None  # bound, never listening: keeps the port while refusing
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "closed"  # closed, opening, serving, paused, refusing
        self._hold = False
        self._refuse = False
        self._plugs: list[socket.socket] = []
        self._plug_addrs: set[tuple[str, int]] = set()
        self.dropped_plugs = 0

    def __repr__(self) -> str:
        return f"<Listener {self.host}:{self.port} {self._state}>"

    @property
    def port(self) -> int:
        return self._port

    @property
    def state(self) -> str:
        return self._state

    @property
    def serving(self) -> bool:
        return self._state == "serving"

    def open(self) -> None:
        """Bind, listen and start accepting (call on the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._sock = self._listen(self.requested_port)
        self._port = int(self._sock.getsockname()[1])
        reserve = self._make_socket()
        try:
            _reusable(reserve)
            reserve.bind((self.host, self._port))
        except OSError:
            reserve.close()
            self._sock.close()
            self._sock = None
            raise
        self._reserve = reserve
        self._state = "opening"  # listening, not yet watched: _apply moves it where the flags say
        self._apply()

    def pause(self) -> None:
        """Stop accepting and make the kernel drop new SYNs (see the module docstring)."""
        self._hold = True
        self._apply()

    def resume(self) -> None:
        """Lift a pause; connections the kernel queued meanwhile are accepted now (the plug is dropped)."""
        self._hold = False
        self._apply()

    def refuse(self) -> None:
        """Refuse new connections (no listener on the port) until :meth:`accept_again`."""
        self._refuse = True
        self._apply()

    def accept_again(self) -> None:
        """End a refusal: listen on the same port again."""
        self._refuse = False
        self._apply()

    def close(self) -> None:
        if self._state == "closed":
            return
        self._stop_listening()
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None
        self._state = "closed"

    # -- internals -----------------------------------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        sock = self._make_socket()
        try:
            _reusable(sock)
            sock.bind((self.host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _apply(self) -> None:
        """Move to the state the flags ask for."""
        if self._state == "closed" or self._loop is None:
            return
        want = "paused" if self._hold else "refusing" if self._refuse else "serving"
        if want == self._state:
            return
        if want == "refusing":
            self._stop_listening()  # queued, unaccepted handshakes are reset with it, as a dying process's
            self._state = "refusing"
            return
        if self._sock is None:
            self._sock = self._listen(self._port)
        if self._state == "serving":
            self._loop.remove_reader(self._sock.fileno())
        if want == "paused":
            self._plug()
            self._state = "paused"
            return
        self._sock.listen(BACKLOG)
        for plug in self._plugs:
            plug.close()  # RST: a plug still connecting stops retransmitting its SYN
        self._plugs.clear()
        self._state = "serving"
        self._loop.add_reader(self._sock.fileno(), self._accept_ready)
        self._accept_ready()  # what queued while paused

    def _plug(self) -> None:
        """Shrink the accept queue to one slot and fill it with a connection of our own."""
        assert self._sock is not None
        self._sock.listen(0)
        plug = self._make_socket()
        plug.setblocking(False)
        plug.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        host = self._sock.getsockname()[0]
        plug.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, self._port))
        with contextlib.suppress(OSError):
            self._plug_addrs.add(plug.getsockname()[:2])
        self._plugs.append(plug)
        if len(self._plug_addrs) > 64:  # plugs whose SYN the full queue dropped are never accepted
            self._plug_addrs.clear()

    def _stop_listening(self) -> None:
        if self._sock is not None:
            if self._state == "serving" and self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for plug in self._plugs:
            plug.close()
        self._plugs.clear()

    def _accept_ready(self) -> None:
        sock = self._sock
        while sock is not None and self._state == "serving":
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


def _reusable(sock: socket.socket) -> None:
    """Let the listening socket and the port-keeping one share the port (and a restart rebind it)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
