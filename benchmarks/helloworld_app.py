"""A bare aiohttp hello-world app on uvloop (like the node) or asyncio, the baseline of bench_node.py.

GET or POST on any path answers ``Hello, World!`` (a POST body is read and discarded, as aiohttp
does for any handler that ignores it).  No middleware, no access log.

Usage: .venv/bin/python benchmarks/helloworld_app.py --port PORT [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello, World!")


async def ready(request: web.Request) -> web.Response:
    return web.json_response({"ready": True})


def main() -> None:
    parser = argparse.ArgumentParser(description="bare aiohttp hello-world")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop (bench_ceiling.py compares both)")
    args = parser.parse_args()
    if args.loop == "uvloop":
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
    app = web.Application()
    app.router.add_get("/readyz", ready)
    app.router.add_route("*", "/{tail:.*}", hello)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
