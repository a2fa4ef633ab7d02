"""The adaptive in-flight limit (edge_server.admission.AdaptiveLimit): its control law on a manual
clock, and in real processes: a node whose loop lags under a burst answers part of it with quick 503s
and Retry-After instead of letting every request wait, and a router whose own loop stalled sheds the
next arrivals.  Behaviour only; figures are printed, never asserted."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import test_router
from test_router_overload import audit_ids

from edge_server.admission import QUEUE_FULL, QUEUE_STALLED, QUEUE_TIMEOUT, AdaptiveLimit, Gate

make_nodes = test_router.make_nodes  # the fixtures of test_router.py, shared rather than copied
run_router = test_router.run_router


def _held(gate: Gate, n: int) -> None:
    for _ in range(n):
        assert gate.try_enter()


def test_a_lag_that_lasts_an_interval_cuts_the_limit_below_the_slots_held() -> None:
    gate = Gate(limit=100, queue_max=0, queue_timeout_s=0.0)
    ctl = AdaptiveLimit(gate, target_s=0.05, interval_s=0.1, min_limit=4)
    _held(gate, 40)
    ctl.observe(10.00, 0.06)  # above the target, but for 60 ms only: a burst, no cut yet
    assert gate.limit == 100
    ctl.observe(10.05, 0.06)  # above since 9.94: more than an interval
    assert gate.limit == 36 and ctl.cuts == 1  # 0.9 x the 40 held
    assert not gate.try_enter()  # no admission until fewer than 36 are held
    ctl.observe(10.10, 0.5)  # less than an interval since the cut: no second cut yet
    assert gate.limit == 36
    ctl.observe(10.16, 0.5)
    assert gate.limit == 32
    for t in (10.27, 10.38, 10.49, 10.60):  # the lag lasts and nothing was ever seen working well: cut on
        ctl.observe(t, 0.5)
    assert gate.limit == 19 and ctl.cuts == 6


def test_no_cut_goes_below_nine_tenths_of_what_recently_worked_and_that_figure_fades() -> None:
    gate = Gate(limit=100, queue_max=0, queue_timeout_s=0.0)
    ctl = AdaptiveLimit(gate, target_s=0.05, interval_s=0.1, min_limit=4, good_half_life_s=5.0)
    _held(gate, 40)
    ctl.observe(9.0, 0.0)  # 40 held while the loop kept up
    for t in (10.0, 10.11, 10.22, 10.33):  # then a lag that cutting does not cure (the machine is busy)
        ctl.observe(t, 0.5)
    assert gate.limit == 36 and ctl.cuts == 1  # 0.9 x 40, and no lower
    for _ in range(30):
        gate.leave()  # 10 held
    ctl.observe(10.4, 0.0)  # the lag is gone: what worked fades, but only while the loop keeps up
    ctl.observe(15.4, 0.0)
    _held(gate, 25)  # 35 held
    ctl.observe(16.0, 0.5)
    assert gate.limit == 31  # 0.9 x 35 held; the floor, 0.9 x ~20, is below it


def test_no_cut_without_held_slots_and_growth_only_under_pressure() -> None:
    gate = Gate(limit=50, queue_max=0, queue_timeout_s=0.0)
    ctl = AdaptiveLimit(gate, target_s=0.05, interval_s=0.1, min_limit=8)
    _held(gate, 3)
    ctl.observe(1.0, 2.0)  # a stall at start-up with almost nothing in flight: not caused by admissions
    assert gate.limit == 50 and ctl.cuts == 0
    _held(gate, 47)
    ctl.observe(2.0, 0.5)
    assert gate.limit == 45
    ctl.observe(2.2, 0.0)  # lag gone, the limit is binding (all 45 held): it grows, slowly
    assert gate.limit == 49
    for _ in range(49):
        gate.leave()  # nearly idle: nobody presses against the limit
    ctl.observe(2.4, 0.0)
    assert gate.limit == 49
    assert asyncio.run(_refused(gate)) == QUEUE_FULL  # an arrival that found no slot ...
    ctl.observe(2.6, 0.0)  # ... is pressure (and the limit never grows past max_inflight)
    assert gate.limit == 50


async def _refused(gate: Gate) -> str | None:
    """One arrival at a gate that is full for it (limit temporarily 0)."""
    limit = gate.limit
    gate.limit = 0
    try:
        return await gate.enter()
    finally:
        gate.limit = limit


async def test_a_lowered_limit_cuts_nobody_off_and_a_raised_one_admits_the_queue() -> None:
    gate = Gate(limit=3, queue_max=5, queue_timeout_s=5.0)
    _held(gate, 3)
    gate.set_limit(1)
    waiter = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    gate.leave()  # 2 held > the limit 1: the slot is given back, not handed on
    assert gate.inflight == 2 and gate.queued == 1 and not waiter.done()
    gate.set_limit(4)  # room again: the waiter gets its slot at once
    assert await waiter is None and gate.inflight == 3 and gate.queued == 0
    assert gate.shed == {QUEUE_FULL: 0, QUEUE_TIMEOUT: 0, QUEUE_STALLED: 0}


def test_requests_finishing_alone_do_not_raise_the_limit() -> None:
    gate = Gate(limit=1000, queue_max=0, queue_timeout_s=0.0)
    ctl = AdaptiveLimit(gate, target_s=0.05, interval_s=0.1, min_limit=4)
    _held(gate, 800)
    ctl.observe(5.0, 0.3)
    assert gate.limit == 720
    for _ in range(500):
        gate.leave()  # most requests finished during the stall
    ctl.observe(5.2, 0.0)
    assert gate.limit == 720  # 300 held of 720, no arrival refused: no growth
    _held(gate, 348)  # 648 held: nine tenths of the limit, so it is binding
    ctl.observe(5.4, 0.0)
    assert gate.limit == 792


@pytest.mark.integration
async def test_a_node_sheds_part_of_a_burst_that_lags_its_loop(make_nodes: Any) -> None:
    # Every call burns 20 ms of the node's CPU (its loop): 150 arrivals in ~1 s are three times what
    # the loop can do.  A static limit of 10,000 would admit them all and each would wait behind the rest.
    nodes = await make_nodes({"eu": ["eu-1"]}, skill={"median_ms": 300, "p99_ms": 300, "cpu_us": 20_000},
                             server={"lag_target_ms": 20, "lag_interval_ms": 50, "min_inflight": 2})
    node = f"http://127.0.0.1:{nodes.ports['eu-1']}"
    answers: list[tuple[int, dict[str, str], Any, float]] = []

    async def invoke(s: aiohttp.ClientSession, i: int) -> None:
        await asyncio.sleep(i / 150)
        sent = time.monotonic()
        async with s.post(node + "/v1/skills/rating/invoke", json={"i": i},
                          headers={"Authorization": "Bearer key-acme"}) as r:
            answers.append((r.status, dict(r.headers), await r.json(), time.monotonic() - sent))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        await asyncio.gather(*(invoke(s, i) for i in range(150)))
        async with s.get(node + "/metrics") as r:
            metrics = await r.text()
    served = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] != 200]
    assert served and shed, f"{len(served)} served, {len(shed)} shed"
    assert all(a[0] == 503 and a[2]["error"]["code"] == "overloaded" and a[1]["Retry-After"] == "1"
               and a[1]["X-Edge-Shed"] in (QUEUE_FULL, QUEUE_TIMEOUT, QUEUE_STALLED) for a in shed)
    assert len(await audit_ids(node)) == len(served)  # a shed request is neither a skill call nor a token
    cuts = [float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith("edge_inflight_limit_cuts_total")]
    assert cuts and cuts[0] >= 1
    print(f"\nnode burst: {len(served)} served (median {sorted(a[3] for a in served)[len(served) // 2]:.3f} s), "
          f"{len(shed)} shed (median {sorted(a[3] for a in shed)[len(shed) // 2] * 1000:.1f} ms), cuts {cuts[0]:g}")


@pytest.mark.integration
async def test_a_router_whose_loop_stalled_sheds_the_next_arrivals_and_serves_the_admitted(
        make_nodes: Any, run_router: Any) -> None:
    nodes = await make_nodes({"eu": ["eu-1"]}, skill={"median_ms": 400, "p99_ms": 400}, lag_target_ms=20,
                             lag_interval_ms=100, min_inflight=2)
    router, url = await run_router(nodes)
    assert router.adaptive is not None
    answers: list[tuple[str, int, dict[str, str], Any]] = []

    async def invoke(s: aiohttp.ClientSession, tag: str, i: int) -> None:
        async with s.post(url + "/v1/skills/rating/invoke", json={"i": i},
                          headers={"Authorization": "Bearer key-acme", "X-Client-Region": "eu"}) as r:
            answers.append((tag, r.status, dict(r.headers), await r.json()))

    async with aiohttp.ClientSession() as s:
        first = [asyncio.create_task(invoke(s, "before", i)) for i in range(20)]
        await test_router.wait_for(lambda: router.gate.inflight == 20, 5.0, "20 requests in flight")
        node = f"http://127.0.0.1:{nodes.ports['eu-1']}"
        for _ in range(200):  # bounded: until the node holds all 20 (the tries were written before the stall)
            async with s.get(node + "/metrics") as r:
                if "edge_inflight 20.0" in await r.text():
                    break
            await asyncio.sleep(0.01)
        time.sleep(0.3)  # noqa: ASYNC251 -- the point: the router's own loop stalls with 20 in flight
        await asyncio.sleep(0.02)  # the limit's task sees the stall
        after = [asyncio.create_task(invoke(s, "after", i)) for i in range(20)]
        await asyncio.gather(*first, *after)
        async with s.get(url + "/metrics") as r:
            metrics = await r.text()
    before = [a for a in answers if a[0] == "before"]
    later = [a for a in answers if a[0] == "after"]
    assert {a[1] for a in before} == {200}, [a[3] for a in before]  # a lower limit cuts nobody off
    shed = [a for a in later if a[1] != 200]
    assert shed, "no arrival was shed after the stall"
    assert all(a[1] == 503 and a[3]["error"]["code"] == "router_overloaded" and a[2]["Retry-After"] == "1"
               for a in shed)
    assert router.adaptive.cuts >= 1 and "router_inflight_limit_cuts_total" in metrics
    assert len(await audit_ids(node)) == 20 + len(later) - len(shed)
    print(f"\nrouter stall: limit {router.gate.limit}, {len(shed)} of 20 later arrivals shed")
