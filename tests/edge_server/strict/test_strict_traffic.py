"""Strict mode's message traffic follows nodes and active keys, not requests.

Three strict nodes of three regions run in this process (``conftest.py``: real HTTP on loopback, real
gossip rounds every 20 ms, voters, audit trails).  ``eu-1`` serves a paced load -- a fixed number of
requests after each of its gossip rounds, spread over a set of keys -- and the cluster's strict bytes
are read from the nodes' ``/metrics`` (``edge_strict_bytes_total{direction, kind}``), per gossip
round, so a slow machine that runs fewer rounds per second changes nothing.

* four times the requests on the same keys: the delta bytes per round stay about the same (a busy
  key's spends go out 0.1 s after the first unpublished one, however many there were);
* keys that were used once and then left idle add nothing;
* four times the busy keys at the same requests: the delta bytes grow about with the keys;
* lease traffic (requests and grants) is the same whatever the load.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from procs import metric_value

from edge_server.node import Node

pytestmark = [pytest.mark.timeout(60)]

ROUNDS = 50  # gossip rounds per measured phase
KINDS = ("strict_delta", "strict_ack", "lease_request", "grant")


def _bytes(nodes: dict[str, tuple[Node, str]]) -> Counter[str]:
    """Strict bytes sent by every node, by kind, as their /metrics render them."""
    out: Counter[str] = Counter()
    for node, _url in nodes.values():
        text = node.metrics.render().decode()
        for kind in KINDS:
            out[kind] += metric_value(text, "edge_strict_bytes_total", direction="sent", kind=kind)
    return out


async def _phase(nodes: dict[str, tuple[Node, str]], keys: list[str], per_round: int) -> dict[str, float]:
    """``per_round`` requests at eu-1 after each of its gossip rounds, round-robin over ``keys``, for
    ``ROUNDS`` rounds: the strict bytes per round by kind, and ``requests`` per round (all allowed)."""
    node, _url = nodes["eu-1"]
    strict = node.strict
    assert strict is not None
    before, start = _bytes(nodes), strict.rounds
    sent = 0
    deadline = time.monotonic() + 20.0
    while strict.rounds - start < ROUNDS:
        assert time.monotonic() < deadline, "eu-1 stopped running gossip rounds"
        seen = strict.rounds
        writes = []
        for i in range(per_round):
            decision, written = node.decide(keys[i % len(keys)], 1, f"t-{seen}-{i}")
            assert decision.allowed
            sent += 1
            if written is not None:
                writes.append(written)
        await asyncio.gather(*writes)
        while strict.rounds == seen:
            await asyncio.sleep(0.002)
    rounds = strict.rounds - start
    after = _bytes(nodes)
    return {"requests": sent / rounds, **{k: (after[k] - before[k]) / rounds for k in KINDS}}


@pytest.mark.parametrize("strict_nodes", [(5000, 5000)], indirect=True)  # no key ever runs short
async def test_strict_traffic_grows_with_active_keys_not_with_requests(
        strict_nodes: dict[str, tuple[Node, str]]) -> None:
    node, _url = strict_nodes["eu-1"]
    strict = node.strict
    assert strict is not None
    deadline = time.monotonic() + 8.0
    while not strict.table.lease.valid(strict.clock()):
        assert time.monotonic() < deadline, "eu-1 got no lease"
        await asyncio.sleep(0.02)
    few = [f"busy-{i}" for i in range(4)]
    many = [f"busy-{i}" for i in range(16)]
    idle = [f"idle-{i}" for i in range(60)]
    await _phase(strict_nodes, many + idle, len(many + idle))  # every key exists; peers have seen them
    await _phase(strict_nodes, few, 0)  # and its spends went out

    slow = await _phase(strict_nodes, few, 4)
    fast = await _phase(strict_nodes, few, 16)
    wide = await _phase(strict_nodes, many, 16)
    assert fast["requests"] > 3 * slow["requests"]  # per round: 4x the load, unless rounds were missed
    assert slow["strict_delta"] > 0
    # Four times the requests on the same keys, with 60 idle keys in the table: about the same bytes.
    assert fast["strict_delta"] < 1.25 * slow["strict_delta"], (slow, fast)  # measured 1.12x
    # Four times the busy keys at the same requests: the deltas grow with the keys.
    # (Measured 3.1x: 200 and 617 bytes a round -- each busy key's spends go out every few rounds.)
    assert wide["strict_delta"] > 1.6 * fast["strict_delta"], (fast, wide)
    # The lease traffic does not follow the load at all.
    lease = {name: ph["lease_request"] + ph["grant"] for name, ph in (("slow", slow), ("fast", fast))}
    assert lease["fast"] < 1.25 * lease["slow"], lease
