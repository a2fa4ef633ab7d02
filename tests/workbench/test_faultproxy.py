"""FaultProxy and ProxyMesh against real sockets on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.echo import echo_handler
from workbench.run.faults.proxy import FaultProxy, ProxyMesh
from workbench.run.processes import free_port as _free_port

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def proxy(echo_port: int) -> AsyncIterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", 0, "127.0.0.1", echo_port, "test", seed=1)
    await p.start()
    yield p
    await p.stop()


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)


async def _roundtrip(port: int, payload: bytes = b"ping") -> float:
    reader, writer = await _open(port)
    try:
        t0 = time.perf_counter()
        writer.write(payload)
        await asyncio.wait_for(reader.readexactly(len(payload)), 5)
        return time.perf_counter() - t0
    finally:
        writer.close()


async def test_relay_is_byte_exact_for_large_payloads(proxy: FaultProxy) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    reader, writer = await _open(proxy.port)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    echoed = await asyncio.wait_for(reader.read(), 10)  # until EOF: the half-close went through
    await sender
    writer.close()
    assert echoed == payload
    stats = proxy.stats()
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)
    assert stats["connections"] == 1


async def test_latency_adds_the_delay_each_way(proxy: FaultProxy) -> None:
    base = await _roundtrip(proxy.port)
    proxy.set_latency(40)
    delayed = await _roundtrip(proxy.port)
    assert 0.080 <= delayed < base + 0.080 + 0.060
    proxy.set_latency(0)
    assert await _roundtrip(proxy.port) < 0.040


async def test_latency_with_jitter_preserves_order(proxy: FaultProxy) -> None:
    proxy.set_latency(5, jitter_ms=5)
    reader, writer = await _open(proxy.port)
    chunks = [f"{i:05d}".encode() for i in range(200)]
    for c in chunks:
        writer.write(c)
        await asyncio.sleep(0)
    got = await asyncio.wait_for(reader.readexactly(5 * len(chunks)), 5)
    writer.close()
    assert got == b"".join(chunks)
    assert proxy.delayed_chunks > 0


async def test_blackhole_stalls_and_heal_delivers_held_bytes(proxy: FaultProxy) -> None:
    reader, writer = await _open(proxy.port)
    writer.write(b"before")
    assert await asyncio.wait_for(reader.readexactly(6), 2) == b"before"

    proxy.partition("blackhole")
    writer.write(b"during")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(6), 0.3)
    # A new connection is neither accepted nor refused: its SYN is dropped, as by a blackhole.
    connecting = asyncio.create_task(asyncio.open_connection("127.0.0.1", proxy.port))
    await asyncio.sleep(0.3)
    assert not connecting.done()

    proxy.heal()
    assert await asyncio.wait_for(reader.readexactly(6), 2) == b"during"
    r2, w2 = await asyncio.wait_for(connecting, 10)  # at the next SYN retransmission
    w2.write(b"new")
    assert await asyncio.wait_for(r2.readexactly(3), 2) == b"new"
    writer.close()
    w2.close()


async def test_reset_fails_fast_and_heal_restores(proxy: FaultProxy) -> None:
    reader, writer = await _open(proxy.port)
    writer.write(b"x")
    await asyncio.wait_for(reader.readexactly(1), 2)

    t0 = time.perf_counter()
    proxy.partition("reset")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 1)
    writer.close()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _roundtrip(proxy.port)
    assert time.perf_counter() - t0 < 0.5
    assert proxy.resets >= 2

    proxy.heal()
    assert await _roundtrip(proxy.port) < 1


async def test_target_down_resets_the_client(echo_port: int) -> None:
    dead = FaultProxy("127.0.0.1", 0, "127.0.0.1", echo_port, "dead")
    dead.target_port = _free_port()
    async with dead:
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(dead.port)


async def test_a_dead_target_is_refused_like_a_direct_connect_until_it_comes_back() -> None:
    target_port = _free_port()
    async with FaultProxy("127.0.0.1", 0, "127.0.0.1", target_port, "down", probe_interval_s=0.02) as proxy:
        port = proxy.port
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):  # the first one finds out
            await _roundtrip(port)
        assert proxy.stats()["target_down"]
        with pytest.raises(ConnectionRefusedError):  # then a connect is refused, as the target's own port
            await _open(port)
        server = await asyncio.start_server(echo_handler, "127.0.0.1", target_port)
        try:
            for _ in range(100):  # the proxy listens again, on the same port, once a probe gets through
                if not proxy.stats()["target_down"]:
                    break
                await asyncio.sleep(0.02)
            assert proxy.port == port
            assert await _roundtrip(port) < 1
        finally:
            server.close()
            await server.wait_closed()


async def test_a_target_that_dies_under_open_connections_is_noticed_before_the_next_connect() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    async with FaultProxy("127.0.0.1", 0, "127.0.0.1", listener.getsockname()[1], "dies") as proxy:
        reader, writer = await _open(proxy.port)
        writer.write(b"x")
        conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 2)
        assert await asyncio.wait_for(loop.sock_recv(conn, 1), 2) == b"x"
        listener.close()  # the target dies: its port and its connections close together
        conn.close()
        assert await asyncio.wait_for(reader.read(), 2) == b""  # the FIN is passed on
        writer.close()
        for _ in range(100):  # no new connect was needed to notice
            if proxy.stats()["target_down"]:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(ConnectionRefusedError):
            await _open(proxy.port)


async def test_loss_resets_new_connections_and_delays_chunks(proxy: FaultProxy) -> None:
    reader, writer = await _open(proxy.port)
    writer.write(b"a")
    await asyncio.wait_for(reader.readexactly(1), 2)
    proxy.set_loss(100)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await _roundtrip(proxy.port)
    t0 = time.perf_counter()
    writer.write(b"b")  # the established connection survives, but each chunk pays the penalty
    await asyncio.wait_for(reader.readexactly(1), 2)
    assert time.perf_counter() - t0 >= 0.35  # 200 ms each way
    proxy.set_loss(0)
    writer.close()
    with pytest.raises(ValueError):
        proxy.set_loss(150)


async def test_stop_closes_everything(echo_port: int) -> None:
    p = FaultProxy("127.0.0.1", 0, "127.0.0.1", echo_port, "stop")
    await p.start()
    port = p.port
    reader, writer = await _open(port)
    writer.write(b"x")
    await asyncio.wait_for(reader.readexactly(1), 2)
    await asyncio.wait_for(p.stop(), 2)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 1)
    writer.close()
    with pytest.raises(OSError):
        await _open(port)
    assert p.stats()["active"] == 0




async def test_mesh_partition_latency_and_events(echo_port: int) -> None:
    nodes = ["eu-1", "eu-2", "us-1", "ap-1"]
    links = {(a, b): ("127.0.0.1", echo_port) for a in nodes for b in nodes if a != b}
    async with ProxyMesh(links, seed=3) as mesh:
        assert len({mesh.port(*lk) for lk in links}) == len(links)
        before = time.monotonic()
        ev = mesh.partition([["eu"], ["us-1"]])
        assert before <= ev.t <= time.monotonic()
        cut = set(ev.links)
        assert ("eu-1", "eu-2") not in cut and ("eu-1", "us-1") in cut
        assert ("us-1", "ap-1") in cut and ("eu-2", "ap-1") in cut
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(_roundtrip(mesh.port("eu-1", "us-1")), 0.3)
        assert await _roundtrip(mesh.port("eu-1", "eu-2")) < 1
        mesh.heal()
        assert await _roundtrip(mesh.port("eu-1", "us-1")) < 1

        ev = mesh.latency(("eu", "us"), 30)
        assert set(ev.links) == {("eu-1", "us-1"), ("eu-2", "us-1"), ("us-1", "eu-1"), ("us-1", "eu-2")}
        assert await _roundtrip(mesh.port("us-1", "eu-2")) >= 0.060
        assert await _roundtrip(mesh.port("eu-1", "ap-1")) < 0.040
        mesh.loss(("eu-1", "ap-1"), 5, symmetric=False)
        assert mesh.proxies[("eu-1", "ap-1")].stats()["loss_pct"] == 5
        assert [e.action for e in mesh.events] == ["partition", "heal", "latency", "loss"]
        with pytest.raises(KeyError):
            mesh.latency(("eu", "mars"), 1)
        with pytest.raises(ValueError):
            mesh.partition([["eu"], ["eu-1"]])


def test_relay_works_on_uvloop_for_many_new_connections():
    """uvloop starts reading only after connection_made returns: bytes sent while the proxy is still
    connecting upstream must not be stranded (they once were: every such request hung)."""
    import aiohttp
    import uvloop
    from aiohttp import web

    async def scenario() -> int:
        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        proxy = FaultProxy("127.0.0.1", 0, "127.0.0.1", port, "uv")
        await proxy.start()
        failures = 0
        try:
            connector = aiohttp.TCPConnector(limit=32, force_close=True)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3)) as s:
                async def one() -> None:
                    nonlocal failures
                    try:
                        async with s.post(f"http://127.0.0.1:{proxy.port}/", data=b"x" * 64) as r:
                            assert await r.text() == "ok"
                    except (aiohttp.ClientError, TimeoutError):
                        failures += 1
                await asyncio.gather(*(one() for _ in range(200)))
        finally:
            await proxy.stop()
            await runner.cleanup()
        return failures

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == 0
