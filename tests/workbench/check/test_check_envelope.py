"""The envelope: its allowance is stated with its inputs, over-admission is signed, and the
client-only (Jepsen counter) check counts requests of unknown outcome as admitted."""

from __future__ import annotations

import pytest
from check_histories import audited_run, request
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.check import check_envelope, check_envelope_counter, default_slack_s, summarize
from workbench.check.envelope import max_interval_window_excess, max_window_excess
from workbench.history import MetricSample
from workbench.spec.scenario import Scenario

SCEN = Scenario.build(rate=10, burst=5, duration_s=10)


def paced(n: int, every: float = 0.1) -> list[tuple[float, str, str]]:
    return [(0.05 + i * every, "tenant-0000", ("eu-1", "us-1", "ap-1")[i % 3]) for i in range(n)]


def test_the_allowance_is_stated_with_its_inputs_and_the_gossip_lag_the_nodes_measured() -> None:
    scen = Scenario.build(rate=10, burst=5, duration_s=10, latency_at_s=1.0, latency_add_ms=30.0)
    rec = audited_run(scen, paced(50), final_nodes=("eu-1", "us-1", "ap-1"))
    rec.metrics = [MetricSample(10.0, n, "edge_gossip_lag_seconds", {"peer": p}, lag)
                   for n, p, lag in (("eu-1", "us-1", 0.012), ("us-1", "eu-1", 0.018), ("ap-1", "eu-1", 0.4))]
    slack = default_slack_s(scen)
    v = check_envelope(rec, slack_s=slack)
    a = v.figures["allowance"]
    assert a["gossip_interval_ms"] == 20.0 and a["added_latency_ms"] == 30.0 and a["delivery_allowance_ms"] == 50.0
    assert a["slack_s"] == pytest.approx(0.04 + 0.05 + 0.03)
    assert a["measured_gossip_lag_ms"] == {"p50": 18.0, "max": 400.0, "samples": 3}
    s = summarize(rec)
    assert s["envelope_allowance"]["slack_s"] == pytest.approx(slack)


def test_under_admission_is_negative_not_floored() -> None:
    v = check_envelope(audited_run(SCEN, paced(21), final_nodes=("eu-1",)))
    assert v.ok and v.figures["over_admission_pct"] == pytest.approx((21 / 105 - 1) * 100, abs=0.01)


def test_unknown_outcomes_count_as_admitted_for_the_client_only_upper_bound() -> None:
    rec = audited_run(SCEN, paced(50), final_nodes=("eu-1", "us-1", "ap-1"))  # 10/s: at the limit
    v = check_envelope_counter(rec)
    assert v.ok, v.reasons
    assert v.figures["lower_bound_tokens"] == v.figures["upper_bound_tokens"] == 50.0
    # 12 requests in 60 ms at the end of the run time out (sent; the client cannot tell whether tokens
    # were granted, nor when: an unknown outcome counts in every window from its send to the history's end)
    for i in range(12):
        rec.requests.append(request(4.95 + i * 0.005, "eu", "", status=0, took=0.1, error="timeout after 0.1 s"))
    assert check_envelope(rec).ok  # the audit trails say nothing was granted for them
    v = check_envelope_counter(rec)
    assert not v.ok and "unknown outcome" in v.reasons[0]
    assert v.figures["unknown_outcome_requests"] == 12 and v.figures["upper_bound_tokens"] == 62.0
    assert not summarize(rec, error_budget_pct=100)["checks"]["envelope_counter"]


def test_requests_that_were_never_sent_are_not_unknown() -> None:
    rec = audited_run(SCEN, paced(50), final_nodes=("eu-1", "us-1", "ap-1"))
    for i in range(12):
        rec.requests.append(request(3.0 + i * 0.005, "eu", "", status=0, took=0.001,
                                    error="ClientConnectorError: Cannot connect to host 127.0.0.1:9"))
    v = check_envelope_counter(rec)
    assert v.ok, v.reasons
    assert v.figures["unknown_outcome_requests"] == 0


def test_a_router_502_after_the_node_granted_is_unknown_and_an_audited_grant_catches_a_lying_node() -> None:
    rec = audited_run(SCEN, paced(50), final_nodes=("eu-1", "us-1", "ap-1"))
    for i in range(10):
        rec.requests.append(request(6.0 + i * 0.002, "eu", "", status=502, error="upstream_broken"))
    assert not check_envelope_counter(rec).ok
    rec.audit = rec.audit[:10]  # nodes that "forget" most of their grants: the audit-based check passes...
    assert check_envelope(rec).ok
    rec.requests = [r for r in rec.requests if r.status != 502]
    rec.requests += [request(5.0 + i * 0.001, "eu", "eu-1") for i in range(20)]
    assert not check_envelope_counter(rec).ok  # ...the clients' own replies do not


def test_a_burst_sent_at_once_and_served_over_time_at_the_limit_passes_the_client_check() -> None:
    """Queueing spreads grants over time: only grants certainly inside a window count against it."""
    rec = audited_run(SCEN, paced(30), final_nodes=("eu-1", "us-1", "ap-1"))
    # 40 requests sent within 40 ms, granted at 10/s over 4 s (each answered when its grant came)
    rec.requests += [request(4.0 + i * 0.001, "eu", "eu-1", took=0.1 * (i + 1)) for i in range(40)]
    assert check_envelope_counter(rec).ok
    rec.requests += [request(9.0 + i * 0.001, "eu", "eu-1", took=0.002) for i in range(20)]  # 20 in 20 ms
    v = check_envelope_counter(rec)
    assert not v.ok and v.figures["worst_excess_tokens"] > 10


def _brute(intervals: list[tuple[float, float, int]], rate: float, burst: float) -> float:
    best = -burst
    for s in {a for a, _b, _c in intervals}:
        for t in {b for _a, b, _c in intervals}:
            if t >= s:
                inside = sum(c for a, b, c in intervals if a >= s and b <= t)
                best = max(best, inside - burst - rate * (t - s))
    return best


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 500), st.integers(0, 100), st.integers(1, 3)), max_size=30),
       st.floats(0.5, 50), st.floats(0, 10))
def test_interval_window_excess_matches_brute_force(raw, rate: float, burst: float) -> None:
    intervals = sorted((a / 100, (a + w) / 100, c) for a, w, c in raw)
    got, s, t = max_interval_window_excess(intervals, rate, burst)
    assert got == pytest.approx(_brute(intervals, rate, burst), abs=1e-9)
    if intervals and got > -burst:
        inside = sum(c for a, b, c in intervals if a >= s and b <= t)
        assert inside - burst - rate * (t - s) == pytest.approx(got, abs=1e-9)
    points = sorted((a, c) for a, _b, c in intervals)  # zero-width intervals are exact grant times
    assert max_interval_window_excess([(a, a, c) for a, c in points], rate, burst)[0] == pytest.approx(
        max_window_excess(points, rate, burst)[0], abs=1e-9)
