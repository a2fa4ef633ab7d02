"""The invoke route's commit protocol (``edge_server/commit.py``, ``docs/router.md``, "A skill call is
committed once"), with real node processes.

At a node (raw sockets, so the test controls every byte): ``Expect: 100-continue`` is answered
``100 Continue`` before anything is decided, and a body that never comes is dropped with no token spent;
a request whose connection closed while the node was paused is dropped before the decision; a skill
call whose caller left during it is counted.  Through the router: after a ``kill -9`` the skill calls
written to the dead node before its ``100 Continue`` are retried elsewhere while the one it had
committed is not; a blackholed node's pooled connection (the workbench's fault proxy) costs its skill
call a hedge, not an error, and the node never grants it after the heal.  Nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import aiohttp
import pytest
import test_router
from aiohttp.test_utils import TestServer
from procs import metric_value
from test_router import THREE

from edge_server.config import parse_cluster
from edge_server.router import Router
from edge_server.router_app import build_router_app
from workbench.run.faults.proxy import FaultProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
make_nodes = test_router.make_nodes  # the fixtures of test_router.py, shared rather than copied
run_router = test_router.run_router
INVOKE = "/v1/skills/rating/invoke"
AUTH = {"Authorization": "Bearer key-acme"}
SLOW_SKILL = {"median_ms": 300, "p99_ms": 400}  # long enough to close a connection or kill a node during it


def raw_invoke(request_id: str, body: bytes = b"{}", expect: str | None = "100-continue") -> bytes:
    """The head of a skill call as a client writes it (the body is sent separately)."""
    lines = [f"POST {INVOKE} HTTP/1.1", "Host: node", "Authorization: Bearer key-acme",
             "Content-Type: application/json", f"Content-Length: {len(body)}", f"X-Request-Id: {request_id}"]
    if expect is not None:
        lines.append(f"Expect: {expect}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def node_get(port: int, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}{path}") as r:
        return await (r.json() if path.startswith("/v1") else r.text())


async def audited_ids(port: int) -> set[str]:
    return {e["request_id"] for e in (await node_get(port, "/v1/audit?limit=10000"))["events"]}


async def metric(port: int, name: str, **labels: str) -> float:
    return metric_value(await node_get(port, "/metrics"), name, **labels)


async def eventually_metric(port: int, name: str, want: float, **labels: str) -> None:
    for _ in range(100):  # bounded: 5 s
        if await metric(port, name, **labels) >= want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {want}: {await metric(port, name, **labels)}")


async def test_a_node_answers_100_continue_first_and_drops_a_body_that_never_comes(make_nodes: Any) -> None:
    nodes = await make_nodes({"eu": ["eu-1"]}, skill=SLOW_SKILL)
    port = nodes.ports["eu-1"]
    # 1. Committed: 100 Continue, then the body, then the answer of the skill call.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_invoke("c-ok"))
    assert (await read_head(reader)).startswith(b"HTTP/1.1 100 Continue")
    assert "c-ok" not in await audited_ids(port)  # nothing decided before the body
    writer.write(b"{}")
    head = await read_head(reader)
    assert head.startswith(b"HTTP/1.1 200"), head
    writer.close()
    # 2. The body never comes (the router gave the call to another region): dropped, no token spent.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_invoke("c-gone"))
    assert (await read_head(reader)).startswith(b"HTTP/1.1 100 Continue")
    writer.close()
    await eventually_metric(port, "edge_invoke_dropped_total", 1, stage="uncommitted")
    # 3. An expectation the node cannot meet: 417 naming the header, before anything is read.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_invoke("c-bad", expect="200-ok"))
    head = await read_head(reader)
    assert head.startswith(b"HTTP/1.1 417"), head
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
    error = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))["error"]
    assert error["field"] == "Expect" and error["code"] == "expectation_failed"
    writer.close()
    ids = await audited_ids(port)
    assert "c-ok" in ids and "c-gone" not in ids and "c-bad" not in ids
    assert await metric(port, "edge_skill_calls_client_gone_total") == 0


async def test_a_paused_node_drops_what_its_caller_gave_up_and_counts_a_skill_call_nobody_reads(
        make_nodes: Any) -> None:
    nodes = await make_nodes({"eu": ["eu-1"]}, skill=SLOW_SKILL)
    port, pid = nodes.ports["eu-1"], nodes.procs["eu-1"].pid
    # A plain client (no Expect) sends to a paused node and gives up: the node finds the request and
    # the closed connection together when it resumes, and drops it before deciding.
    os.kill(pid, signal.SIGSTOP)
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)  # the kernel accepts for it
        writer.write(raw_invoke("p-gone", expect=None) + b"{}")
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
    await eventually_metric(port, "edge_invoke_dropped_total", 1, stage="before_decision")
    # A caller that leaves while its skill call runs: the call is made (the tokens are audited) and counted.
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw_invoke("p-left", expect=None) + b"{}")
    await writer.drain()
    await asyncio.sleep(0.1)  # decided at once; the skill takes ~300 ms
    writer.close()
    await eventually_metric(port, "edge_skill_calls_client_gone_total", 1)
    ids = await audited_ids(port)
    assert "p-gone" not in ids and "p-left" in ids
    # ... and logged by request id with the skill call's own length, so a caller's timeout can be traced.
    logged = [json.loads(line) for line in (nodes.tmp / "eu-1.log").read_text().splitlines()
              if "outlived its caller" in line]
    assert [(e["request_id"], e["skill_s"] > 0.1) for e in logged] == [("p-left", True)], logged


async def test_after_a_kill9_uncommitted_skill_calls_are_retried_and_the_committed_one_is_not(
        make_nodes: Any, run_router: Any) -> None:
    # No active checks and a long header deadline: only the kill's resets can move these calls.
    nodes = await make_nodes(THREE, health_interval_ms=60_000, eject_ms=60_000, invoke_header_timeout_ms=5000,
                             skill=SLOW_SKILL)
    router, url = await run_router(nodes)
    pid = nodes.procs["eu-1"].pid
    home = {**AUTH, "X-Client-Region": "eu"}

    async def call(s: aiohttp.ClientSession, rid: str) -> tuple[int, Any, Any]:
        async with s.post(url + INVOKE, json={}, headers={**home, "X-Request-Id": rid}) as r:
            return r.status, r.headers.copy(), await r.json()

    async with aiohttp.ClientSession() as s:
        assert (await call(s, "warm"))[1]["X-Edge-Node"] == "eu-1"
        committed = asyncio.create_task(call(s, "k-running"))
        await asyncio.sleep(0.1)  # eu-1 has its body and runs the skill
        os.kill(pid, signal.SIGSTOP)  # what is written to it now gets no 100 Continue ...
        waiting = [asyncio.create_task(call(s, f"k-{i}")) for i in range(3)]
        await asyncio.sleep(0.2)
        nodes.kill9("eu-1")  # ... and is reset by the kernel with the connections
        running = await committed
        retried = await asyncio.gather(*waiting)
    status, headers, body = running
    assert status == 502 and body["error"]["code"] == "upstream_broken" and "X-Router-Retried" not in headers
    for status, headers, body in retried:
        assert status == 200, body
        assert headers["X-Router-Retried"] == "eu-1" and headers["X-Edge-Region"] == "us", headers
    assert router.counters["retried"] >= 3


async def test_a_blackholed_node_costs_its_skill_call_a_hedge_and_never_runs_it(make_nodes: Any) -> None:
    nodes = await make_nodes(THREE, health_interval_ms=60_000, invoke_header_timeout_ms=200)
    async with FaultProxy("127.0.0.1", 0, "127.0.0.1", nodes.ports["eu-1"], "router-eu-1", seed=1) as proxy:
        doc = json.loads(json.dumps(nodes.doc))
        doc["regions"][0]["nodes"][0]["port"] = proxy.port  # the router reaches eu-1 through the proxy only
        router = Router(parse_cluster(doc))
        server = TestServer(build_router_app(router), host="127.0.0.1")
        await server.start_server()
        url = f"http://127.0.0.1:{server.port}"
        try:
            async with aiohttp.ClientSession() as s:
                home = {**AUTH, "X-Client-Region": "eu"}
                async with s.post(url + INVOKE, json={}, headers=home) as r:
                    assert r.status == 200 and r.headers["X-Edge-Node"] == "eu-1"  # a pooled connection
                proxy.partition("blackhole")
                async with s.post(url + INVOKE, json={}, headers={**home, "X-Request-Id": "bh-1"}) as r:
                    status, headers = r.status, r.headers.copy()
            proxy.heal()  # the held request, and the close of its connection, reach eu-1 now
            port = nodes.ports["eu-1"]
            for _ in range(100):  # bounded: 5 s for eu-1 to refuse or drop the late try
                shed = await metric(port, "edge_overload_shed_total", reason="deadline")
                if shed + await metric(port, "edge_invoke_dropped_total", stage="uncommitted") >= 1:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"eu-1 never refused nor dropped the try it got after the heal {headers} "
                                     f"{await node_get(port, '/metrics')}")
            assert "bh-1" not in await audited_ids(port)
        finally:
            await server.close()
    assert status == 200 and headers["X-Router-Retried"] == "eu-1" and headers["X-Edge-Region"] == "us", headers
    assert headers["X-Router-Retry-Reason"] in ("timeout", "connect_timeout")


async def test_an_invoke_hedge_waits_while_the_routers_own_loop_lags(make_nodes: Any, run_router: Any) -> None:
    nodes = await make_nodes(THREE, health_interval_ms=60_000, invoke_header_timeout_ms=100)
    router, url = await run_router(nodes)
    pid = nodes.procs["eu-1"].pid
    home = {**AUTH, "X-Client-Region": "eu"}
    lagging = [True]
    measured = router.current_lag
    router.current_lag = lambda: 1.0 if lagging[0] else measured()  # type: ignore[method-assign]
    try:
        async with aiohttp.ClientSession() as s:
            lagging[0] = False
            async with s.post(url + INVOKE, json={}, headers=home) as r:
                assert r.status == 200 and r.headers["X-Edge-Node"] == "eu-1"  # a pooled connection
            lagging[0] = True
            os.kill(pid, signal.SIGSTOP)
            call = asyncio.create_task(s.post(url + INVOKE, json={}, headers=home))
            for _ in range(100):  # bounded: 5 s
                if router.counters["hedges_deferred"] >= 2:
                    break
                await asyncio.sleep(0.05)
            assert not call.done() and router.counters["retried"] == 0  # no hedge while our loop is late
            lagging[0] = False  # the lag is over: the next per-try timeout hedges it
            async with await asyncio.wait_for(call, 5) as r:
                status, headers = r.status, r.headers.copy()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 200 and headers["X-Router-Retried"] == "eu-1" and headers["X-Edge-Region"] == "us"


async def test_a_skill_call_past_the_router_timeout_is_a_504_traced_by_request_id_on_both_sides(
        make_nodes: Any, run_router: Any, caplog: pytest.LogCaptureFixture) -> None:
    # The skill outlasts the router's whole request timeout: the node said 100 Continue and ran it.
    nodes = await make_nodes({"eu": ["eu-1"]}, request_timeout_ms=500, skill={"median_ms": 1500, "p99_ms": 1600})
    _router, url = await run_router(nodes)
    async with aiohttp.ClientSession() as s:
        async with s.post(url + INVOKE, json={}, headers={**AUTH, "X-Client-Region": "eu",
                                                           "X-Request-Id": "slow-1"}) as r:
            status, body = r.status, await r.json()
    assert status == 504 and body["error"]["code"] == "upstream_timeout", body
    traced = [r for r in caplog.records if r.getMessage() == "request timed out"]
    assert len(traced) == 1
    rec = traced[0].__dict__
    assert rec["continued_by"] == "eu-1" and rec["tries"] == 1 and rec["pending"][0][0] == "eu-1"
    assert 0.4 <= rec["pending"][0][1] < 5, rec["pending"]
    await eventually_metric(nodes.ports["eu-1"], "edge_skill_calls_client_gone_total", 1)
    logged = [json.loads(line) for line in (nodes.tmp / "eu-1.log").read_text().splitlines()
              if "outlived its caller" in line]
    assert [e["request_id"] for e in logged] == ["slow-1"] and logged[0]["skill_s"] > 0.5, logged
    assert logged[0]["skill_drawn_ms"] > 500, logged  # the simulated skill says what it drew
