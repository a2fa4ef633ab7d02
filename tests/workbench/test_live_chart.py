"""The live chart sends each point once (extend), and a view that opens late gets the whole history."""

from __future__ import annotations

from typing import Any

from workbench.ui.live_chart import LiveChart

PANELS = [{"title": "t", "series": [{"id": "a", "name": "a", "color": "#000", "dash": "solid"}]}]


def test_extend_sends_only_new_points_and_sync_sends_all():
    chart = LiveChart(PANELS, x_max=10)
    sent: list[Any] = []
    chart.send = lambda content, buffers=None: sent.append(content)  # type: ignore[method-assign]
    chart.extend([0.5, 1.0], {"a": [1.0, 2.0]})
    chart.extend([1.5], {"a": [None]})
    chart.extend([], {"a": []})  # nothing new: nothing sent
    assert sent == [{"kind": "extend", "t": [0.5, 1.0], "y": {"a": [1.0, 2.0]}},
                    {"kind": "extend", "t": [1.5], "y": {"a": [None]}}]
    chart._on_msg(chart, {"kind": "sync"}, [])
    assert sent[-1] == {"kind": "reset", "t": [0.5, 1.0, 1.5], "y": {"a": [1.0, 2.0, None]}}
    chart._on_msg(chart, {"kind": "other"}, [])
    assert len(sent) == 3


def test_the_dashboard_sends_the_overload_series_and_ejection_markers():
    """The live dashboard's chart gets offered / served / shed, in-flight and queue per process,
    health-check latency per node, and ejections with their reasons as markers on that panel."""
    from workbench.check.live import LiveStats
    from workbench.history import MetricSample, RequestRecord, RouterSample
    from workbench.spec.scenario import Scenario
    from workbench.ui.widgets import OVERLOAD_PANEL, LiveDashboard

    scen = Scenario.build(duration_s=2.0, nodes_per_region=1)
    board = LiveDashboard(scen, live=True, min_update_s=0.0)
    assert board.chart is not None
    sent: list[Any] = []
    board.chart.send = lambda content, buffers=None: sent.append(content)  # type: ignore[method-assign]
    titles = [p["title"] for p in board.chart.panels]
    assert titles[OVERLOAD_PANEL].startswith("Router's health checks")
    live = LiveStats(list(scen.topology.regions), 2.0, 1e6, 1e6, topology=scen.topology)
    for i in range(20):
        t = i * 0.05
        status, error = (503, "router_overloaded") if i % 2 else (200, "")
        live.add(RequestRecord(t, t, t + 0.01, "eu", "eu", "eu-1", "k", status=status, error=error))
    live.sent(0.99, 20)
    live.metrics([MetricSample(0.5, "router", "router_inflight", {}, 9),
                  MetricSample(0.5, "router", "router_ejections_total", {"node": "us-1", "reason": "reset"}, 1)])
    live.router_state(RouterSample(0.5, {"us-1": {"usable": False, "evidence": "reset", "reason": "ok"},
                                         "eu-1": {"usable": True, "evidence": "", "reason": "ok"}}))
    board.on_progress(live.snapshot(1.01), live)
    assert "shed 10/s" in board.status.value and "ejections 1" in board.status.value
    assert "router: out: reset" in board.health.value and board.health.value.count("router:") == 1
    (msg,) = sent
    assert msg["kind"] == "extend" and msg["t"] == [0.5, 1.0]
    y = msg["y"]
    assert y["shed"] == [10.0, 10.0] and y["served"] == [10.0, 10.0] and y["offered"] == [0.0, 40.0]
    assert y["inflight:router"] == [9, 9] and y["queue:router"] == [None, None]
    assert set(y) >= {f"check:{n}" for n in scen.topology.node_ids}
    assert set(y) <= {s["id"] for p in board.chart.panels for s in p["series"]}  # every series is drawn
    assert [0.5, "ejected us-1: reset", "#dc2626", OVERLOAD_PANEL] in board.chart.markers
