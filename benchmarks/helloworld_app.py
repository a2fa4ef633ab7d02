"""The ceiling baselines: the fastest aiohttp hello-world we can write, and the routed one beside it.

``--kind lowlevel`` (the default) is built exactly like the node's hot path: aiohttp's low-level
``web.Server`` with one handler function (no ``web.Application``, no router, no middleware), uvloop, no
access log, ``gc.freeze()`` once the server is up and the node's garbage-collection thresholds -- so
"check vs hello" compares the node with the best the same framework can do, not with a handicapped
app.  ``--kind routed`` is the idiomatic ``web.Application`` with a route table, for readers who want
the usual app as the reference.

GET or POST on any path answers ``Hello, World!`` (a POST body is read and discarded); ``/readyz``
answers ``{"ready": true}`` for the harness.

Usage: .venv/bin/python benchmarks/helloworld_app.py --port PORT [--kind lowlevel|routed]
       [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import gc

from aiohttp import web

HELLO = b"Hello, World!"
READY = b'{"ready":true}'


async def lowlevel_handler(request: web.BaseRequest) -> web.Response:
    """One function for every path: the table lookup of the node reduced to one comparison."""
    if request.method == "POST" and request.can_read_body:
        await request.read()
    if request.path == "/readyz":
        return web.Response(body=READY, headers={"Content-Type": "application/json"})
    return web.Response(body=HELLO, headers={"Content-Type": "text/plain"})


async def routed_hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello, World!")


async def routed_ready(request: web.Request) -> web.Response:
    return web.json_response({"ready": True})


async def serve(kind: str, host: str, port: int) -> None:
    if kind == "lowlevel":
        runner: web.BaseRunner = web.ServerRunner(web.Server(lowlevel_handler, access_log=None),
                                                  handle_signals=True)
    else:
        app = web.Application()
        app.router.add_get("/readyz", routed_ready)
        app.router.add_route("*", "/{tail:.*}", routed_hello)
        runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=4096)
    await site.start()
    gc.collect()
    gc.freeze()  # as the node does: the start-up objects leave the collector's generations
    gc.set_threshold(20_000, 50, 100)  # and the node's collection thresholds (edge_server/__main__.py)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="aiohttp hello-world baselines")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=("lowlevel", "routed"), default="lowlevel",
                        help="lowlevel: web.Server + one handler (like the node); routed: web.Application")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (bench_ceiling.py compares both)")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(serve(args.kind, args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
