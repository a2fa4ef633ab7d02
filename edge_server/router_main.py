"""Command line of the router: ``edge-server router --cluster FILE [--port N] [--host H]``.

Exit status: 0 after a clean stop (SIGTERM or SIGINT), 2 for a bad cluster file or arguments, 3 when
the router cannot listen on its address.  Errors are one line on stderr; logs are JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from aiohttp import web

from edge_server.accept import Listener
from edge_server.config import ClusterConfig, ConfigError, load_cluster
from edge_server.conn_guard import ConnectionGuard
from edge_server.gc_watch import GC_WATCH

__all__ = ["router_main", "serve_router"]

log = logging.getLogger("edge_server.router")


def _fail(status: int, message: str) -> int:
    print(f"edge-server router: {message}", file=sys.stderr, flush=True)
    return status


async def serve_router(config: ClusterConfig, host: str, port: int) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    from edge_server.router import Router
    from edge_server.router_app import build_router_app

    router = Router(config)
    runner = web.AppRunner(build_router_app(router), access_log=None, handle_signals=False)
    await runner.setup()  # runs the cleanup context: sessions, first health round, check thread
    assert runner.server is not None
    # As on the nodes (edge_server.__main__): what lives as long as the process stays out of the
    # collector, and collections are rarer: thousands of requests in flight hold many objects, and
    # collections of them at the default thresholds stall the loop (a lag the adaptive limit would shed
    # for).  Done before listening: a SIGTERM is handled only from the listener on.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    GC_WATCH.install()  # its pauses in /metrics (a long one is a loop lag)
    rc = config.router
    # Our own listening socket with a protocol factory that wraps aiohttp's handler: slow or idle
    # clients are cut off (edge_server.conn_guard); runner.cleanup() still closes every connection.
    router.guard = ConnectionGuard(runner.server, rc.header_timeout_ms / 1000, rc.max_connections,
                                   early=router.early_shed())
    loop = asyncio.get_running_loop()
    try:
        # every pending connection per turn of the loop (uvloop takes one: edge_server.accept)
        listener = await Listener.start(router.guard, host, port, backlog=4096)
    except OSError as exc:
        await runner.cleanup()
        return _fail(3, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    bound = listener.port
    log.info("router serving", extra={"host": host, "port": bound, "regions": list(router.regions),
                                      "routing": router.routing()})
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()
        await runner.cleanup()
        log.info("router stopped", extra={"counters": router.counters})
    return 0


def _use_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def router_main(argv: list[str]) -> int:
    """Entry point for ``edge-server router``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="edge-server router",
                                     description="Route clients to the nearest healthy region of a cluster.")
    parser.add_argument("--cluster", required=True, help="cluster file (TOML) with a [router] table")
    parser.add_argument("--port", type=int, default=None, help="listen port (default: router.port of the file)")
    parser.add_argument("--host", default=None, help="listen address (default: router.host of the file)")
    parser.add_argument("--log-level", default="INFO")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage line
        return 0 if exc.code == 0 else 2
    try:
        config = load_cluster(args.cluster)
    except ConfigError as exc:
        return _fail(2, str(exc))
    port = config.router.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        return _fail(2, f"--port: expected 0..65535, got {port}")
    from edge_server.logs import setup_logging

    setup_logging(args.log_level, node="router", region="-")
    loop_kind = _use_uvloop()
    log.info("starting", extra={"cluster": args.cluster, "loop": loop_kind})
    try:
        return asyncio.run(serve_router(config, args.host or config.router.host, port))
    except KeyboardInterrupt:  # a second Ctrl-C during cleanup
        return 0
