"""The load generator against a small real aiohttp server on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from workbench.history import RequestRecord
from workbench.run.load.generator import LoadGenerator, LoadPlan, run_load, status_class
from workbench.spec.parts import LoadSpec

pytestmark = pytest.mark.timeout(60)

_RUN_KEYS = {f for f in LoadPlan.__dataclass_fields__ if f != "load"}


def plan(**kw: object) -> LoadPlan:
    """A plan from flat keywords: run-time ones go to LoadPlan, the traffic shape to the scenario's
    LoadSpec (here on the check route with constant arrivals unless said otherwise)."""
    run = {k: v for k, v in kw.items() if k in _RUN_KEYS}
    shape = {"route": "check", "arrival": "constant", **{k: v for k, v in kw.items() if k not in _RUN_KEYS}}
    return LoadPlan(load=LoadSpec(**shape), **run)  # type: ignore[arg-type]


@dataclass
class Target:
    """What the test server saw, and a switch to make it stall."""

    url: str = ""
    seen: list[dict[str, str]] = field(default_factory=list)
    stall: tuple[float, float] = (0.0, 0.0)  # monotonic window in which every request sleeps
    stall_s: float = 0.2
    stalled: set[str] = field(default_factory=set)  # X-Request-Id of every request that slept
    inflight: int = 0
    max_inflight: int = 0


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target()

    async def handle(request: web.Request) -> web.Response:
        t.inflight += 1
        t.max_inflight = max(t.max_inflight, t.inflight)
        try:
            body = json.loads(await request.read() or b"{}")
            t.seen.append(
                {
                    "path": request.path,
                    "region": request.headers.get("X-Client-Region", ""),
                    "auth": request.headers.get("Authorization", ""),
                    "key": str(body.get("key", "")),
                    "cost": str(body.get("cost", "")),
                }
            )
            request_id = str(len(t.seen))
            if t.stall[0] <= time.monotonic() < t.stall[1]:
                t.stalled.add(request_id)
                await asyncio.sleep(t.stall_s)
            headers = {
                "X-Edge-Region": request.headers.get("X-Client-Region", ""),
                "X-Edge-Node": "n-1",
                "X-Request-Id": request_id,
            }
            return web.json_response({"allowed": True}, headers=headers)
        finally:
            t.inflight -= 1

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    t.url = f"http://127.0.0.1:{port}"
    yield t
    await runner.cleanup()


async def test_open_loop_sends_the_requested_count(target: Target) -> None:
    res = await run_load(plan(url=target.url, rate_rps=100, duration_s=1.0))
    assert res.complete and res.sent == 100 and len(res.records) == 100
    assert all(r.status == 200 and r.node == "n-1" for r in res.records)
    intended = sorted(r.intended_s for r in res.records)
    assert intended[:3] == pytest.approx([0.0, 0.01, 0.02])
    assert res.latency["2xx"].get_total_count() == 100
    assert res.lag.get_total_count() == 100
    assert all(r.intended_s <= r.start_s <= r.end_s for r in res.records)
    assert res.summary()["counts"]["2xx"] == 100


async def test_max_requests_and_poisson_arrivals_are_bounded(target: Target) -> None:
    res = await run_load(plan(url=target.url, rate_rps=1000, duration_s=5, max_requests=40))
    assert res.sent == 40
    poisson = await run_load(plan(url=target.url, rate_rps=200, arrival="poisson", duration_s=1.0, seed=7))
    assert 140 <= poisson.sent <= 260
    gaps = [b.intended_s - a.intended_s for a, b in zip(poisson.records, poisson.records[1:], strict=False)]
    assert len({round(g, 4) for g in gaps}) > 50  # not evenly spaced


async def test_latency_counts_from_intended_time_through_a_stall(target: Target) -> None:
    """No coordinated omission: requests due while the server stalls carry the stall in their latency.

    Which requests slept is what the server says (by request id), not a guess from the clock: on a busy
    machine a request due near the window's end can reach the handler after it and not sleep at all."""
    t0 = time.monotonic()
    target.stall = (t0 + 0.5, t0 + 0.8)
    res = await run_load(plan(url=target.url, rate_rps=200, duration_s=1.5))
    assert res.sent == 300  # the schedule did not slow down while the server stalled
    stalled = [r for r in res.records if r.request_id in target.stalled]
    others = sorted(r.latency_ms / 1000 for r in res.records if r.request_id not in target.stalled)
    assert len(stalled) >= 45 and len(stalled) == len(target.stalled)
    # sleep() may return up to a timer tick early; never 5 ms early
    assert min(r.latency_ms / 1000 for r in stalled) >= target.stall_s - 0.005
    assert others[len(others) // 2] < 0.05
    # The histogram agrees: >= 15 % of requests took >= 200 ms, so p90 reflects the stall.
    assert res.percentiles_ms("all", (90,))["p90"] >= 190


async def test_zipf_keys_are_skewed_and_uniform_are_not(target: Target) -> None:
    tenants = 20
    spec = plan(url=target.url, rate_rps=2000, duration_s=0.5, tenants=tenants, key_dist="zipf", zipf_s=1.2)
    res = await run_load(spec)
    counts = collections.Counter(r.key for r in res.records)
    assert counts == collections.Counter(s["key"] for s in target.seen)  # check route: the body key
    norm = sum(1 / (i + 1) ** 1.2 for i in range(20))
    assert counts["tenant-0000"] / res.sent == pytest.approx(1 / norm, abs=0.06)  # ~0.33
    assert counts["tenant-0000"] > 5 * counts["tenant-0019"]
    uniform = await run_load(plan(url=target.url, rate_rps=2000, duration_s=0.5, tenants=tenants, seed=1))
    ucounts = collections.Counter(r.key for r in uniform.records)
    assert max(ucounts.values()) < 3 * min(ucounts.values())


async def test_region_weights_and_headers(target: Target) -> None:
    spec = plan(url=target.url, rate_rps=2000, duration_s=0.5, region_weights={"eu": 3, "us": 1, "ap": 0})
    res = await run_load(spec)
    homes = collections.Counter(r.home_region for r in res.records)
    assert homes["ap"] == 0
    assert homes["eu"] / res.sent == pytest.approx(0.75, abs=0.06)
    assert all(r.answered_region == r.home_region for r in res.records)  # X-Edge-Region recorded
    assert collections.Counter(s["region"] for s in target.seen) == homes


async def test_invoke_route_sends_bearer_keys(target: Target) -> None:
    keys = {"tenant-0000": "key-acme", "tenant-0001": "key-globex"}
    spec = plan(url=target.url, route="invoke", skill="rating", tenants=2, api_keys=keys, rate_rps=200,
                duration_s=0.3, cost=2)
    res = await run_load(spec)
    assert {s["path"] for s in target.seen} == {"/v1/skills/rating/invoke"}
    assert {s["auth"] for s in target.seen} <= {"Bearer key-acme", "Bearer key-globex"}
    assert all(s["cost"] == "2" for s in target.seen)
    assert all(r.key in keys and r.cost == 2 for r in res.records)
    with pytest.raises(ValueError, match="api_keys"):
        plan(url=target.url, route="invoke", tenants=3, api_keys=keys)


async def test_closed_loop_users_with_think_time(target: Target) -> None:
    res = await run_load(plan(url=target.url, mode="closed", users=2, think_ms=100, duration_s=1.0))
    assert 14 <= res.sent <= 22  # 2 users x ~10 cycles of (answer + 100 ms)
    assert target.max_inflight <= 2
    assert res.complete and all(r.status == 200 for r in res.records)


async def test_stop_event_returns_partial_results(target: Target) -> None:
    stop = asyncio.Event()
    seen: list[RequestRecord] = []
    asyncio.get_running_loop().call_later(0.3, stop.set)
    t = time.monotonic()
    res = await run_load(plan(url=target.url, rate_rps=100, duration_s=20), stop=stop, on_record=seen.append)
    assert time.monotonic() - t < 2
    assert not res.complete
    assert 15 <= res.sent <= 45 and len(seen) == len(res.records) == res.sent


async def test_cancel_keeps_partial_results_on_the_generator(target: Target) -> None:
    target.stall = (0.0, float("inf"))  # every request hangs: cancelled ones must still be recorded
    target.stall_s = 10
    gen = LoadGenerator(plan(url=target.url, rate_rps=50, duration_s=20))
    task = asyncio.create_task(gen.run())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    res = gen.result
    assert not res.complete and res.sent >= 10
    assert all(r.status == 0 and "cancelled" in r.error for r in res.records)
    assert res.latency["error"].get_total_count() == res.sent


async def test_connection_errors_are_status_zero() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = await run_load(plan(url=f"http://127.0.0.1:{port}", rate_rps=50, duration_s=0.2, timeout_s=1))
    assert res.sent == 10
    assert all(r.status == 0 and r.error for r in res.records)
    assert status_class(0) == "error" and status_class(429) == "429" and status_class(503) == "5xx"


def test_plan_validation_and_round_trip() -> None:
    spec = plan(url="http://127.0.0.1:1", region_weights={"eu": 1.0}, tenants=2, key_dist="zipf")
    assert LoadPlan.from_dict(spec.to_dict()) == spec
    assert spec.tenants == ("tenant-0000", "tenant-0001") and spec.region_weights == {"eu": 1.0}
    assert plan(url="x", regions=("eu", "us")).region_weights == {"eu": 1.0, "us": 1.0}
    with pytest.raises(ValueError, match="unknown load plan keys"):
        LoadPlan.from_dict({"url": "x", "rps": 3})
    with pytest.raises(ValueError, match=r"load\.rate_rps"):
        plan(url="x", rate_rps=-1)
    with pytest.raises(ValueError, match=r"load\.mode"):
        plan(url="x", mode="sideways")
    with pytest.raises(ValueError, match="duration_s"):
        plan(url="x", duration_s=0)


def test_records_cross_the_pipe_as_named_fields() -> None:
    from workbench.history.records import rows_from_wire, rows_to_wire

    rec = RequestRecord(0.1, 0.1, 0.2, "eu", "eu", "eu-1", "k", 1, 200, "", "r-1", "check", True, "")
    wire = rows_to_wire(RequestRecord, [rec])
    assert rows_from_wire(RequestRecord, wire) == [rec]
    wire["fields"] = wire["fields"][::-1]  # another version of the record: refused, not mixed up
    with pytest.raises(ValueError, match="RequestRecord"):
        rows_from_wire(RequestRecord, wire)


async def test_processes_merge_histograms_and_records(target: Target) -> None:
    res = await asyncio.wait_for(run_load(plan(url=target.url, rate_rps=100, duration_s=1.0, processes=2)), 40)
    assert res.complete and res.sent == 100 and len(res.records) == 100
    assert res.latency["2xx"].get_total_count() == 100 and res.lag.get_total_count() == 100
    intended = [r.intended_s for r in res.records]
    assert intended == sorted(intended)
    assert len({round(x, 4) for x in intended}) == 100  # the two processes are staggered, not doubled


async def test_processes_send_back_results_larger_than_a_pipe_buffer(target: Target) -> None:
    """Thousands of records (far over the 64 KiB pipe buffer) once failed with EAGAIN and were lost."""
    res = await asyncio.wait_for(run_load(plan(url=target.url, rate_rps=1500, duration_s=1.0, processes=2)), 60)
    assert res.complete and res.sent == 1500 and len(res.records) == 1500


async def test_processes_stop_returns_partial_results(target: Target) -> None:
    stop = asyncio.Event()
    spec = plan(url=target.url, rate_rps=100, duration_s=30, processes=2)
    task = asyncio.create_task(run_load(spec, stop=stop))
    while not target.seen:  # both processes spawned and sending
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    stop.set()
    res = await asyncio.wait_for(task, 10)
    assert not res.complete
    assert 10 <= res.sent < 1000 and len(res.records) == res.sent


async def test_processes_hand_every_record_to_on_record_when_the_plan_keeps_none(target: Target) -> None:
    """A drill keeps no records in the generator (it records them itself, through on_record): with two
    generator processes the records were once dropped, and the drill recorded no request at all."""
    seen: list[RequestRecord] = []
    spec = plan(url=target.url, rate_rps=100, duration_s=1.0, processes=2, keep_records=False)
    res = await asyncio.wait_for(run_load(spec, on_record=seen.append), 40)
    assert res.sent == 100 and len(seen) == 100 and res.records == []
    assert all(isinstance(r, RequestRecord) and r.route == "check" for r in seen)


async def test_open_loop_drains_and_marks_what_the_end_cut_off(target: Target) -> None:
    """Requests sent shortly before the end are waited for; only those the drain gave up on are
    recorded as cut at the end, which the error budget does not count and the counter check keeps."""
    from workbench.check import check_error_budget, unknown_outcome
    from workbench.history import CUT_AT_END, Recording

    target.stall, target.stall_s = (time.monotonic() + 0.7, float("inf")), 0.8  # the last ~0.3 s are slow
    short = await run_load(plan(url=target.url, rate_rps=40, duration_s=1.0, timeout_s=5, drain_s=0.2))
    slow = [r for r in short.records if r.start_s >= 0.75]
    cut = [r for r in short.records if r.cut_at_end]
    assert short.complete and short.sent == 40 and len(short.records) == 40
    assert slow and set(map(id, slow)) <= set(map(id, cut)), "a request slower than the drain was not cut"
    assert short.cut_at_end == len(cut) and short.summary()["cut_at_end"] == len(cut)
    assert all(r.status == 0 and r.error.startswith(f"{CUT_AT_END}: no answer within the 0.2 s drain")
               for r in cut)
    assert all(r.status == 200 for r in short.records if not r.cut_at_end)
    rec = Recording(requests=short.records, complete=True)
    v = check_error_budget(rec)
    assert v.ok and v.figures["cut_at_end"] == len(cut) and v.figures["total"] == 0
    assert sum(1 for r in rec.requests if unknown_outcome(r)) == len(cut)

    # the default drain waits up to the request timeout: the same slow tail is answered, nothing is cut
    target.stall = (time.monotonic() + 0.7, float("inf"))
    full = await run_load(plan(url=target.url, rate_rps=40, duration_s=1.0, timeout_s=2))
    assert full.sent == 40 and full.cut_at_end == 0
    assert all(r.status == 200 for r in full.records)
    assert max(r.end_s for r in full.records) > 1.0 + 0.5  # answers came after the window closed


async def test_a_stop_cuts_what_is_in_flight_with_its_own_reason(target: Target) -> None:
    from workbench.check import is_error

    target.stall, target.stall_s = (0.0, float("inf")), 5
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, stop.set)
    res = await run_load(plan(url=target.url, rate_rps=50, duration_s=20), stop=stop)
    assert not res.complete and res.sent >= 10 and res.cut_at_end == res.sent
    assert all(r.error == "cut at end: the run was stopped" and not is_error(r) for r in res.records)
