"""Overload figures over a hand-built recording: request series, gauges, counters, ejections, summary."""

from __future__ import annotations

import pytest

from workbench.check import overload
from workbench.history import MetricSample, Recording, RequestRecord, RouterSample
from workbench.run.drill import keep_overload_sample
from workbench.ui import charts
from workbench.ui.report import overload_figures, overload_section


def _req(t: float, status: int, error: str = "", latency_s: float = 0.1) -> RequestRecord:
    return RequestRecord(t, t, t + latency_s, "eu", "eu" if status else "", "eu-1" if status else "", "t0",
                         status=status, error=error)


def _m(t: float, source: str, name: str, value: float, **labels: str) -> MetricSample:
    return MetricSample(t, source, name, dict(labels), value)


def _table(t: float, **out: str) -> RouterSample:
    """The router's routing table at ``t``: every node in rotation except ``out`` (node -> evidence)."""
    return RouterSample(t, {n: {"usable": n not in out, "healthy": n not in out, "evidence": out.get(n, ""),
                                "reason": "ok"} for n in ("eu-1", "us-1", "ap-1")})


def _recording() -> Recording:
    rec = Recording()
    # second 0: 3 served; second 1: 1 served, 2 router sheds, 1 node shed, 1 limited; second 2: a 502, a
    # 503 that is not a shed (no_healthy_region), a timeout
    rec.requests += [_req(0.1, 200), _req(0.5, 200), _req(0.9, 201, latency_s=2.0)]
    rec.requests += [_req(1.0, 200), _req(1.2, 503, "router_overloaded"), _req(1.3, 503, "router_overloaded"),
                     _req(1.4, 503, "overloaded"), _req(1.5, 429, "rate_limited")]
    rec.requests += [_req(2.1, 502, "upstream_unreachable"), _req(2.2, 503, "no_healthy_region"),
                     _req(2.3, 0, "timeout after 16.0 s")]
    rec.metrics += [
        _m(0.0, "router", "router_inflight", 1), _m(1.0, "router", "router_inflight", 40),
        _m(2.0, "router", "router_inflight", 8), _m(1.0, "router", "router_queue_depth", 12),
        _m(0.0, "eu-1", "edge_inflight", 3), _m(1.0, "eu-1", "edge_inflight", 30),
        _m(1.0, "eu-1", "edge_queue_depth", 5),
        # counters: a first scrape counts from 0; a drop (restart) counts the new value
        _m(0.0, "router", "router_ejections_total", 0, node="us-1", reason="refused"),
        _m(1.0, "router", "router_ejections_total", 1, node="us-1", reason="refused"),
        _m(2.0, "router", "router_ejections_total", 1, node="us-1", reason="refused"),
        _m(2.0, "router", "router_ejections_total", 2, node="ap-1", reason="timeouts"),
        _m(2.0, "router", "router_ejections_refused_total", 3, node="ap-1", reason="timeouts"),
        _m(1.0, "router", "router_overload_shed_total", 2, reason="queue_full"),
        _m(1.0, "eu-1", "edge_overload_shed_total", 4, reason="queue_timeout"),
        _m(2.0, "eu-1", "edge_overload_shed_total", 1, reason="queue_timeout"),  # restarted: +1
        _m(1.0, "router", "router_health_check_seconds_sum", 0.02, node="eu-1"),
        _m(1.0, "router", "router_health_check_seconds_count", 10, node="eu-1"),
        _m(2.0, "router", "router_health_check_seconds_sum", 0.52, node="eu-1"),
        _m(2.0, "router", "router_health_check_seconds_count", 20, node="eu-1"),
        _m(2.0, "router", "router_panic", 0),
    ]
    return rec


def test_outcome_tells_sheds_from_other_503s():
    assert overload.outcome(_req(0, 503, "router_overloaded")) == "shed"
    assert overload.outcome(_req(0, 503, "overloaded")) == "shed"
    assert overload.outcome(_req(0, 503, "no_healthy_region")) == "error"
    assert overload.outcome(_req(0, 429)) == "limited"
    assert overload.outcome(_req(0, 204)) == "served"
    assert overload.outcome(_req(0, 0, "timeout")) == "error"


def test_request_series_bins_by_intended_time():
    s = overload.request_series(_recording(), bin_s=1.0)
    assert s["t_s"] == [0.0, 1.0, 2.0]
    assert s["offered_rps"] == [3, 5, 3]
    assert s["served_rps"] == [3, 1, 0]
    assert s["shed_rps"] == [0, 3, 0]
    assert s["limited_rps"] == [0, 1, 0]
    assert s["errors_rps"] == [0, 0, 3]
    half = overload.request_series(_recording().requests, bin_s=0.5)
    assert half["offered_rps"][:2] == [2.0, 4.0]  # 1 request in [0, 0.5), 2 in [0.5, 1): per second
    with pytest.raises(ValueError, match="bin_s"):
        overload.request_series([], bin_s=0)
    assert overload.request_series([])["t_s"] == []


def test_inflight_and_queue_per_process():
    g = overload.inflight_series(_recording())
    assert g["inflight"]["router"] == {"t_s": [0.0, 1.0, 2.0], "value": [1, 40, 8]}
    assert g["inflight"]["eu-1"]["value"] == [3, 30]
    assert g["queue"]["router"]["value"] == [12] and g["queue"]["eu-1"]["value"] == [5]


def test_ejections_with_reasons_and_refusals():
    ej = overload.ejections(_recording())
    assert ej == [
        {"t_s": 1.0, "node": "us-1", "reason": "refused", "count": 1, "refused": False},
        {"t_s": 2.0, "node": "ap-1", "reason": "timeouts", "count": 2, "refused": False},
        {"t_s": 2.0, "node": "ap-1", "reason": "timeouts", "count": 3, "refused": True},
    ]


def test_health_check_latency_is_the_mean_between_scrapes():
    lat = overload.health_check_latency(_recording())
    assert lat["eu-1"]["t_s"] == [1.0, 2.0]
    assert lat["eu-1"]["mean_ms"] == [pytest.approx(2.0), pytest.approx(50.0)]


def test_summary_counts_every_outcome():
    s = overload.overload_summary(_recording())
    assert (s["requests"], s["served"], s["shed"], s["limited"], s["errors"]) == (11, 4, 3, 1, 3)
    assert s["errors_by_status"] == {"0": 1, "502": 1, "503": 1}
    assert s["no_healthy_region"] == 1
    assert s["served_p95_ms"] == pytest.approx(2000.0)  # nearest rank of 4: the largest
    assert s["peak_inflight"] == {"router": 40, "eu-1": 30}
    assert s["ejections_by_reason"] == {"refused": 1, "timeouts": 2}
    assert s["ejections_refused"] == 3 and s["panic_seen"] is False
    assert s["shed_counted"]["router"] == {"total": 2, "reasons": {"queue_full": 2}}
    assert s["shed_counted"]["eu-1"]["total"] == 5  # 4, then 1 after the restart


def test_periodic_scrape_keeps_overload_figures_only():
    assert keep_overload_sample("router_inflight")
    assert keep_overload_sample("router_ejections_total")
    assert keep_overload_sample("router_health_check_seconds_sum")
    assert not keep_overload_sample("router_health_check_seconds_bucket")
    assert not keep_overload_sample("router_ejections_created")
    assert not keep_overload_sample("edge_gossip_bytes_total")


def test_charts_and_report_section_draw_the_figures():
    rec = _recording()
    figs = dict(overload_figures(rec))
    assert set(figs) == {"overload", "inflight", "health_checks"}
    names = {t.name for t in figs["overload"].data}
    assert {"offered", "served (2xx)", "shed (quick 503)", "errors"} <= names
    assert {"router inflight", "router queue", "eu-1 inflight"} <= {t.name for t in figs["inflight"].data}
    assert len(figs["health_checks"].data) == 1 + 3  # one latency line, three ejection markers
    html = overload_section(rec)
    assert "shed (quick 503)" in html and "timeouts" in html and "refused" in html
    empty = Recording()
    assert "no ejection" in overload_section(empty)
    assert charts.inflight_figure(overload.inflight_series(empty)).data == ()


def test_the_report_of_a_recorded_run_with_sheds_shows_the_shed_series_and_ejection_reasons(tmp_path):
    import json
    import re

    from workbench.spec.scenario import Scenario
    from workbench.ui.report import render_report

    rec = _recording()
    rec.routers += [_table(0.0), _table(1.0, **{"us-1": "refused"}),
                    _table(2.0, **{"us-1": "refused", "ap-1": "timeouts"})]
    rec.scenario = Scenario.build(name="t-sheds", duration_s=3.0, nodes_per_region=1).to_dict()
    rec.complete, rec.ended_s = True, 3.0
    rec.save(tmp_path / "run")
    page = render_report([tmp_path / "run"])
    # the ejections table: when, who, why, ejected or kept by the cap
    table = page[page.index("<table class='ejections'>"):]
    table = table[:table.index("</table>")]
    assert "<td>us-1</td><td>refused</td><td>1</td><td>ejected</td>" in table
    assert "<td>ap-1</td><td>timeouts</td><td>3</td><td>refused</td>" in table
    assert "shed (quick 503)</td><td>3</td>" in page
    # the chart's shed series is the per-second series of the check, drawn as given
    figures = [json.loads(m) for m in re.findall(r'Plotly\.newPlot\(\s*"chart-\d+",\s*(\[.*?\]),\s*\{', page)]
    traces = {t.get("name"): t for fig in figures for t in fig}
    assert traces["shed (quick 503)"]["y"] == [0, 3, 0]
    assert traces["served (2xx)"]["y"] == [3, 1, 0]
    assert "router inflight" in traces and "eu-1 check" in traces
    assert "The router's rotation" in page and "out: timeouts" in page
    assert "most nodes out of the router&#x27;s rotation at once</td><td>2</td>" in page


def test_rotation_spans_say_why_a_node_is_out():
    samples = [_table(0.0), _table(1.0, **{"us-1": "refused"}), _table(2.0, **{"us-1": "refused"}),
               _table(3.0)]
    spans = overload.rotation_intervals(samples, 4.0)
    assert spans["us-1"] == [(0.0, 1.0, "in rotation"), (1.0, 3.0, "out: refused"), (3.0, 4.0, "in rotation")]
    assert spans["eu-1"] == [(0.0, 4.0, "in rotation")]
    assert overload.rotation_state({"usable": False, "evidence": "", "reason": "draining"}) == "out: draining"
    assert overload.rotation_intervals([], 4.0) == {}
    rec = _recording()
    assert overload.overload_summary(rec)["most_out_of_rotation"] is None  # never sampled: not "0"
    rec.routers += samples
    assert overload.overload_summary(rec)["most_out_of_rotation"] == 1


def test_sheds_are_told_apart_by_whether_they_waited_first() -> None:
    """Refused on arrival (the quick 503s) vs shed after a wait by design (a queue's deadline, a node
    reached past the deadline); a shed without its reason is unknown; anything else is no shed."""
    def shed(reason: str, error: str = "router_overloaded") -> RequestRecord:
        r = _req(1.0, 503, error)
        r.shed = reason
        return r
    assert overload.shed_wait(shed("queue_full")) == "on_arrival"
    assert overload.shed_wait(shed("queue_stalled", "overloaded")) == "on_arrival"
    assert overload.shed_wait(shed("queue_timeout")) == "after_wait"
    assert overload.shed_wait(shed("deadline", "overloaded")) == "after_wait"
    assert overload.shed_wait(shed("")) == "unknown"
    assert overload.shed_wait(shed("queue_full", "no_healthy_region")) == ""
    assert overload.shed_wait(_req(1.0, 200)) == ""
