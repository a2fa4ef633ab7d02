"""The listener accepts every pending connection in one turn of the loop, on uvloop as on asyncio.

Why it matters: uvloop accepts one connection per turn, and a loaded router's turn takes 100-250 ms, so
new clients waited seconds in the kernel's accept queue (``edge_server.accept``).  These tests count
loop turns and connections, never time.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edge_server.accept import Listener

PENDING = 200
MAX_TURNS = 500  # a bound on the polling loops (each turn is one asyncio.sleep(0))


def _loops() -> list[str]:
    kinds = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        kinds.append("uvloop")
    except ImportError:
        pass
    return kinds


def _run(kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("kind", _loops())
def test_every_pending_connection_is_taken_in_one_turn(kind: str) -> None:
    """Connections that queued while the loop was busy are all taken in at its next turns (uvloop's own
    server would need one turn per connection: PENDING turns)."""

    async def main() -> None:
        made = 0

        class Count(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                nonlocal made
                made += 1

        listener = await Listener.start(Count, "127.0.0.1", 0)
        clients: list[socket.socket] = []
        try:
            for _ in range(PENDING):
                s = socket.socket()
                s.setblocking(False)
                clients.append(s)
                try:
                    s.connect(("127.0.0.1", listener.port))
                except BlockingIOError:
                    pass
            time.sleep(0.2)  # noqa: ASYNC251 -- on purpose: the loop is busy while the kernel queues them
            turns = 0
            while made < PENDING and turns < MAX_TURNS:
                await asyncio.sleep(0)
                turns += 1
            assert made == PENDING
            assert listener.accepted == PENDING
            assert turns < 20, f"{turns} loop turns to take {PENDING} pending connections"
            assert listener.accept_calls <= 3
        finally:
            for s in clients:
                s.close()
            listener.close()

    _run(kind, main)


@pytest.mark.parametrize("kind", _loops())
def test_serves_aiohttp_and_close_stops_accepting(kind: str) -> None:
    """aiohttp's protocol factory works on accepted sockets (keep-alive included); after close() a
    connect is refused."""

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        assert runner.server is not None
        listener = await Listener.start(runner.server, "127.0.0.1", 0)
        port = listener.port
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(3):  # the same kept-alive connection
                    async with session.get(f"http://127.0.0.1:{port}/") as resp:
                        assert resp.status == 200
                        assert await resp.json() == {"ok": True}
            assert listener.accepted == 1
        finally:
            listener.close()
            await runner.cleanup()
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()

    _run(kind, main)
