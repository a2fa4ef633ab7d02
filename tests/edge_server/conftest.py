"""Fixtures that start real edge nodes on loopback (see ``procs.py`` for the harness itself).

``one_node`` and ``three_nodes`` are module-scoped: a test module shares one cluster, so tests on
them must use their own limiter keys and must not kill nodes.  Tests that kill or restart nodes
build their own :class:`ClusterProcs` with ``tmp_path``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procs import API_KEY, TENANT, ClusterProcs


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcs]:
    """One node ``eu-1`` alone in its cluster: rate 1000/s, burst 1000; keys ``tiny*`` have rate 0.5/s
    and burst 5.  API keys: ``key-acme`` (tenant ``acme``), ``key-tiny`` (tenant ``tiny-tenant``)."""
    with ClusterProcs(tmp_path_factory.mktemp("one_node"), regions=["eu"], rate=1000, burst=1000,
                      limits=[("tiny*", 0.5, 5)],
                      api_keys={API_KEY: TENANT, "key-tiny": "tiny-tenant"}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcs]:
    """``eu-1``, ``us-1``, ``ap-1`` in three regions, gossiping every 20 ms: rate 100/s, burst 100."""
    with ClusterProcs(tmp_path_factory.mktemp("three_nodes"), regions=["eu", "us", "ap"], rate=100,
                      burst=100, gossip_interval_ms=20) as cluster:
        yield cluster
