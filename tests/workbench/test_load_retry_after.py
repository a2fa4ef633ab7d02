"""Closed-loop users honour Retry-After after a shed; open loop keeps its schedule.

A small real aiohttp server on a loopback port sheds the first request it gets from each user (503
with ``Retry-After: 1``, the edge's quick shed) and answers the rest 200.  What is asserted is when
each user sent again, from the generator's own records (send times, with a wide margin), not how fast
anything was.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from workbench.history import RequestRecord
from workbench.run.load.generator import retry_after_s, run_load
from workbench.run.load.model import LoadPlan
from workbench.spec.parts import LoadSpec, ScenarioError
from workbench.spec.scenario import Scenario

pytestmark = pytest.mark.timeout(30)

USERS = 3


class Shedder:
    """Sheds the first ``shed_first`` requests, then answers 200; counts what it saw."""

    def __init__(self, shed_first: int) -> None:
        self.shed_first = shed_first
        self.seen = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen += 1
        if self.seen <= self.shed_first:
            return web.json_response({"error": {"code": "overloaded"}}, status=503,
                                     headers={"Retry-After": "1", "X-Edge-Shed": "queue_full"})
        return web.json_response({"allowed": True})


async def _serve(shed_first: int) -> AsyncIterator[Shedder]:
    s = Shedder(shed_first)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    s.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield s
    finally:
        await runner.cleanup()


@pytest.fixture
async def shed_each_user_once() -> AsyncIterator[Shedder]:
    async for s in _serve(USERS):
        yield s


@pytest.fixture
async def shed_all() -> AsyncIterator[Shedder]:
    async for s in _serve(10**9):
        yield s


def closed(url: str, duration_s: float, **load: object) -> LoadPlan:
    spec = LoadSpec(mode="closed", users=USERS, route="check", **load)  # type: ignore[arg-type]
    return LoadPlan(url=url, load=spec, duration_s=duration_s, timeout_s=2.0, max_requests=500)


def _after_shed(records: list[RequestRecord]) -> tuple[list[RequestRecord], list[RequestRecord]]:
    sheds = [r for r in records if r.status == 503]
    rest = [r for r in records if r.status != 503]
    return sheds, rest


async def test_closed_loop_user_waits_retry_after_before_sending_again(shed_each_user_once: Shedder) -> None:
    res = await run_load(closed(shed_each_user_once.url, 1.8))
    sheds, rest = _after_shed(res.records)
    # every user's first request was shed, and the shed is recorded as it came: a 503 with its code
    assert len(sheds) == USERS and all(r.error == "overloaded" for r in sheds)
    assert rest, "after the wait, the users sent again and were served"
    assert all(r.status == 200 for r in rest)
    # no user sent again before its Retry-After (1 s) was over (0.2 s of margin for the clock)
    first_next = min(r.start_s for r in rest)
    assert first_next >= max(r.end_s for r in sheds) + 0.8, (first_next, [r.end_s for r in sheds])


async def test_without_honor_retry_after_the_user_sends_again_at_once(shed_each_user_once: Shedder) -> None:
    res = await run_load(closed(shed_each_user_once.url, 0.6, honor_retry_after=False))
    sheds, rest = _after_shed(res.records)
    assert len(sheds) == USERS
    # no think time and no wait: the next requests went out well before the 1 s Retry-After
    assert rest and min(r.start_s for r in rest) < max(r.end_s for r in sheds) + 0.5
    assert len(rest) > USERS  # and the users kept going


async def test_open_loop_keeps_its_schedule_through_sheds(shed_all: Shedder) -> None:
    spec = LoadSpec(mode="open", rate_rps=40.0, arrival="constant", route="check")
    res = await run_load(LoadPlan(url=shed_all.url, load=spec, duration_s=0.5, timeout_s=2.0))
    # arrivals do not depend on answers: all 20 were sent although every one was shed
    assert res.sent == 20 and shed_all.seen == 20
    assert all(r.status == 503 for r in res.records)


def test_a_bad_honor_retry_after_names_the_field() -> None:
    for bad in ("yes", 1, None):
        with pytest.raises(ScenarioError, match=r"load\.honor_retry_after") as info:
            LoadSpec(mode="closed", honor_retry_after=bad)  # type: ignore[arg-type]
        assert "true or false" in str(info.value)
    base = Scenario.build(load_mode="closed").to_dict()
    raw = {**base, "load": {**base["load"], "honor_retry_after": "off"}}
    with pytest.raises(ScenarioError, match=r"load\.honor_retry_after"):
        Scenario.from_dict(raw)
    assert Scenario.from_dict(base).load.honor_retry_after is True


def test_retry_after_header_forms() -> None:
    assert retry_after_s("1") == 1.0
    assert retry_after_s(" 7 ") == 7.0
    assert retry_after_s(None) == 0.0 and retry_after_s("") == 0.0
    assert retry_after_s("soon") == 0.0 and retry_after_s("-1") == 0.0
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_s(later) <= 31
    assert retry_after_s(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0
