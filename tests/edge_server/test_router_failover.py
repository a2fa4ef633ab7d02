"""Failover on the request path: what the router retries after a node dies or falls silent, and what it
does not (``docs/router.md``, "What is retried").

Pure rules first (manual clock): a check still unanswered after ``health_suspect_ms`` demotes its node
without any step towards an ejection; a pooled connection found closed before the request was written
is no evidence, is retried on every route and asks for an out-of-turn check.  Then real node
processes (the ``make_nodes`` fixture of ``test_router.py``, killed and reaped also on failure): after
a ``kill -9`` every check and every skill call sent through the router succeeds, the skill calls
refused at connect having been retried elsewhere; after a SIGSTOP, skill calls sent once the router
routes the region elsewhere all succeed.  No test asserts a timing.
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
from test_router import THREE, ManualClock, all_healthy, check, make_router, wait_for

from edge_server.router import _NOT_REACHED
from edge_server.router_health import NOT_WRITTEN, CheckResult, classify

make_nodes = test_router.make_nodes  # the fixtures of test_router.py, shared rather than copied
run_router = test_router.run_router
INVOKE = "/v1/skills/rating/invoke"
AUTH = {"Authorization": "Bearer key-acme"}


# ------------------------------------------------------------------------------ pure rules


def test_a_slow_check_demotes_its_node_until_an_answer_and_never_ejects_it() -> None:
    router = make_router(ManualClock())
    all_healthy(router)
    us = router.nodes["us-1"]
    t0 = time.monotonic() + 1  # checker clock, after the checks of all_healthy
    slow = CheckResult(False, "slow", "slow", None, t0, "no answer within 50 ms")
    for _ in range(5):  # however many: demotion only
        router.apply_check(us, slow)
    assert us.healthy and us.evidence == "check_slow" and us.fail == 0 and us.checks == 1
    assert router.pick("us").spec.region == "eu"  # its clients go to the next region at once
    assert router.counters["checks_slow"] == 1 and router.counters["ejections"] == 0
    router.apply_check(us, CheckResult(True, "ok", "ok", 1.0, t0))  # the slow check answered after all
    assert us.evidence is None and router.pick("us") is us
    router.apply_check(us, CheckResult(False, "slow", "slow", None, t0 - 0.5))  # older than that answer: stale
    assert us.evidence is None


def test_a_slow_check_keeps_stronger_evidence() -> None:
    router = make_router(ManualClock())
    all_healthy(router)
    us = router.nodes["us-1"]
    t0 = time.monotonic() + 1
    router.apply_check(us, CheckResult(False, "timeout", "unreachable", 250.0, t0))
    router.apply_check(us, CheckResult(False, "slow", "slow", None, t0 + 0.1))
    assert us.evidence == "check_timeout" and us.fail == 1
    router.apply_check(us, CheckResult(False, "timeout", "unreachable", 250.0, t0 + 0.2))  # fall = 2: out
    assert not us.healthy


def test_a_connection_found_closed_before_writing_is_retried_and_probed_but_no_evidence() -> None:
    exc = aiohttp.ClientConnectionResetError(NOT_WRITTEN)
    assert classify(exc) == "not_written" and "not_written" in _NOT_REACHED
    assert classify(aiohttp.ClientConnectionResetError("Connection lost")) == "reset"  # may have been written
    assert classify(aiohttp.ServerDisconnectedError()) == "reset"
    router = make_router(ManualClock())
    all_healthy(router)
    probed: list[str] = []
    router.probe = lambda spec: probed.append(spec.id)
    us = router.nodes["us-1"]
    router.try_failed(us, "not_written", str(exc))
    assert probed == ["us-1"] and us.evidence is None and us.healthy and router.pick("us") is us
    assert router.counters["not_written"] == 1


# ------------------------------------------------------------------------------ real processes


async def invoke(s: aiohttp.ClientSession, url: str, home: str) -> tuple[int, Any]:
    async with s.post(url + INVOKE, json={}, headers={**AUTH, "X-Client-Region": home}) as r:
        return r.status, r.headers.copy()


@pytest.mark.integration
async def test_after_a_kill9_every_check_and_skill_call_succeeds_and_refused_calls_are_retried(
        make_nodes: Any, run_router: Any) -> None:
    # No active checks during the test: only the request path can see the death.
    nodes = await make_nodes(THREE, health_interval_ms=60_000, eject_ms=60_000)
    router, url = await run_router(nodes)
    async with aiohttp.ClientSession() as s:
        for _ in range(3):  # warm pooled connections to eu-1 on both routes
            assert (await check(s, url, "eu"))[1]["X-Edge-Node"] == "eu-1"
            assert (await invoke(s, url, "eu"))[0] == 200
        nodes.kill9("eu-1")  # reaped: its sockets are closed before anything below is sent
        await asyncio.sleep(0.05)  # let the router's loop see its pooled connections close
        first_status, first = await invoke(s, url, "eu")
        statuses: list[int] = [first_status]
        regions: set[str] = set()
        deadline = time.monotonic() + 5
        for i in range(40):  # bounded in count and time
            if time.monotonic() > deadline:
                break
            status, headers, _ = await check(s, url, "eu", key=f"k{i % 4}")
            statuses.append(status)
            regions.add(headers.get("X-Edge-Region", "-"))
            status, headers = await invoke(s, url, "eu")
            statuses.append(status)
            regions.add(headers.get("X-Edge-Region", "-"))
    assert first_status == 200 and first["X-Router-Retried"] == "eu-1", first
    assert first["X-Router-Retry-Reason"] == "refused" and first["X-Edge-Region"] == "us"
    assert set(statuses) == {200}, statuses
    assert regions == {"us"}  # the next-nearest region, and never the dead one again
    eu = router.nodes["eu-1"]
    assert not eu.healthy and eu.evidence == "refused" and router.counters["retried"] == 1


@pytest.mark.integration
async def test_skill_calls_sent_once_a_paused_region_is_demoted_all_succeed(make_nodes: Any,
                                                                             run_router: Any) -> None:
    nodes = await make_nodes(THREE, health_interval_ms=50)
    router, url = await run_router(nodes)
    pid = nodes.procs["eu-1"].pid
    try:
        async with aiohttp.ClientSession() as s:
            await wait_for(lambda: router.routing()["eu"] == "eu", 5, "eu-1 in rotation")
            assert (await invoke(s, url, "eu"))[0] == 200
            os.kill(pid, signal.SIGSTOP)
            await wait_for(lambda: router.routing()["eu"] != "eu", 5, "eu routed elsewhere after the pause")
            evidence = router.nodes["eu-1"].evidence
            statuses, regions = [], set()
            for _ in range(20):
                status, headers = await invoke(s, url, "eu")
                statuses.append(status)
                regions.add(headers.get("X-Edge-Region"))
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"\npaused eu-1: routed elsewhere on evidence {evidence!r} (slow checks so far: "
          f"{router.counters['checks_slow']}); {len(statuses)} skill calls after that, statuses {set(statuses)}")
    assert evidence is not None and set(statuses) == {200} and "eu" not in regions
