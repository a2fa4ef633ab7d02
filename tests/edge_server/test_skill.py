"""The skill behind the edge: the simulated one's distribution, and the upstream one against real servers."""

from __future__ import annotations

import asyncio
import statistics
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web
from procs import API_KEY, ClusterProcs, free_port, read_audit_file, request

from edge_server.config import SkillConfig
from edge_server.skill import SimulatedSkill, SkillError, UpstreamSkill, rate_text


def test_rating_is_deterministic_and_depends_on_the_text():
    assert rate_text({"text": "great"}) == rate_text({"text": "great"})
    scores = {rate_text({"text": f"review {i}"})["score"] for i in range(50)}
    assert scores <= {1, 2, 3, 4, 5} and len(scores) > 1
    assert rate_text({"other": [1, 2]})["chars"] > 0  # no text: the whole body is rated


def test_simulated_latency_matches_median_and_p99():
    skill = SimulatedSkill(SkillConfig(median_ms=100, p99_ms=400), seed=1)
    samples = sorted(skill.latency_s() * 1000 for _ in range(20_000))
    assert statistics.median(samples) == pytest.approx(100, rel=0.05)
    assert samples[int(0.99 * len(samples))] == pytest.approx(400, rel=0.1)
    assert SimulatedSkill(SkillConfig(median_ms=0, p99_ms=0)).latency_s() == 0


async def test_simulated_errors_at_the_configured_rate():
    skill = SimulatedSkill(SkillConfig(median_ms=0, p99_ms=0, error_rate=0.3), seed=2)
    failures = 0
    for _ in range(1000):
        try:
            await skill.invoke({"text": "x"})
        except SkillError:
            failures += 1
    assert 250 <= failures <= 350


class _Upstream:
    """A real HTTP server on loopback in a thread: answers, fails or stalls by path."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def ok(request: web.Request) -> web.Response:
            return web.json_response({"echo": await request.json()})

        async def fail(request: web.Request) -> web.Response:
            return web.Response(status=500, text="boom")

        async def stall(request: web.Request) -> web.Response:
            await asyncio.sleep(5)
            return web.Response(text="late")

        app = web.Application()
        app.router.add_post("/ok", ok)
        app.router.add_post("/fail", fail)
        app.router.add_post("/stall", stall)
        runner = self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> _Upstream:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def upstream() -> Iterator[_Upstream]:
    with _Upstream() as server:
        yield server


async def test_upstream_proxies_success_and_maps_failures(upstream: _Upstream):
    base = f"http://127.0.0.1:{upstream.port}"

    async def call(path: str, timeout_ms: float = 1000) -> dict:
        skill = UpstreamSkill(SkillConfig(kind="upstream", url=base + path, timeout_ms=timeout_ms))
        try:
            return await skill.invoke({"text": "hi"})
        finally:
            await skill.close()

    assert (await call("/ok")) == {"upstream": {"echo": {"text": "hi"}}}
    with pytest.raises(SkillError, match="answered 500"):
        await call("/fail")
    with pytest.raises(SkillError, match="timed out after 200 ms"):
        await call("/stall", timeout_ms=200)
    dead = UpstreamSkill(SkillConfig(kind="upstream", url=f"http://127.0.0.1:{free_port()}/x", timeout_ms=500))
    with pytest.raises(SkillError, match="unreachable"):
        await dead.invoke({})
    await dead.close()


@pytest.mark.integration
def test_node_answers_502_when_the_upstream_fails_and_still_audits_the_tokens(tmp_path, upstream: _Upstream):
    cluster = ClusterProcs(tmp_path, regions=["eu"], skill={
        "kind": "upstream", "url": f"http://127.0.0.1:{upstream.port}/fail", "timeout_ms": 500,
        "median_ms": 0, "p99_ms": 0})
    with cluster:
        r = request(cluster.url("eu-1"), "POST", "/v1/skills/rating/invoke", json={"text": "hi"},
                    headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status == 502, r.body
        assert r.error["code"] == "skill_failed" and "audited" in r.error["message"]
        request_id = r.headers["x-request-id"]
        assert r.headers["x-edge-node"] == "eu-1"
        events = read_audit_file(cluster.audit_path("eu-1"))
        assert [e["request_id"] for e in events] == [request_id]
        assert request(cluster.url("eu-1"), "GET", "/healthz").status == 200
