"""An audit trail that cannot be written: the grant is refused with 503, its tokens are given back and
peers never see them -- a node must not answer 200 for tokens it could not record.

The node runs in this process (real HTTP on loopback, real file descriptors); the failure is real too:
the audit file's descriptor is swapped for one opened read-only, so ``os.write`` fails with EBADF.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from edge_server.app import build_server
from edge_server.config import load_cluster
from edge_server.node import Node
from workbench.run.processes import free_port as _free_port

pytestmark = pytest.mark.timeout(30)




@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, str]]:
    port = _free_port()
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(f"""
[cluster]
secret = "audit-failure-test-secret-0123456789"
audit_dir = "{tmp_path / 'audit'}"
[[regions]]
name = "eu"
[[regions.nodes]]
id = "eu-1"
host = "127.0.0.1"
port = {port}
[[limits]]
pattern = "*"
rate = 1.0
burst = 10
[api_keys]
"key-test" = "tenant"
[skill]
name = "rating"
kind = "simulated"
median_ms = 1
p99_ms = 2
""")
    node = Node(load_cluster(cluster), "eu-1")
    node.recover()
    runner = web.ServerRunner(build_server(node))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield node, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await node.close()


async def _check(session: aiohttp.ClientSession, url: str, key: str, cost: int = 1) -> tuple[int, dict]:
    async with session.post(url + "/v1/limits/check", json={"key": key, "cost": cost}) as resp:
        return resp.status, await resp.json()


async def test_unwritable_audit_refuses_the_grant_and_returns_the_tokens(served: tuple[Node, str]) -> None:
    node, url = served
    assert node.table is not None
    async with aiohttp.ClientSession() as session:
        status, body = await _check(session, url, "k", 3)
        assert status == 200 and body["allowed"] is True and body["remaining"] == 7
        written = node.audit.last_seq

        good_fd = node.audit._fd
        node.audit._fd = os.open(os.devnull, os.O_RDONLY)
        try:
            for _ in range(3):
                status, body = await _check(session, url, "k", 2)
                assert status == 503, body
                assert body["error"]["code"] == "audit_unavailable", body
            # Nothing of the refused grants is spent, committed or visible to peers.
            assert node.audit.last_seq == written and node.audit.total_cost == 3
            assert node.table.own_count("k") == 3
        finally:
            os.close(node.audit._fd)
            node.audit._fd = good_fd

        # Writable again: the same tokens are there to grant.
        status, body = await _check(session, url, "k", 2)
        assert status == 200 and body["allowed"] is True and 4.5 <= body["remaining"] <= 5.5, body
        assert node.audit.last_seq == written + 1 and node.audit.total_cost == 5
