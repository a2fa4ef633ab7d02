"""Fault-injecting TCP proxies: partition, latency, jitter, loss and reset without privileges.

Every link the workbench wants to break runs through a :class:`FaultProxy` listening on a loopback
port and relaying to the real target. The relay is built on asyncio protocols rather than streams so
that, with no fault set, a chunk goes from ``data_received`` straight into the peer's ``write``: no
coroutine switch and no copy per chunk.

Faults are modelled the way TCP would experience them, so a healed stream is still a valid stream:

- ``partition("blackhole")`` stops reading on every connection and holds what was already read;
  new connections are accepted and held. Senders stall exactly as behind a silent drop (TCP would
  retransmit after the heal), and the bytes flow again on :meth:`FaultProxy.heal`.
- ``partition("reset")`` aborts every connection with an RST and resets each new one on accept.
- ``set_latency`` delays each chunk by ``ms`` (± ``jitter_ms``) *in each direction*, so a
  request/response round trip gains about ``2 * ms``. Delivery order is preserved.
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FaultEvent", "FaultProxy", "ProxyMesh"]

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
        self.conn.proxy._enqueue(self, b"")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
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

    __slots__ = ("client", "connected", "eofs", "proxy", "target")

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.client = _Side(self, upstream=False)
        self.target: _Side | None = None
        self.connected = False
        self.eofs = 0  # FINs delivered; after both directions closed, the connection is done

    def side_made(self, side: _Side) -> None:
        if side is self.client:
            self.proxy._accepted(self)

    def close(self, reset: bool = False) -> None:
        proxy = self.proxy
        if self not in proxy._conns:
            return
        proxy._conns.discard(self)
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
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.name = name or f"{listen_host}:{listen_port}->{target_host}:{target_port}"
        self.loss_penalty_ms = loss_penalty_ms
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
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
        if self._server is None or not self._server.sockets:
            return self.listen_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self).client, self.listen_host, self.listen_port, reuse_address=True
        )

    async def stop(self) -> None:
        """Stop listening and close every relayed connection (with RST, so no peer waits)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.close(reset=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

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
        task = asyncio.get_running_loop().create_task(self._open(conn))
        task.add_done_callback(_consume)

    async def _open(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        target = conn.target
        assert target is not None
        try:
            await loop.create_connection(lambda: target, self.target_host, self.target_port)
        except OSError:
            # The target is down: show the client what it would see connecting directly.
            conn.close(reset=True)
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


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One applied fault, stamped on the same monotonic clock as the load generator's records."""

    t: float  # time.monotonic() when applied
    action: str  # partition | heal | latency | loss
    links: tuple[tuple[str, str], ...]  # the (src, dst) links it touched
    params: Mapping[str, Any] = field(default_factory=dict)


Link = tuple[str, str]


class ProxyMesh:
    """One :class:`FaultProxy` per directed link ``(src, dst)``: traffic from ``src`` to ``dst``'s port.

    ``links`` maps each link to the real ``(host, port)`` of ``dst``; ``src`` then dials
    :meth:`port` ``(src, dst)`` instead. Names are node ids; ``region_of`` maps a node to its region
    (default: the part before the last ``-``, so ``eu-1`` is in ``eu``), which lets partitions and
    latencies name regions. Every control returns the :class:`FaultEvent` it appended to
    :attr:`events`.
    """

    def __init__(
        self,
        links: Mapping[Link, tuple[str, int]],
        *,
        listen_host: str = "127.0.0.1",
        region_of: Mapping[str, str] | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        rng = random.Random(seed)
        self.proxies: dict[Link, FaultProxy] = {
            link: FaultProxy(listen_host, 0, host, port, f"{link[0]}->{link[1]}", seed=rng.getrandbits(32))
            for link, (host, port) in links.items()
        }
        self._region_of = dict(region_of or {})
        self._clock = clock
        self.events: list[FaultEvent] = []

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.proxies.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.proxies.values()))

    async def __aenter__(self) -> ProxyMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def port(self, src: str, dst: str) -> int:
        return self.proxies[(src, dst)].port

    def region(self, name: str) -> str:
        return self._region_of.get(name) or name.rsplit("-", 1)[0]

    def _nodes(self) -> set[str]:
        return {n for link in self.proxies for n in link}

    def _expand(self, name: str) -> set[str]:
        """A node name stands for itself; a region name for every node in it."""
        nodes = self._nodes()
        if name in nodes:
            return {name}
        members = {n for n in nodes if self.region(n) == name}
        if not members:
            raise KeyError(f"no node or region named {name!r} in the mesh")
        return members

    def select(self, src: str, dst: str, symmetric: bool = True) -> list[Link]:
        """Links from ``src`` to ``dst`` (node or region names), and back when ``symmetric``."""
        a, b = self._expand(src), self._expand(dst)
        pairs = [lk for lk in self.proxies if lk[0] in a and lk[1] in b]
        if symmetric:
            pairs += [lk for lk in self.proxies if lk[0] in b and lk[1] in a and lk not in pairs]
        if not pairs:
            raise KeyError(f"no link between {src!r} and {dst!r}")
        return pairs

    def _event(self, action: str, links: Iterable[Link], **params: Any) -> FaultEvent:
        ev = FaultEvent(self._clock(), action, tuple(links), params)
        self.events.append(ev)
        return ev

    def partition(self, groups: Iterable[Iterable[str]], mode: str = "blackhole") -> FaultEvent:
        """Cut every link between different groups (names are nodes or regions).

        Nodes named in no group form one more group together, so ``[["eu"]]`` isolates ``eu``.
        """
        owner: dict[str, int] = {}
        for i, group in enumerate(groups):
            for name in group:
                for node in self._expand(name):
                    if owner.setdefault(node, i) != i:
                        raise ValueError(f"{node!r} is in two partition groups")
        cut = [lk for lk in self.proxies if owner.get(lk[0], -1) != owner.get(lk[1], -1)]
        for lk in cut:
            self.proxies[lk].partition(mode)
        return self._event("partition", cut, mode=mode, groups=[sorted(g) for g in _groups(owner)])

    def heal(self) -> FaultEvent:
        """Lift every partition (latency and loss stay)."""
        for p in self.proxies.values():
            p.heal()
        return self._event("heal", self.proxies)

    def latency(self, link: Link, ms: float, jitter_ms: float = 0.0, symmetric: bool = True) -> FaultEvent:
        """Delay chunks on a link or every link between two regions (both ways when ``symmetric``)."""
        chosen = self.select(*link, symmetric=symmetric)
        for lk in chosen:
            self.proxies[lk].set_latency(ms, jitter_ms)
        return self._event("latency", chosen, ms=ms, jitter_ms=jitter_ms)

    def loss(self, link: Link, pct: float, symmetric: bool = True) -> FaultEvent:
        """Set loss odds on a link or every link between two regions."""
        chosen = self.select(*link, symmetric=symmetric)
        for lk in chosen:
            self.proxies[lk].set_loss(pct)
        return self._event("loss", chosen, pct=pct)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {f"{s}->{d}": p.stats() for (s, d), p in self.proxies.items()}


def _groups(owner: Mapping[str, int]) -> list[set[str]]:
    out: dict[int, set[str]] = {}
    for node, i in owner.items():
        out.setdefault(i, set()).add(node)
    return [out[i] for i in sorted(out)]
