"""A hedged check on a slow but alive node: two grants for one request id, counted by the router and
found by the workbench checker (``edge_server/hedge_watch.py``); a node paused past its try's deadline
grants nothing.

The slow node is real: a node process SIGSTOPped while the router's first try waits on it, continued
after the hedge answered but before the try's ``X-Edge-Deadline-Ms`` (twice the per-try timeout), so it
grants the request it finds in its socket.  No timing target is asserted: the margins are 200 ms either
side of the per-try timeout and the deadline, and the asserted facts are counts and audit events.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp
import pytest
import test_router
from procs import metric_value
from test_router import THREE, wait_for

from workbench.check import check_token_loss
from workbench.history import AuditEvent, FaultRecord, Recording, RequestRecord, RouterSample

pytestmark = pytest.mark.integration
make_nodes = test_router.make_nodes
run_router = test_router.run_router

PER_TRY_MS = 400.0  # the hedge after 0.4 s; the first try's deadline 0.8 s after it was sent
CHECK = "/v1/limits/check"


async def audit(s: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with s.get(base + "/v1/audit?limit=10000") as r:
        assert r.status == 200
        return list((await r.json())["events"])


async def hedged_check(s: aiohttp.ClientSession, url: str, rid: str) -> tuple[int, dict[str, Any], Any]:
    async with s.post(url + CHECK, json={"key": "hedge"}, headers={"X-Client-Region": "eu", "X-Request-Id": rid},
                      timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status, dict(r.headers), await r.json()


async def test_a_slow_node_that_grants_after_the_hedge_is_a_counted_double_grant(make_nodes: Any,
                                                                                 run_router: Any) -> None:
    nodes = await make_nodes(THREE, health_interval_ms=1000, check_try_timeout_ms=PER_TRY_MS)
    router, url = await run_router(nodes)
    eu = nodes.procs["eu-1"]
    base = {n: f"http://127.0.0.1:{p}" for n, p in nodes.ports.items()}
    t0 = time.time()
    try:
        async with aiohttp.ClientSession() as s:
            status, _, _ = await hedged_check(s, url, "warm-1")  # a pooled connection to eu-1
            assert status == 200
            # 1. Slow but alive: stopped before the try reaches it, continued before its deadline.
            os.kill(eu.pid, signal.SIGSTOP)
            try:
                sent = time.time()
                answer = asyncio.create_task(hedged_check(s, url, "dg-1"))
                await asyncio.sleep(1.5 * PER_TRY_MS / 1000)  # the hedge went to us-1 at 0.4 s
            finally:
                os.kill(eu.pid, signal.SIGCONT)
            status, headers, doc = await answer
            ended = time.time()
            assert status == 200 and doc["allowed"] is True
            assert headers.get("X-Router-Retried") == "eu-1" and headers.get("X-Edge-Node") != "eu-1"
            await wait_for(lambda: router.counters["double_grants"] == 1, 5.0, "the router to count the double grant")
            granted_by = {n for n in ("eu-1", "us-1", "ap-1")
                          if any(e["request_id"] == "dg-1" for e in await audit(s, base[n]))}
            assert granted_by == {"eu-1", headers["X-Edge-Node"]}  # two nodes, one request id
            async with s.get(url + "/metrics") as r:
                text = await r.text()
            assert metric_value(text, "router_hedge_losers_total", route=CHECK, result="double_grant") == 1
            async with s.get(url + "/v1/router/state") as r:
                state = await r.json()
            assert [d["request_id"] for d in state["double_grants_recent"]] == ["dg-1"]
            assert sorted(state["double_grants_recent"][0]["nodes"]) == sorted(granted_by)
            events = [AuditEvent.from_json(e) for n in ("eu-1", "us-1", "ap-1") for e in await audit(s, base[n])]

            # 2. Paused past the deadline: the hedge answers, the router stops following the loser, and
            # the node, once continued, refuses the late try without granting.
            await wait_for(lambda: router.nodes["eu-1"].evidence is None, 5.0, "a good check to clear eu-1")
            os.kill(eu.pid, signal.SIGSTOP)
            try:
                answer = asyncio.create_task(hedged_check(s, url, "late-1"))
                status, _, _ = await answer
                assert status == 200
                await asyncio.sleep(4 * PER_TRY_MS / 1000)  # past the deadline and the watch
            finally:
                os.kill(eu.pid, signal.SIGCONT)

            async def refused() -> bool:
                async with s.get(base["eu-1"] + "/metrics") as r:
                    return metric_value(await r.text(), "edge_overload_shed_total", reason="deadline") >= 1

            for _ in range(100):  # bounded: 100 x 50 ms
                if await refused():
                    break
                await asyncio.sleep(0.05)
            assert await refused(), "the continued node never refused the late try"
            assert not any(e["request_id"] == "late-1" for e in await audit(s, base["eu-1"]))
            assert router.counters["double_grants"] == 1
    finally:
        if eu.poll() is None:  # never leave it stopped (make_nodes kills it afterwards)
            os.kill(eu.pid, signal.SIGCONT)

    # 3. The checker, on a history of the double grant: a pause of eu-1 around it would excuse a grant
    # lost with its node (an orphan) -- but the router saw both nodes answer, so it is a double grant.
    def history(with_router: bool) -> Recording:
        rec = Recording(started_wall=t0)
        rec.faults = [FaultRecord(sent - t0, "pause", "eu-1"),
                      FaultRecord(sent - t0 + 1.5 * PER_TRY_MS / 1000, "resume", "eu-1")]
        rec.requests = [RequestRecord(sent - t0, sent - t0, ended - t0, "eu", "us", headers["X-Edge-Node"], "hedge",
                                      status=200, request_id="dg-1", route="check", allowed=True,
                                      retried_from="eu-1")]
        rec.audit = [e for e in events if e.request_id == "dg-1"]
        if with_router:
            rec.routers = [RouterSample(ended - t0, {}, ["dg-1"])]
        return rec

    excused = check_token_loss(history(with_router=False))
    assert excused.figures["orphaned_at_kill"] == 1 and excused.figures["double_grants"] == 0
    found = check_token_loss(history(with_router=True))
    assert found.figures["double_grants"] == 1 and found.figures["orphaned_at_kill"] == 0
    assert found.figures["double_grants_after_retry"] == 1 and found.figures["router_double_grants_listed"] == 1
    assert found.figures["router_double_grants_not_audited"] == 0
    assert not found.ok and any("granted more than once" in r for r in found.reasons)
