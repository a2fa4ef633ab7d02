"""Fault-injecting TCP proxies: partition, latency, jitter, loss and reset without privileges.

Every link the workbench wants to break runs through a :class:`FaultProxy` listening on a loopback
port and relaying to the real target. The relay is built on asyncio protocols rather than streams so
that, with no fault set, a chunk goes from ``data_received`` straight into the peer's ``write``: no
coroutine switch and no copy per chunk.

Faults are modelled the way TCP would experience them, so a healed stream is still a valid stream:

- ``partition("blackhole")`` stops reading on every connection and holds what was already read, and
  stops accepting (:class:`~workbench.run.faults.listener.Listener`): the kernel then drops new SYNs,
  so a connect neither succeeds nor is refused, as behind a real blackhole, until the client's own
  timeout. Senders on established connections stall with no RST; on :meth:`FaultProxy.heal` held
  bytes flow again in order and waiting connects complete at their next SYN retransmission.
  What differs from a kernel blackhole: an established connection's bytes are ACKed into socket
  buffers (the sender's writes succeed until those fill, and nothing is retransmitted), and held bytes
  are delivered at once on heal rather than at the sender's next retransmission timeout.
- ``partition("reset")`` aborts every connection with an RST and resets each new one on accept.
- ``set_latency`` delays each chunk by ``ms`` (± ``jitter_ms``) *in each direction*, so a
  request/response round trip gains about ``2 * ms``. Delivery order is preserved.
- A dead target (its port refuses connections) makes the proxy refuse too, as a direct connect
  would: new connects get an RST to their SYN instead of an accept and a reset after the request
  went out. The proxy notices at the first refused upstream connect, or as soon as an upstream
  connection closes under it and a probe is refused, and listens again once a probe (every
  ``probe_interval_s``) gets through.
- ``set_loss(pct)`` resets a new connection with probability ``pct`` % and holds a chunk back by a
  retransmission penalty (200 ms, Linux's minimum RTO) with the same probability: TCP turns loss
  into delay, and into failed handshakes when it is severe.
"""

from __future__ import annotations

import asyncio
import collections
import random
import socket
import struct
import time
from typing import Any

from workbench.run.faults.listener import Listener, SocketFactory
from workbench.run.faults.target import TargetWatch

__all__ = ["FaultProxy"]

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST instead of FIN
_MAX_QUEUED = 4 * 1024 * 1024  # delayed bytes per direction before we stop reading (back-pressure)


def _rst(transport: asyncio.BaseTransport | None) -> None:
    """Abort a transport so that the peer sees a connection reset, not an orderly close."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]


class _Side(asyncio.Protocol):
    """One socket of a relayed connection; forwards what it reads to ``peer``."""

    __slots__ = (
        "conn",
        "peer",
        "peer_writable",
        "queue",
        "queued_bytes",
        "reading",
        "timer",
        "transport",
        "upstream",
    )

    def __init__(self, conn: _Conn, upstream: bool) -> None:
        self.conn = conn
        self.upstream = upstream  # True: the socket to the target (reads the "down" direction)
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.peer_writable = True  # False while the peer's write buffer is over its high-water mark
        self.reading = True
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # to deliver to peer
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.side_made(self)

    def data_received(self, data: bytes) -> None:
        proxy = self.conn.proxy
        if self.upstream:
            proxy.bytes_down += len(data)
        else:
            proxy.bytes_up += len(data)
        peer = self.peer
        if proxy._clean and not self.queue and peer is not None and peer.transport is not None:
            peer.transport.write(data)  # the hot path: a straight relay
            return
        proxy._enqueue(self, data)

    def eof_received(self) -> bool:
        # Half-close: pass the FIN on once everything queued before it is delivered.
        if self.upstream:
            self.conn.proxy._watch.suspect()
        self.conn.proxy._enqueue(self, b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream and self.conn in self.conn.proxy._conns:  # the target went away on its own
            self.conn.proxy._watch.suspect()
        self.conn.close(reset=exc is not None)

    # Flow control: when the peer cannot keep up, stop reading from this side.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_writable = False
            self.peer.update_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_writable = True
            self.peer.update_reading()

    def update_reading(self) -> None:
        """Read only when no partition holds us, the peer accepts writes and the delay queue has room."""
        conn = self.conn
        want = not conn.proxy._blackhole and conn.connected and self.peer_writable and self.queued_bytes < _MAX_QUEUED
        if want != self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()


class _Conn:
    """A client connection and its upstream connection."""

    __slots__ = ("client", "connected", "eofs", "opening", "proxy", "target")

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, upstream=False)
        self.target: _Side | None = None
        self.connected = False
        self.eofs = 0  # FINs delivered; after both directions closed, the connection is done
        self.opening: asyncio.Task[None] | None = None  # the upstream connect in progress

    def side_made(self, side: _Side) -> None:
        if side is self.client:
            self.proxy._accepted(self)

    def close(self, reset: bool = False) -> None:
        proxy = self.proxy
        if self not in proxy._conns:
            return
        proxy._conns.discard(self)
        if self.opening is not None and not self.opening.done() and self.opening is not asyncio.current_task():
            self.opening.cancel()  # a connect into a blackhole would otherwise wait for the kernel's timeout
        for side in (self.client, self.target):
            if side is None:
                continue
            if side.timer is not None:
                side.timer.cancel()
            side.queue.clear()
            if reset:
                _rst(side.transport)
            elif side.transport is not None and not side.transport.is_closing():
                side.transport.close()


class FaultProxy:
    """A TCP relay from ``listen_host:listen_port`` to ``target_host:target_port`` with live faults.

    ``listen_port=0`` picks a free port; read it from :attr:`port` after :meth:`start`.
    Counters (``bytes_up`` client→target, ``bytes_down``, ``connections``, ``resets``,
    ``delayed_chunks``) only grow; :meth:`stats` returns them with the active connection count.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int = 0,
        target_host: str = "127.0.0.1",
        target_port: int = 0,
        name: str = "",
        *,
        seed: int | None = None,
        loss_penalty_ms: float = 200.0,
        make_socket: SocketFactory | None = None,
        probe_interval_s: float = 0.02,
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.name = name or f"{listen_host}:{listen_port}->{target_host}:{target_port}"
        self.loss_penalty_ms = loss_penalty_ms
        self._rng = random.Random(seed)
        self._make_socket = make_socket  # None: plain sockets; else e.g. sockets inside a network namespace
        self._listener: Listener | None = None
        self._adopting: set[asyncio.Task[Any]] = set()
        self.probe_interval_s = probe_interval_s
        self._watch = TargetWatch(lambda: (self.target_host, self.target_port), self._target_died,
                                  self._target_back, make_socket=make_socket, interval_s=probe_interval_s)
        self._conns: set[_Conn] = set()
        self._partition: str | None = None
        self._blackhole = False
        self._latency_s = 0.0
        self._jitter_s = 0.0
        self._loss = 0.0
        self._clean = True  # no fault at all: data_received may write straight through
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.resets = 0
        self.delayed_chunks = 0

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.name} port={self.port} partition={self._partition} "
            f"latency={self._latency_s * 1e3:g}ms±{self._jitter_s * 1e3:g} loss={self._loss * 100:g}% "
            f"conns={len(self._conns)}>"
        )

    @property
    def port(self) -> int:
        """The bound listening port (after :meth:`start`)."""
        if self._listener is None:
            return self.listen_port
        return self._listener.port

    async def start(self) -> None:
        self._listener = Listener(self.listen_host, self.listen_port, self._adopt, make_socket=self._make_socket)
        self._listener.open()
        if self._blackhole:
            self._listener.pause()

    def _adopt(self, sock: socket.socket) -> None:
        """Wrap an accepted socket in a transport (the listener accepts; the loop relays)."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(lambda: _Conn(self).client, sock))
        self._adopting.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        _consume(task)

    async def stop(self) -> None:
        """Stop listening and close every relayed connection (with RST, so no peer waits)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in self._adopting:
            task.cancel()
        self._watch.stop()
        for conn in list(self._conns):
            conn.close(reset=True)
        await asyncio.sleep(0)  # let cancelled connects unwind

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- live controls -------------------------------------------------------------------------

    def partition(self, mode: str = "blackhole") -> None:
        """Cut the link: ``blackhole`` stalls (and holds) traffic, ``reset`` resets every connection."""
        if mode not in ("blackhole", "reset"):
            raise ValueError(f"partition mode must be 'blackhole' or 'reset', got {mode!r}")
        self._partition = mode
        self._blackhole = mode == "blackhole"
        self._update_clean()
        if self._listener is not None:
            if self._blackhole:
                self._listener.pause()
            else:
                self._listener.resume()
        for conn in list(self._conns):
            if mode == "reset":
                self.resets += 1
                conn.close(reset=True)
            else:
                for side in (conn.client, conn.target):
                    if side is not None:
                        side.update_reading()

    def heal(self) -> None:
        """Lift a partition; held connections connect and held bytes flow in their original order."""
        self._partition = None
        self._blackhole = False
        self._update_clean()
        if self._listener is not None:
            self._listener.resume()
        for conn in list(self._conns):
            if not conn.connected and conn.target is None:
                self._connect(conn)
                continue
            for side in (conn.client, conn.target):
                if side is not None:
                    self._flush(side)
                    side.update_reading()

    def set_latency(self, ms: float, jitter_ms: float = 0.0) -> None:
        """Delay every chunk by ``ms`` ± ``jitter_ms`` (uniform) in each direction, keeping order."""
        if ms < 0 or jitter_ms < 0:
            raise ValueError("latency and jitter must be >= 0")
        self._latency_s = ms / 1e3
        self._jitter_s = jitter_ms / 1e3
        self._update_clean()

    def set_loss(self, pct: float) -> None:
        """Reset new connections and hold chunks back by the loss penalty, each with ``pct`` % odds."""
        if not 0 <= pct <= 100:
            raise ValueError(f"loss must be within 0..100 %, got {pct}")
        self._loss = pct / 100.0
        self._update_clean()

    def clear(self) -> None:
        """Remove every fault (partition, latency, loss)."""
        self._latency_s = self._jitter_s = self._loss = 0.0
        self.heal()

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "port": self.port,
            "partition": self._partition,
            "latency_ms": self._latency_s * 1e3,
            "jitter_ms": self._jitter_s * 1e3,
            "loss_pct": self._loss * 100,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connections": self.connections,
            "active": len(self._conns),
            "resets": self.resets,
            "delayed_chunks": self.delayed_chunks,
            "target_down": self._watch.down,
        }

    # -- internals -----------------------------------------------------------------------------

    def _update_clean(self) -> None:
        self._clean = self._partition is None and self._latency_s == 0 and self._loss == 0

    def _accepted(self, conn: _Conn) -> None:
        self.connections += 1
        self._conns.add(conn)
        side = conn.client
        if self._partition == "reset" or (self._loss and self._rng.random() < self._loss):
            self.resets += 1
            conn.close(reset=True)
            return
        side.reading = False
        side.transport.pause_reading()  # type: ignore[union-attr]  # nothing to forward to yet
        if not self._blackhole:
            self._connect(conn)

    def _connect(self, conn: _Conn) -> None:
        conn.target = _Side(conn, upstream=True)
        conn.target.peer = conn.client
        conn.client.peer = conn.target
        conn.opening = asyncio.get_running_loop().create_task(self._open(conn))
        conn.opening.add_done_callback(_consume)

    async def _open(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        target = conn.target
        assert target is not None
        try:
            if self._make_socket is None:
                await loop.create_connection(lambda: target, self.target_host, self.target_port)
            else:
                sock = self._make_socket()
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, (self.target_host, self.target_port))
                    await loop.create_connection(lambda: target, sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except OSError as exc:
            # The target is down: show the client what it would see connecting directly.
            conn.close(reset=True)
            if isinstance(exc, ConnectionRefusedError):
                self._watch.refused()
            return
        if conn not in self._conns:  # closed (stop/reset) while we were connecting
            _rst(target.transport)
            return
        conn.connected = True
        conn.client.update_reading()
        target.update_reading()
        # uvloop starts reading only after connection_made returns, so the pause there may not hold:
        # whatever the client sent while we were connecting waits in its queue; deliver it now.
        if conn.client.queue and conn.client.timer is None:
            self._flush(conn.client)

    def _target_died(self) -> None:
        if self._listener is not None:
            self._listener.refuse()

    def _target_back(self) -> None:
        if self._listener is not None:
            self._listener.accept_again()

    def _enqueue(self, side: _Side, data: bytes) -> None:
        """Queue a chunk (``b""`` is a FIN) read by ``side`` for delivery to its peer after the faults."""
        now = time.monotonic()
        delay = self._latency_s
        if self._jitter_s:
            delay += self._rng.uniform(-self._jitter_s, self._jitter_s)
        if data and self._loss and self._rng.random() < self._loss:
            delay += self.loss_penalty_ms / 1e3
        if delay > 0:
            self.delayed_chunks += 1
        due = now + max(delay, 0.0)
        if side.queue and side.queue[-1][0] > due:
            due = side.queue[-1][0]  # never overtake an earlier chunk
        side.queue.append((due, data))
        side.queued_bytes += len(data)
        side.update_reading()
        if side.timer is None:
            self._flush(side)

    def _flush(self, side: _Side) -> None:
        """Deliver every due chunk of ``side``'s queue, then re-arm the timer for the next one."""
        side.timer = None
        if self._blackhole:
            return  # held until heal()
        peer = side.peer
        if peer is None or peer.transport is None or not side.conn.connected:
            return
        now = time.monotonic()
        queue = side.queue
        while queue and queue[0][0] <= now:
            _, data = queue.popleft()
            side.queued_bytes -= len(data)
            if data:
                peer.transport.write(data)
            else:
                side.conn.eofs += 1
                if side.conn.eofs >= 2:
                    side.conn.close()
                    return
                if peer.transport.is_closing():  # the other side is already gone: nothing to half-close
                    side.conn.close()
                    return
                try:
                    peer.transport.write_eof()
                except OSError:  # closed under us (a reset): the connection is over either way
                    side.conn.close()
                    return
        if queue:
            side.timer = asyncio.get_running_loop().call_later(queue[0][0] - now, self._flush, side)
        side.update_reading()


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def __getattr__(name: str) -> Any:
    """``ProxyMesh`` and ``FaultEvent`` moved to :mod:`workbench.run.faults.mesh`; old imports keep working."""
    if name in ("FaultEvent", "ProxyMesh"):
        from workbench.run.faults import mesh

        return getattr(mesh, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
