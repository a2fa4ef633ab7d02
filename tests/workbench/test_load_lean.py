"""The generator's lean HTTP client (workbench.run.load.lean) against real loopback servers: the same
records as the aiohttp client, its pool bound, warm connections, and its errors (never sent, cut off,
an answer it cannot read).  No timing is asserted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from test_load import Target, plan, target  # noqa: F401  (target is a fixture)

from workbench.check.errors import never_sent
from workbench.run.load.generator import LoadGenerator, run_load
from workbench.run.load.lean import LeanSession
from workbench.run.processes import free_port
from workbench.spec.parts import LoadSpec
from workbench.spec.scenario import ScenarioError

pytestmark = pytest.mark.timeout(60)


async def test_lean_open_loop_records_what_the_aiohttp_client_records(target: Target) -> None:  # noqa: F811
    res = await run_load(plan(url=target.url, client="lean", rate_rps=200, duration_s=0.5, regions=("eu", "us"),
                              tenants=3))
    assert res.sent == 100 and len(res.records) == 100 and res.summary()["counts"]["2xx"] == 100
    assert {r.status for r in res.records} == {200} and all(r.allowed is True for r in res.records)
    assert {r.answered_region for r in res.records} == {"eu", "us"} and {r.node for r in res.records} == {"n-1"}
    assert {s["region"] for s in target.seen} == {"eu", "us"}
    assert {s["key"] for s in target.seen} == {"tenant-0000", "tenant-0001", "tenant-0002"}
    assert res.late <= res.sent and "late" in res.summary() and "late_pct" in res.summary()


async def test_lean_pool_never_opens_more_than_its_limit(target: Target) -> None:  # noqa: F811
    import time

    target.stall, target.stall_s = (0.0, time.monotonic() + 60), 0.05  # every request waits 50 ms
    res = await run_load(plan(url=target.url, client="lean", rate_rps=200, duration_s=0.3, connector_limit=3))
    assert res.summary()["counts"]["2xx"] == res.sent == 60
    assert target.max_inflight <= 3


async def test_warm_connections_are_open_before_the_clock_and_reused(target: Target) -> None:  # noqa: F811
    gen = LoadGenerator(plan(url=target.url, client="lean", rate_rps=100, duration_s=0.3, connector_limit=20,
                             warm_connections=8))
    session = await gen.prepare()
    assert isinstance(session, LeanSession) and session.opened == 8 and gen.result.warmed == 8
    res = await gen.run()
    assert res.summary()["warmed_connections"] == 8 and res.summary()["counts"]["2xx"] == res.sent
    assert session.opened <= 20


async def test_a_refused_connect_is_recorded_as_never_sent() -> None:
    res = await run_load(plan(url=f"http://127.0.0.1:{free_port()}", client="lean", rate_rps=50, duration_s=0.2))
    assert res.sent == 10 and all(r.status == 0 and never_sent(r) for r in res.records), res.records[0].error


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[bytes, bool], asyncio.Future[str]]]:
    """A server that answers every request with fixed bytes (then closes when told to)."""
    servers: list[asyncio.Server] = []

    async def start(answer: bytes, close: bool) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
                if close:
                    writer.close()
                else:
                    await reader.read()  # keep it open until the client goes
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start  # type: ignore[misc]
    for s in servers:
        s.close()
        await s.wait_closed()


@pytest.mark.parametrize(("answer", "close", "error"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True, "LeanDisconnectedError"),  # cut mid-body
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", False, "LeanProtocolError"),
    (b"SMTP ready\r\n\r\n", False, "LeanProtocolError"),
])
async def test_answers_it_cannot_read_are_errors_with_status_zero(raw_server: Callable[..., asyncio.Future[str]],
                                                                  answer: bytes, close: bool, error: str) -> None:
    url = await raw_server(answer, close)
    res = await run_load(plan(url=url, client="lean", rate_rps=20, duration_s=0.1))
    assert res.records and all(r.status == 0 and r.error.startswith(error) for r in res.records), res.records[0]
    assert not any(never_sent(r) for r in res.records)  # it was sent: the outcome is unknown


async def test_an_answer_that_ends_with_the_connection_is_read_whole(raw_server: Callable[..., asyncio.Future[str]]
                                                                     ) -> None:
    url = await raw_server(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n"
                           b'{"error": {"code": "overloaded"}}', True)
    res = await run_load(plan(url=url, client="lean", rate_rps=20, duration_s=0.1))
    assert res.records and all(r.status == 503 and r.error == "overloaded" for r in res.records)


def test_an_unknown_client_is_refused_naming_the_key() -> None:
    with pytest.raises(ScenarioError, match=r"load\.client"):
        LoadSpec(client="curl")


async def test_lean_processes_report_cpu_and_rss_per_process(target: Target) -> None:  # noqa: F811
    res = await run_load(plan(url=target.url, client="lean", rate_rps=200, duration_s=0.3, processes=2))
    procs = res.summary()["processes"]
    assert len(procs) == 2 and all(p["cpu_s"] > 0 and p["rss_peak_mb"] > 0 for p in procs)
    assert res.summary()["counts"]["2xx"] == res.sent == 60


async def test_headers_are_found_in_the_raw_block_in_any_case_with_values_as_sent(
        raw_server: Callable[..., asyncio.Future[str]]) -> None:
    """Answer headers are looked up in the raw header block when asked (nothing parsed up front): names
    in any case, values exactly as sent, the first of repeated names, a default when absent."""
    url = await raw_server(b"HTTP/1.1 200 OK\r\nX-Edge-Node: EU-1\r\ncontent-length: 2\r\nX-Request-Id:  Rt-7 \r\n"
                           b"X-Request-Id: second\r\nX-Edge-Region-Fallback: no\r\n\r\nok", False)
    session = LeanSession(url, 1, 5.0)
    try:
        async with session.post(f"{url}/v1/limits/check", data=b"{}", headers={"A": "b"}) as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
            h = resp.headers
            assert h.get("x-edge-node") == "EU-1" and h.get("X-EDGE-NODE") == "EU-1"
            assert h.get("X-Request-Id") == "Rt-7"  # the first one, blanks stripped, case kept
            assert h.get("X-Edge-Region") is None and h.get("Retry-After", "1") == "1"  # a prefix is no match
            assert "content-length" in h and h["Content-Length"] == "2"
            assert ("x-edge-node", "EU-1") in h.items()
            with pytest.raises(KeyError):
                h["missing"]
    finally:
        await session.close()


async def test_a_request_is_encoded_once_per_headers_and_body_objects(target: Target) -> None:  # noqa: F811
    """The same headers and body objects give the very same encoded bytes; other objects (or equal
    content in new objects) are encoded anew, and both requests reach the server."""
    session = LeanSession(target.url, 2, 5.0)
    try:
        headers, body = {"X-Client-Region": "eu", "Content-Type": "application/json"}, b'{"key":"k-1","cost":1}'
        first = session._encode("/v1/limits/check", body, headers)
        assert session._encode("/v1/limits/check", body, headers) is first
        again = session._encode("/v1/limits/check", body, dict(headers))
        assert again == first and again is not first
        for h in (headers, {**headers, "X-Client-Region": "us"}):
            async with session.post(f"{target.url}/v1/limits/check", data=body, headers=h) as resp:
                assert resp.status == 200
        assert [s["region"] for s in target.seen][-2:] == ["eu", "us"]
    finally:
        await session.close()


async def test_a_connection_idle_past_the_limit_is_closed_not_reused(target: Target, monkeypatch) -> None:  # noqa: F811
    """A server drops a kept-alive connection that brings no request within its header timeout; a
    request written on it just then is reset.  So the pool closes connections idle longer than
    ``IDLE_MAX_S`` and opens a new one; a connection used again sooner is reused."""
    import workbench.run.load.lean as lean

    monkeypatch.setattr(lean, "IDLE_MAX_S", 1.0)
    session = LeanSession(target.url, 4, 5.0)
    body, headers = b'{"key": "tenant-0000", "cost": 1}', {"Content-Type": "application/json"}
    try:
        for i, pause in enumerate((0.0, 0.0, 1.5)):
            await asyncio.sleep(pause)
            async with session.post(target.url + "/v1/limits/check", data=body, headers=headers) as resp:
                assert resp.status == 200
            if i == 1:
                assert session.opened == 1  # reused at once
        assert session.opened == 2  # the third request found its connection idle too long: a new one
    finally:
        await session.close()
