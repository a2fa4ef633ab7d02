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
