"""Command line: ``edge-server --cluster FILE --node ID`` runs a node; ``edge-server router ...`` the router;
``edge-server audit verify|export|usage DIR...`` checks and reads audit trails (see ``audit/cli.py``).

Exit status: 0 after a clean stop, 2 for a bad cluster file or arguments, 3 when the node cannot
bind its port or read its audit trail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from aiohttp import web

from edge_server.accept import Listener
from edge_server.config import ClusterConfig, ConfigError, load_cluster
from edge_server.gc_watch import GC_WATCH
from edge_server.lifeline import die_with_parent

if TYPE_CHECKING:
    from edge_server.node import Node

__all__ = ["main"]

log = logging.getLogger("edge_server")


def _use_uvloop() -> str:
    """uvloop unless ``EDGE_LOOP=asyncio`` (benchmarks compare both loops on the same node)."""
    if os.environ.get("EDGE_LOOP", "uvloop").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _fail(status: int, message: str) -> int:
    print(f"edge-server: {message}", file=sys.stderr, flush=True)
    return status


async def _wait_for_stop() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _rebuild_lost_trail(node: Node) -> None:
    """A replicating node with no trail of its own asks its replica holders whether it lost its disk
    (``audit/bootstrap.py``): it rebuilds from them, starts fresh, or refuses to start."""
    from edge_server.audit.bootstrap import bootstrap_trail
    from edge_server.audit.replica import has_trail, replica_holders

    if node.replicator is None or has_trail(node.audit):
        return
    await bootstrap_trail(node.audit, node.spec, replica_holders(node.config, node.spec.id), node.config.secret,
                          node.config.audit, node.config.source)


async def serve_node(config: ClusterConfig, node_id: str, drain_s: float) -> int:
    from edge_server.app import build_server
    from edge_server.heap import pin_mmap_threshold
    from edge_server.node import Node

    # Before the key table exists: its rebuilds under key churn must not pile up in the C heap.
    pinned = pin_mmap_threshold()
    node = Node(config, node_id)
    runner = web.ServerRunner(build_server(node), handle_signals=False)
    await runner.setup()
    # Our own listener: it accepts every pending connection per turn of the loop (uvloop takes one, and
    # the router's new connections then wait seconds in the accept queue: edge_server.accept).
    try:
        listener = await Listener.start(runner.server, node.spec.host, node.spec.port, backlog=4096)
    except OSError as exc:
        await runner.cleanup()
        return _fail(3, f"node {node_id}: cannot listen on {node.spec.host}:{node.spec.port}: {exc.strerror}")
    from edge_server.audit.bootstrap import BootstrapRefused

    try:
        await _rebuild_lost_trail(node)
        node.recover()
    except BootstrapRefused as exc:
        listener.close()
        await runner.cleanup()
        return _fail(3, f"node {node_id}: {exc}")
    except (OSError, ValueError, KeyError) as exc:
        listener.close()
        await runner.cleanup()
        return _fail(3, f"node {node_id}: cannot read audit trail {node.audit.path}: {exc}")
    # Everything loaded so far (code, config, the recovered table) lives as long as the process: keep
    # it out of the collector's generations, and collect less often -- requests make short-lived
    # garbage in bursts and the default gen-0 threshold (700) runs a collection every few requests.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    GC_WATCH.install()  # its pauses in /metrics (a long one is a loop lag)
    assert node.gossiper is not None
    tasks = [asyncio.create_task(node.gossiper.run(), name="gossip"),
             asyncio.create_task(node.housekeeping(), name="housekeeping")]
    if node.replicator is not None:
        tasks.append(asyncio.create_task(node.replicator.run(), name="audit-replication"))
    log.info("node serving", extra={"host": node.spec.host, "port": node.spec.port,
                                    "peers": [p.id for p in node.peers], "cold": node.cold,
                                    "mmap_threshold_pinned": pinned})
    try:
        await _wait_for_stop()
        node.draining = True
        log.info("draining", extra={"seconds": drain_s})
        await asyncio.sleep(drain_s)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        listener.close()
        await runner.cleanup()
        await node.close()
        log.info("node stopped")
    return 0


def _node_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-server", description="Run one Rating API Edge node.")
    parser.add_argument("--cluster", required=True, help="cluster file (TOML)")
    parser.add_argument("--node", required=True, help="id of the node to run, as in the cluster file")
    parser.add_argument("--drain-ms", type=float, default=300.0,
                        help="after SIGTERM, answer /readyz 503 this long before closing (default 300)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    try:
        config = load_cluster(args.cluster)
        spec = config.node(args.node)
    except ConfigError as exc:
        return _fail(2, str(exc))
    from edge_server.logs import setup_logging

    setup_logging(args.log_level, node=spec.id, region=spec.region)
    loop_kind = _use_uvloop()
    log.info("starting", extra={"cluster": args.cluster, "loop": loop_kind, "mode": config.mode})
    return asyncio.run(serve_node(config, args.node, args.drain_ms / 1000))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()
    if argv and argv[0] == "router":
        from edge_server.router_main import router_main

        return router_main(argv[1:])
    if argv and argv[0] == "audit":
        from edge_server.audit.cli import audit_main

        return audit_main(argv[1:])
    return _node_main(argv)


if __name__ == "__main__":
    sys.exit(main())
