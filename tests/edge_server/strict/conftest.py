"""Strict nodes served in the test's own process: real HTTP on loopback, real gossip between them,
voters and audit trails on disk -- for tests that must reach inside a node (its audit write, its
counters per gossip round) while it runs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from procs import ClusterProcs

from edge_server.app import build_server
from edge_server.node import Node


@pytest.fixture
async def strict_nodes(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[dict[str, tuple[Node, str]]]:
    """``eu-1``, ``us-1``, ``ap-1`` in strict mode, served in this process, gossiping every 20 ms; always
    stopped.  Limit ``*``: rate and burst 100, or ``(rate, burst)`` by indirect parametrization."""
    rate, burst = getattr(request, "param", (100, 100))
    procs = ClusterProcs(tmp_path, regions=["eu", "us", "ap"], rate=rate, burst=burst, gossip_interval_ms=20)
    config = dataclasses.replace(procs.config(), mode="strict", audit_dir=tmp_path / "audit")
    nodes: dict[str, tuple[Node, str]] = {}
    runners: list[web.ServerRunner] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for spec in config.nodes:
            node = Node(config, spec.id)
            node.recover()
            runner = web.ServerRunner(build_server(node))
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, spec.host, spec.port).start()
            assert node.gossiper is not None
            tasks.append(asyncio.create_task(node.gossiper.run()))
            nodes[spec.id] = (node, spec.url)
        yield nodes
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners:
            await runner.cleanup()
        for node, _url in nodes.values():
            await node.close()
