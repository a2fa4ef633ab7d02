"""Checker: envelope (against brute force), token loss, convergence, failover and the summary."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.strict.transfers import SPEND_DELAY_S
from workbench.check.checker import (
    DELIVERY_ALLOWANCE_S,
    admissions,
    check_convergence,
    check_envelope,
    check_token_loss,
    client_errors,
    failover_times,
    latency_percentiles,
    max_window_excess,
    percentile,
    summarize,
    throughput,
)
from workbench.check.tokens import INFLIGHT_S
from workbench.history import AuditEvent, FaultRecord, Recording, RequestRecord, StateSample
from workbench.spec.scenario import Scenario

WALL = 1_000_000.0
NODES = ("eu-1", "us-1", "ap-1")
REGION = {"eu-1": "eu", "us-1": "us", "ap-1": "ap"}


def brute_force(events: list[tuple[float, int]], rate: float, burst: float) -> float:
    """O(n^2): every window from an event to a later one, counting every event inside it."""
    best = -burst
    for s, _ in events:
        for t, _ in events:
            if t >= s:
                inside = sum(c for x, c in events if s <= x <= t)
                best = max(best, inside - rate * (t - s) - burst)
    return best


def bucket_history(rate: float, burst: float, arrivals: list[float], cost: int = 1) -> list[float]:
    """Times a perfect global token bucket admits, for requests arriving at ``arrivals``."""
    level, last, out = burst, 0.0, []
    for t in arrivals:
        level = min(burst, level + (t - last) * rate)
        last = t
        if level >= cost:
            level -= cost
            out.append(t)
    return out


def recording(scenario: Scenario, admitted: list[tuple[float, str, str]], *, rejected: list[float] = (),
              final_state: bool = True) -> Recording:
    """A consistent run: admitted (time, key, node) are answered 200, audited and counted."""
    rec = Recording(scenario=scenario.to_dict(), started_wall=WALL, ended_s=scenario.duration_s, complete=True)
    counts: dict[str, dict[str, int]] = {}
    for i, (t, key, node) in enumerate(admitted):
        rid = f"r{i}"
        rec.requests.append(RequestRecord(t, t, t + 0.01, REGION[node], REGION[node], node, key, 1, 200, "", rid))
        rec.audit.append(AuditEvent(i, f"{node}:{i}", key, 1, node, REGION[node], WALL + t + 0.001, rid, 1))
        counts.setdefault(key, {}).setdefault(node, 0)
        counts[key][node] += 1
    for t in rejected:
        rec.requests.append(RequestRecord(t, t, t + 0.002, "eu", "eu", "eu-1", "tenant-0000", 1, 429))
    if final_state:
        view = {k: {n: (1, c) for n, c in per.items()} for k, per in counts.items()}
        for node in NODES:
            t = scenario.duration_s
            rec.states.append(StateSample(t, node, WALL + t, {k: sum(v.values()) for k, v in counts.items()},
                                          {k: dict(v) for k, v in view.items()}))
    return rec


def spread(times: list[float], key: str = "tenant-0000") -> list[tuple[float, str, str]]:
    return [(t, key, NODES[i % 3]) for i, t in enumerate(times)]


SCEN = Scenario.build(rate=10, burst=5, duration_s=10)


# ----------------------------------------------------------------------------- envelope
def test_percentile_is_nearest_rank() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert percentile(values, 50) == 5.0 and percentile(values, 95) == 10.0 and percentile(values, 91) == 10.0
    assert percentile(values, 90) == 9.0 and percentile(values, 0) == 1.0 and percentile([], 50) is None


events_st = st.lists(st.tuples(st.floats(0, 20, allow_nan=False).map(lambda x: round(x, 2)), st.integers(1, 5)),
                     max_size=40).map(sorted)


@settings(max_examples=300, deadline=None)
@given(events_st, st.floats(0.1, 50), st.floats(1, 30))
def test_window_excess_matches_brute_force(events, rate, burst) -> None:
    fast, s, t = max_window_excess(events, rate, burst)
    assert fast == pytest.approx(brute_force(events, rate, burst), abs=1e-6)
    if events:
        inside = sum(c for x, c in events if s <= x <= t)
        assert inside - rate * (t - s) - burst == pytest.approx(fast, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=300).map(sorted),
       st.floats(0.5, 100), st.integers(1, 50))
def test_a_perfect_bucket_never_exceeds_the_envelope(arrivals, rate, burst) -> None:
    events = [(t, 1) for t in bucket_history(rate, burst, arrivals)]
    assert max_window_excess(events, rate, burst)[0] <= 1e-6


def test_conforming_run_passes() -> None:
    arrivals = [i / 30 for i in range(300)]  # 30 req/s against 10/s
    rec = recording(SCEN, spread(bucket_history(10, 5, arrivals)))
    v = check_envelope(rec)
    assert v.ok, v.reasons
    assert v.figures["source"] == "audit"
    assert v.figures["admitted_tokens"] <= 5 + 10 * 10
    assert v.figures["envelope_tokens"] == 105.0
    # signed: a conforming run at the limit admits a little less than the envelope (no flooring at 0)
    assert v.figures["over_admission_pct"] == pytest.approx((v.figures["admitted_tokens"] / 105 - 1) * 100, abs=0.01)
    assert v.figures["over_admission_pct"] <= 0 and v.figures["over_admitted_keys_pct"] == 0.0
    allowance = v.figures["allowance"]
    assert allowance["gossip_interval_ms"] == 20.0 and allowance["delivery_allowance_ms"] == 50.0
    assert allowance["added_latency_ms"] == 0.0 and allowance["measured_gossip_lag_ms"] is None


def test_over_admission_is_reported() -> None:
    arrivals = [i / 30 for i in range(300)]
    doubled = bucket_history(10, 5, arrivals) + bucket_history(10, 5, [a + 0.001 for a in arrivals])
    rec = recording(SCEN, spread(sorted(doubled)))
    v = check_envelope(rec)
    assert not v.ok
    assert "tenant-0000" in v.reasons[0]
    assert v.figures["over_admission_pct"] == pytest.approx(
        (v.figures["admitted_tokens"] / 105 - 1) * 100, abs=0.01)
    assert v.figures["over_admission_pct"] > 80
    assert v.figures["worst_excess_tokens"] > 90


def test_burst_violation_in_a_short_window_is_caught_even_if_the_total_is_fine() -> None:
    times = [5.0 + i * 0.001 for i in range(20)]  # 20 tokens in 20 ms against burst 5
    v = check_envelope(recording(SCEN, spread(times)))
    assert not v.ok and v.figures["over_admission_pct"] < 0  # under the total, over in one window
    assert v.figures["worst_excess_tokens"] == pytest.approx(20 - 5 - 10 * 0.019, abs=1e-3)
    assert "allowance 0.0" in v.reasons[0]


def test_tolerance_and_slack() -> None:
    times = [5.0 + i * 0.001 for i in range(8)]  # 3 over
    rec = recording(SCEN, spread(times))
    assert not check_envelope(rec).ok
    assert check_envelope(rec, tolerance_tokens=3).ok
    assert check_envelope(rec, slack_s=0.3).ok


def test_client_source_and_check_route() -> None:
    rec = recording(SCEN, spread([1.0, 2.0]))
    rec.audit.clear()
    rec.requests.append(RequestRecord(3, 3, 3.01, "eu", "eu", "eu-1", "tenant-0000", 1, 200, route="check",
                                      allowed=False))
    assert [t for t, _ in admissions(rec)["tenant-0000"]] == [1.0, 2.0]
    assert check_envelope(rec).figures["source"] == "client"
    with pytest.raises(ValueError):
        admissions(rec, "psychic")


def test_unlimited_keys_and_missing_scenario() -> None:
    scen = Scenario.from_dict({"limits": [{"pattern": "vip-*", "rate": 1, "burst": 1}]})
    v = check_envelope(recording(scen, spread([1.0], key="other")))
    assert not v.ok and "no limit matches" in v.reasons[0]
    assert not check_envelope(Recording()).ok


def test_multiple_keys_do_not_hide_each_other() -> None:
    calm = spread([1.0, 2.0], key="a")
    hot = spread([5.0 + i * 0.001 for i in range(200)], key="b")
    v = check_envelope(recording(SCEN, sorted(calm + hot)))
    assert not v.ok and v.figures["keys"]["a"]["worst_excess"] < 0
    assert v.figures["over_admitted_keys_pct"] == pytest.approx((200 - 105) / 210 * 100, abs=0.01)
    assert v.figures["over_admission_pct"] == pytest.approx((202 - 210) / 210 * 100, abs=0.01)


# ----------------------------------------------------------------------------- token loss
def test_consistent_audit_has_no_token_loss() -> None:
    v = check_token_loss(recording(SCEN, spread([0.5 * i for i in range(20)])))
    assert v.ok, v.reasons
    assert v.figures["token_loss"] == 0 and v.figures["missing"] == 0


def test_a_dropped_audit_event_is_token_loss() -> None:
    rec = recording(SCEN, spread([0.5 * i for i in range(20)]))
    dropped = rec.audit.pop(7)
    v = check_token_loss(rec)
    assert not v.ok
    # the clients saw it granted (no audit event), and both peers count a token its node never audited
    assert v.figures["missing"] == 1 and v.figures["peer_view_ahead"] == 2
    assert dropped.request_id in " ".join(v.reasons) and dropped.node in " ".join(v.reasons)
    assert summarize(rec)["token_loss"] >= 1 and not summarize(rec)["invariants_ok"]


def test_a_duplicated_audit_event_is_reported() -> None:
    rec = recording(SCEN, spread([0.5 * i for i in range(20)]))
    rec.audit.append(rec.audit[3])
    v = check_token_loss(rec)
    assert not v.ok and v.figures["duplicated"] == 1 and v.figures["peer_view_behind"] == 2


def test_a_peer_view_ahead_of_the_audit_is_reported_and_a_nodes_own_counter_is_not_compared() -> None:
    rec = recording(SCEN, spread([0.5 * i for i in range(6)]))
    rec.states[0].counts["tenant-0000"]["eu-1"] = (1, 99)  # eu-1's own counter: not an independent source
    assert check_token_loss(rec).ok
    rec.states[1].counts["tenant-0000"]["eu-1"] = (1, 99)  # us-1's view of eu-1
    v = check_token_loss(rec)
    assert not v.ok and "us-1's view of eu-1" in v.reasons[0] and "count 99" in v.reasons[0]


def test_cost_mismatch_and_unanswered_grants() -> None:
    rec = recording(SCEN, spread([1.0, 2.0]))
    rec.requests[0].cost = 3
    rec.audit.append(AuditEvent(99, "eu-1:99", "tenant-0000", 1, "eu-1", "eu", WALL + 3, "lost-reply", 1))
    v = check_token_loss(rec)
    assert v.figures["cost_mismatch"] == 1 and v.figures["unanswered_grants"] == 1




def test_strict_views_may_lack_the_spends_of_their_publication_delay() -> None:
    """A strict node publishes a key's spends up to SPEND_DELAY_S late: a view missing a grant made that
    long before it was taken is not loss in strict mode, and still is in eventual mode."""
    age = INFLIGHT_S + SPEND_DELAY_S / 2  # older than eventual's allowance, younger than strict's
    for mode, lost in (("eventual", True), ("strict", False)):
        scen = Scenario.build(rate=10, burst=5, duration_s=10, mode=mode)
        rec = recording(scen, spread([1.0, 2.0, 10.0 - age]))
        last = rec.audit[-1]
        for s in rec.states:
            if s.node != last.node:
                s.counts["tenant-0000"][last.node] = (1, s.counts["tenant-0000"][last.node][1] - 1)
        v = check_token_loss(rec)
        assert v.ok is not lost, v.reasons
        allowance = INFLIGHT_S + (SPEND_DELAY_S if mode == "strict" else 0.0)
        assert v.figures["inflight_allowance_s"] == pytest.approx(allowance)
        assert (v.figures["peer_view_behind"] == 2) is lost and (len(v.figures["granted_after_view"]) == 2) is not lost


def test_a_new_generation_counts_only_its_own_events() -> None:
    rec = recording(SCEN, spread([1.0, 2.0, 3.0, 4.0]))
    rec.audit[0].gen = 0  # an older generation of eu-1: expired and restarted from zero
    for s in rec.states:
        s.counts["tenant-0000"]["eu-1"] = (1, 1)
    assert check_token_loss(rec).ok


# ----------------------------------------------------------------------------- convergence
def converging(delay: float, step: float = 0.01, mode: str = "eventual") -> Recording:
    """Two nodes; after a heal at 5 s, each learns the other's entry ``delay`` seconds after it had it."""
    scen = Scenario.build(regions=2 if mode == "eventual" else 3, gossip_interval_ms=20, duration_s=10, mode=mode)
    rec = Recording(scenario=scen.to_dict(), started_wall=WALL, complete=True)
    rec.faults = [FaultRecord(2.0, "partition", "eu|us"), FaultRecord(5.0, "heal")]
    own = {"eu-1": 40, "us-1": 30}
    for i in range(int(2 / step)):
        t = 4.0 + i * step
        for me, other in (("eu-1", "us-1"), ("us-1", "eu-1")):
            seen = (1, own[other]) if t >= 5.0 + delay else (1, own[other] - 10)
            rec.states.append(StateSample(t, me, WALL + t, {"k": 0}, {"k": {me: (1, own[me]), other: seen}}))
    return rec


def test_convergence_within_two_intervals_passes() -> None:
    v = check_convergence(converging(0.02))
    assert v.ok, v.reasons
    assert v.figures["heal_s"] == 5.0 and v.figures["convergence_ms"] == pytest.approx(20.0)


def test_slow_convergence_is_reported() -> None:
    v = check_convergence(converging(0.2))
    assert not v.ok and "allowed 90 ms" in v.reasons[0]


def test_strict_mode_allows_its_spend_publication_delay() -> None:
    """A strict node publishes a key's spends up to SPEND_DELAY_S late: the bound says so."""
    allowed_ms = 90 + SPEND_DELAY_S * 1000
    assert not check_convergence(converging(0.15)).ok
    v = check_convergence(converging(SPEND_DELAY_S + 0.05, mode="strict"))
    assert v.ok, v.reasons
    assert "strict spend publication delay" in v.figures["bound_rule"] and v.figures["allowed_ms"] == allowed_ms
    v = check_convergence(converging(SPEND_DELAY_S + 0.15, mode="strict"))
    assert not v.ok and f"allowed {allowed_ms:g} ms" in v.reasons[0]


def test_never_converging_and_no_heal() -> None:
    v = check_convergence(converging(50.0))
    assert not v.ok and "never caught up" in v.reasons[0]
    rec = converging(0.0)
    rec.faults = []
    assert check_convergence(rec).ok and check_convergence(rec).figures["convergence_ms"] is None


# ----------------------------------------------------------------------------- failover and client figures
def failover_run() -> Recording:
    scen = Scenario.build(duration_s=30, kill_region_at_s=10, kill_region="eu", restart_region_at_s=20, tenants=2)
    rec = Recording(scenario=scen.to_dict(), started_wall=WALL, ended_s=30.0, complete=True)
    rec.faults = [FaultRecord(10.0, "kill", "eu"), FaultRecord(20.0, "restart", "eu")]
    for i in range(3000):  # every 10 ms, alternating tenants, all homed in eu
        t = i * 0.01
        key = f"tenant-000{i % 2}"
        if t < 10.0 or t >= 20.2:
            rec.requests.append(RequestRecord(t, t, t + 0.005, "eu", "eu", "eu-1", key, 1, 200))
        elif t < 10.1:  # in flight when the region died: connection errors
            rec.requests.append(RequestRecord(t, t, t + 0.001, "eu", "", "", key, 1, 0, "ConnectionRefused"))
        else:
            rec.requests.append(RequestRecord(t, t, t + 0.02, "eu", "us", "us-1", key, 1, 429 if i % 3 else 200))
    rec.requests.append(RequestRecord(1.0, 1.0, 1.01, "us", "us", "us-1", "tenant-0000", 1, 503, "overloaded"))
    return rec


def test_failover_times() -> None:
    fo = failover_times(failover_run())
    [outage] = fo["outages"]
    assert outage["region"] == "eu" and outage["death_s"] == 10.0 and outage["back_s"] == 20.0
    assert outage["region_ms"] == pytest.approx(120.0)
    # every client's clock starts at the kill, not at its next request (tenant-0001's came at 10.01 s)
    assert outage["clients_ms"] == {"tenant-0000": pytest.approx(120.0), "tenant-0001": pytest.approx(130.0)}
    assert fo["max"] == pytest.approx(130.0) and fo["p50"] == pytest.approx(120.0)
    assert fo["unserved_clients"] == 0 and outage["clients"] == 2
    assert outage["failed_requests"] == 10 and outage["stalled_requests"] == 0
    assert fo["by_kind"]["kill"]["clients"] == 2


def test_failover_of_a_region_that_never_fails_over() -> None:
    rec = failover_run()
    rec.requests = [r for r in rec.requests if r.answered_region != "us"]
    fo = failover_times(rec)
    [outage] = fo["outages"]
    # served again only when eu-1 came back at 20 s: counted, never served elsewhere, and a failure
    assert outage["served_after_recovery"] == 2 and fo["unserved_clients"] == 2
    assert fo["p50"] == pytest.approx(10205.0) and fo["p99"] == pytest.approx(10215.0)
    s = summarize(rec)
    assert not s["checks"]["failover"] and any("served only when the outage ended" in r for r in s["reasons"])
    assert not summarize(rec, max_failover_ms=300)["invariants_ok"]


def test_a_region_dies_only_when_all_its_nodes_are_down() -> None:
    scen = Scenario.build(nodes_per_region=2, duration_s=30)
    rec = Recording(scenario=scen.to_dict())
    rec.faults = [FaultRecord(5.0, "kill", "eu-1"), FaultRecord(7.0, "kill", "eu-2")]
    # one outage per fault: eu-1 alone (eu-2 still serves eu) and then eu-2, which takes eu down
    assert [(o["death_s"], o["nodes"]) for o in failover_times(rec)["outages"]] == [(5.0, ["eu-1"]), (7.0, ["eu-2"])]
    assert failover_times(Recording())["p50"] is None


def test_client_errors_latency_and_throughput() -> None:
    rec = failover_run()
    errs = client_errors(rec)
    assert errs["total"] == 11 and errs["by_status"] == {"0": 10, "503": 1}
    assert errs["by_error"]["ConnectionRefused"] == 10 and errs["first_s"] == 1.0
    lat = latency_percentiles(rec.requests)  # every request, errors included, with their count beside
    assert lat["count"] == 3001 and lat["errors"] == 11 and lat["timeouts"] == 0
    assert lat["p50"] == pytest.approx(5.0) and lat["p99"] == pytest.approx(20.0)
    assert latency_percentiles(rec.requests, include_errors=False)["count"] == 2991
    assert latency_percentiles([])["p50"] is None
    thr = throughput(rec)
    assert thr["span_s"] == pytest.approx(29.995) and thr["throughput_rps"] == pytest.approx(2991 / 29.995, abs=1e-3)


# ----------------------------------------------------------------------------- summary
REQUIRED = {"admitted_tokens", "envelope_tokens", "over_admission_pct", "failover_ms", "client_errors",
            "token_loss", "throughput_rps", "latency_ms", "invariants_ok"}


def test_summary_has_the_required_keys_and_is_json(tmp_path) -> None:
    rec = recording(SCEN, spread(bucket_history(10, 5, [i / 30 for i in range(300)])), rejected=[0.5, 1.5])
    rec.save(tmp_path / "run")
    summary = summarize(Recording.load(tmp_path / "run"))
    assert REQUIRED <= set(summary)
    assert set(summary["failover_ms"]) == {"p50", "p99", "max"}
    assert set(summary["latency_ms"]) == {"p50", "p95", "p99"}
    assert summary["invariants_ok"] is True, summary["reasons"]
    assert summary["token_loss"] == 0 and summary["client_errors"] == 0
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert math.isclose(summary["envelope_slack_s"], 0.04 + DELIVERY_ALLOWANCE_S)


def test_summary_fails_incomplete_or_erroring_runs() -> None:
    rec = recording(SCEN, spread([1.0, 2.0]))
    rec.mark_incomplete("interrupted (KeyboardInterrupt)")
    s = summarize(rec)
    assert not s["invariants_ok"] and "interrupted" in s["reasons"][-1]
    assert summarize(rec, require_complete=False)["invariants_ok"]
    errs = failover_run()
    assert summarize(errs, max_client_errors=0)["checks"]["client_errors"] is False
