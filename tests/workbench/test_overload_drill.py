"""A short real drill over the router's capacity: its recording shows the sheds, the router's and the
nodes' overload metrics scraped while it ran, and its report renders the overload section."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from workbench.check import overload
from workbench.history import Recording
from workbench.run.drill import run_drill
from workbench.spec.scenario import Scenario
from workbench.ui.report import render_report

pytestmark = pytest.mark.integration


@dataclasses.dataclass(frozen=True)
class _SmallRouterGate(Scenario):
    """The same scenario with a router that admits 12 requests at once (queue 4, 20 ms): a load a
    test can afford is then well past the router's capacity."""

    def cluster_config(self, *args: Any, **kwargs: Any) -> Any:
        cfg = super().cluster_config(*args, **kwargs)
        return dataclasses.replace(cfg, router=dataclasses.replace(cfg.router, max_inflight=12, queue_max=4,
                                                                   queue_timeout_ms=20.0))


async def test_drill_over_capacity_records_sheds_and_reports_overload(tmp_path: Path):
    base = Scenario.build(name="t-overload", duration_s=4.0, rate=1e6, burst=1e6, load_rps=200.0,
                          skill_median_ms=150.0, skill_p99_ms=400.0, seed=11)
    scenario = _SmallRouterGate(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    result = await run_drill(scenario, tmp_path / "run")
    rec = Recording.load(tmp_path / "run")
    s = overload.overload_summary(rec)
    # ~200 req/s x ~0.2 s = ~40 in flight against 12 slots: most requests are shed, quickly, none lost
    assert s["shed"] > 50 and s["served"] > 20, s
    assert s["no_healthy_region"] == 0
    sheds = [r for r in rec.requests if overload.is_shed(r)]
    assert all(r.error == "router_overloaded" for r in sheds)
    # each shed carries its reason (X-Edge-Shed), saved and loaded with the recording
    assert all(r.shed in ("queue_full", "queue_timeout", "queue_stalled", "loop_lag") for r in sheds), \
        {r.shed for r in sheds}
    # the verdict counts the sheds against the error budget
    assert not result.summary["invariants_ok"]
    # the generator waited for the requests in flight at the end (up to their timeout): none was cut
    assert result.summary["errors"]["cut_at_end"] == 0 and s["cut_at_end"] == 0
    # the live view had the sheds and the router's gauges while the run went
    live = result.live.series(scenario.duration_s)
    assert max(live["shed_rps"]) > 0 and max(live["served_rps"]) > 0 and max(live["offered_rps"]) > 0
    assert any(v for v in live["processes"]["inflight"]["router"] if v)
    # the router's routing table was sampled while the load ran, every node in it
    tables = [x for x in rec.routers if x.t_s < scenario.duration_s]
    assert len(tables) >= 2 and set(tables[-1].nodes) == set(scenario.topology.node_ids)
    assert s["most_out_of_rotation"] is not None
    # the router's and every node's overload metrics were scraped while the load ran, not only at the end
    during = [m for m in rec.metrics if m.t_s < scenario.duration_s]
    assert {m.node for m in during} >= {"router", *scenario.topology.node_ids}
    gauges = overload.inflight_series(rec)
    assert max(gauges["inflight"]["router"]["value"]) >= 1
    assert set(gauges["inflight"]) >= set(scenario.topology.node_ids)
    assert overload.shed_counters(rec)["router"]["total"] >= s["shed"] * 0.9
    assert overload.health_check_latency(rec)  # the router's active checks, per node
    series = overload.request_series(rec)
    assert max(series["shed_rps"]) > 0 and max(series["served_rps"]) > 0
    page = render_report([tmp_path / "run"])
    assert "Overload — run" in page and "Offered vs served vs shed" in page
    assert page.count("chart-") >= 9


async def test_a_scrape_that_fails_adds_nothing_and_does_not_raise():
    """A node that refuses or does not answer in time must not end the drill (it once did)."""
    import asyncio
    import socket

    import aiohttp

    from workbench.run.drill import _scrape_metrics

    with socket.socket() as s:  # a port nobody listens on: refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    silent = socket.socket()  # listens, never answers: the session's timeout
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    rec = Recording()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.2)) as session:
            await asyncio.wait_for(asyncio.gather(
                _scrape_metrics(session, "eu-1", refused, 1.0, rec, overload_only=True),
                _scrape_metrics(session, "router", f"http://127.0.0.1:{silent.getsockname()[1]}", 1.0, rec,
                                overload_only=False)), timeout=5)
    finally:
        silent.close()
    assert rec.metrics == []
