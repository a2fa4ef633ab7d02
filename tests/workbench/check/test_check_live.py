"""The live view and the final verdict, fed one history: the progress line cannot contradict the verdict."""

from __future__ import annotations

from check_histories import recording, request, traffic

from workbench.check import summarize
from workbench.check.live import FAILOVER_REFRESH_S, LiveStats
from workbench.history import FaultRecord
from workbench.spec.scenario import Scenario

SCEN = Scenario.build(duration_s=10, tenants=3, nodes_per_region=1)
KEYS = ("tenant-0000", "tenant-0001", "tenant-0002")


def outage_history() -> object:
    """A pause (held requests answered at the resume, seconds later) and later a kill with errors."""
    rec = recording(SCEN, [FaultRecord(2.0, "pause", "eu"), FaultRecord(3.0, "resume", "eu"),
                           FaultRecord(6.0, "kill", "us")])
    for i in range(800):
        t = round(i * 0.01, 9)
        key = KEYS[i % 3]
        if 2.0 <= t < 2.25:
            rec.requests.append(request(t, "eu", "eu-1", key=key, took=3.0 - t + 0.001))  # held by the pause
        elif 2.25 <= t < 3.0:
            rec.requests.append(request(t, "eu", "ap-1", key=key, took=0.03))
        else:
            rec.requests.append(request(t, "eu", "eu-1", key=key))
    traffic(rec, "us", lambda t: "us-1" if t < 6.0 else (None if t < 6.08 else "ap-1"),
            start=0.0, end=8.0, keys=KEYS)
    rec.requests.append(request(7.0, "ap", "", status=503, error="no_healthy_region"))
    return rec


def feed_live(rec) -> tuple[LiveStats, dict]:
    """Replay the history as a drill delivers it: faults when applied, requests when answered."""
    live = LiveStats(list(SCEN.topology.regions), SCEN.duration_s, 100.0, 100.0, topology=SCEN.topology)
    events = [(f.t_s, 0, f) for f in rec.faults] + [(r.end_s, 1, r) for r in rec.requests]
    for i, (t, kind, item) in enumerate(sorted(events, key=lambda e: (e[0], e[1]))):
        if kind == 0:
            live.fault(item)
        else:
            live.add(item)
        if i % 200 == 0:
            live.snapshot(t)  # the progress line along the way (it must not disturb the figures)
    # the last progress line of a run: its failover figures are at most FAILOVER_REFRESH_S old
    return live, live.snapshot(max(t for t, _k, _i in events) + FAILOVER_REFRESH_S)


def test_one_history_gives_the_same_failover_and_error_figures_live_and_final() -> None:
    rec = outage_history()
    _live, snap = feed_live(rec)
    final = summarize(rec, error_budget_pct=100)
    assert {k: snap["failover"][k] for k in ("p50", "p99", "max")} == final["failover_ms"]
    for k in ("clients", "unserved_clients", "failed_requests", "stalled_requests"):
        assert snap["failover"][k] == final["failover"][k], k
    assert final["failover"]["stalled_requests"] == 25 and final["failover"]["failed_requests"] == 8
    by_target = {o["target"]: o["max_ms"] for o in final["failover"]["outages"]}
    assert snap["failover_ms"] == by_target and set(by_target) == {"eu", "us"}
    assert snap["errors"]["total"] == final["client_errors"] == 9
    assert snap["errors"]["within_budget"] is False  # the default budget of the live view: 0.1 %
    assert not summarize(rec)["checks"]["error_budget"]


def test_the_live_latency_counts_errors_like_the_verdict() -> None:
    rec = outage_history()
    live, _snap = feed_live(rec)
    total = sum(b.latency.get_total_count() for b in live.bins)
    assert total == len(rec.requests) == summarize(rec)["latency"]["count"]


def overload_history() -> tuple[list, list]:
    """Two seconds at 40 req/s: second 0 served, second 1 half shed by the router (quick 503s), one
    503 that is not a shed, one request cut at the end; the router's and a node's scrapes every 1 s."""
    from workbench.history import CUT_AT_END, MetricSample

    reqs = []
    for i in range(80):
        t = i * 0.025
        if t >= 1.0 and i % 2:
            reqs.append(request(t, "eu", "", status=503, error="router_overloaded", took=0.002))
        else:
            reqs.append(request(t, "eu", "eu-1", took=0.01))
    reqs.append(request(1.5, "eu", "", status=503, error="no_healthy_region", took=0.001))
    reqs.append(request(1.6, "eu", "", status=0, error=f"{CUT_AT_END}: the run was stopped", took=0.3))

    def m(t: float, src: str, name: str, value: float, **labels: str) -> MetricSample:
        return MetricSample(t, src, name, labels, value)

    scrapes = [
        [m(0.0, "router", "router_inflight", 2), m(0.0, "router", "router_queue_depth", 0),
         m(0.0, "router", "router_panic", 0),
         m(0.0, "router", "router_health_check_seconds_count", 0, node="eu-1"),
         m(0.0, "router", "router_health_check_seconds_sum", 0.0, node="eu-1")],
        [m(0.0, "eu-1", "edge_inflight", 1)],
        [m(1.0, "router", "router_inflight", 12), m(1.0, "router", "router_queue_depth", 4),
         m(1.0, "router", "router_panic", 1),
         m(1.0, "router", "router_health_check_seconds_count", 10, node="eu-1"),
         m(1.0, "router", "router_health_check_seconds_sum", 0.25, node="eu-1"),
         m(1.0, "router", "router_ejections_total", 1, node="us-1", reason="refused"),
         m(1.0, "router", "router_ejections_refused_total", 2, node="ap-1", reason="timeouts")],
        [m(1.0, "eu-1", "edge_inflight", 6), m(1.0, "eu-1", "edge_queue_depth", 3)],
    ]
    return reqs, scrapes


def test_the_live_view_shows_offered_served_shed_and_the_processes() -> None:
    from workbench.check import overload
    from workbench.history import Recording

    reqs, scrapes = overload_history()
    live = LiveStats(list(SCEN.topology.regions), 2.0, 1e6, 1e6, bin_s=0.5, topology=SCEN.topology)
    sent = 0
    for tick in range(1, 9):  # the drill's progress ticks: the generator's count, then the answers
        t = tick * 0.25
        sent = sum(1 for r in reqs if r.start_s < t)
        live.sent(t - 1e-6, sent)
        for r in reqs:
            if t - 0.25 <= r.end_s < t:
                live.add(r)
        for scrape in scrapes:
            if t - 0.25 <= scrape[0].t_s < t:
                live.metrics(scrape)
    s = live.series(2.0)
    assert len(s["t_s"]) == 5  # bins of 0.5 s (the last one still filling)
    assert s["offered_rps"][:4] == [40.0, 40.0, 40.0, 44.0]  # 20 sends per bin, 22 in the last
    assert s["served_rps"][:2] == [40.0, 40.0] and s["shed_rps"][:2] == [0.0, 0.0]
    assert s["shed_rps"][2:4] == [20.0, 20.0] and s["served_rps"][2:4] == [20.0, 20.0]
    assert s["other_errors_rps"][3] == 2.0  # the 503 no_healthy_region is an error, not a shed
    assert sum(s["cut_rps"]) == 2.0  # one request in a 0.5 s bin, never an error
    # the sheds are errors for the budget (the throughput panel's dotted lines), the cut one is not
    assert sum(s["errors_rps"]["eu"]) * 0.5 == 21 and live.error_figures()["cut_at_end"] == 1
    assert live.error_figures()["judged"] == len(reqs) - 1
    # the processes' gauges at each bin end (0.5, 1.0, ...), held until the next scrape
    assert s["processes"]["inflight"]["router"][:4] == [2, 12, 12, 12]
    assert s["processes"]["queue"]["router"][:4] == [0, 4, 4, 4]
    assert s["processes"]["inflight"]["eu-1"][:4] == [1, 6, 6, 6]
    assert s["health_check_ms"]["eu-1"][:4] == [None, 25.0, 25.0, 25.0]
    assert [(e["node"], e["reason"], e["refused"]) for e in live.ejections] == [
        ("us-1", "refused", False), ("ap-1", "timeouts", True)]
    snap = live.snapshot(2.0)
    assert snap["shed_rps"] == 20.0 and snap["served_rps"] == 20.0 and snap["offered_rps"] == 42.0
    assert snap["router"] == {"inflight": 12, "queue": 4, "panic": True} and snap["ejections"] == 1
    # the report's figures from the same samples, through the same tracker
    rec = Recording(requests=reqs, metrics=[m for scrape in scrapes for m in scrape])
    assert overload.ejections(rec) == sorted(live.ejections, key=lambda e: (e["t_s"], e["node"]))
    assert overload.health_check_latency(rec)["eu-1"]["mean_ms"] == [25.0]


def test_a_process_no_longer_scraped_leaves_a_gap() -> None:
    from workbench.check.live import GAUGE_STALE_S
    from workbench.history import MetricSample

    live = LiveStats(["eu"], 10.0, 1.0, 1.0, bin_s=0.5)
    live.metrics([MetricSample(0.2, "eu-1", "edge_inflight", {}, 5)])  # then the node was killed
    col = live.series(6.0)["processes"]["inflight"]["eu-1"]
    held = int(GAUGE_STALE_S / 0.5)
    assert col[:held] == [5] * held and col[-1] is None
