"""Failover per outage, from the fault's time, for every affected client: bad histories fail, good pass."""

from __future__ import annotations

import pytest
from check_histories import recording, request, traffic

from workbench.check import check_failover, failover_times, summarize
from workbench.history import FaultRecord
from workbench.spec.scenario import Scenario

THREE = Scenario.build(duration_s=10, tenants=2)
KEYS = ("tenant-0000", "tenant-0001")


def kill_run(*, served_elsewhere: bool) -> object:
    """eu killed at 2 s, restarted at 6 s; its clients fail for 50 ms, then us-1 serves them (or not)."""
    rec = recording(THREE, [FaultRecord(2.0, "kill", "eu"), FaultRecord(6.0, "restart", "eu")])

    def answer(t: float):
        if t < 2.0 or t >= 6.0:
            return "eu-1"
        if t < 2.05 or not served_elsewhere:
            return None
        return "us-1"

    traffic(rec, "eu", answer, start=0.0, end=8.0, keys=KEYS)
    traffic(rec, "us", lambda t: "us-1", start=0.0, end=8.0, step=0.05)
    return rec


def test_a_kill_is_timed_from_the_fault_for_every_client_and_counts_the_failed_requests() -> None:
    v = check_failover(kill_run(served_elsewhere=True))
    assert v.ok, v.reasons
    [o] = v.figures["outages"]
    assert (o["kind"], o["target"], o["death_s"], o["back_s"]) == ("kill", "eu", 2.0, 6.0)
    assert o["clients"] == 2 and o["unserved"] == 0 and o["served_after_recovery"] == 0
    # first success of each client from us-1: tenant-0001 at 2.05 + 5 ms, tenant-0000 at 2.06 + 5 ms
    assert o["clients_ms"] == {"tenant-0000": pytest.approx(65.0), "tenant-0001": pytest.approx(55.0)}
    assert o["failed_requests"] == 5 and o["stalled_requests"] == 0
    assert v.figures["by_kind"]["kill"]["p99"] == pytest.approx(65.0)
    assert "1 outages, 2 affected clients" in v.figures["looked_at"]


def test_a_region_whose_clients_are_never_served_elsewhere_fails() -> None:
    v = check_failover(kill_run(served_elsewhere=False))
    assert not v.ok and "served only when the outage ended" in v.reasons[0]
    assert v.figures["outages"][0]["failed_requests"] == 400  # every request between the kill and the restart


def pause_run(*, move_after_s: float | None) -> object:
    """eu paused at 2 s, resumed at 4 s: what eu-1 held is answered at the resume (stalled)."""
    rec = recording(THREE, [FaultRecord(2.0, "pause", "eu"), FaultRecord(4.0, "resume", "eu")])
    for i in range(600):
        t = round(i * 0.01, 9)
        key = KEYS[i % 2]
        if t < 2.0 - 0.005 or t >= 4.0:
            rec.requests.append(request(t, "eu", "eu-1", key=key))
        elif move_after_s is not None and t >= 2.0 + move_after_s:
            rec.requests.append(request(t, "eu", "us-1", key=key, took=0.02))
        else:  # sent to the paused node: held until the resume
            rec.requests.append(request(t, "eu", "eu-1", key=key, took=4.0 - t + 0.002))
    return rec


def test_a_pause_counts_the_stalled_requests_and_times_failover_from_the_pause() -> None:
    v = check_failover(pause_run(move_after_s=0.3))
    assert v.ok, v.reasons
    [o] = v.figures["outages"]
    assert o["kind"] == "pause" and o["clients"] == 2
    assert o["stalled_requests"] == 30  # sent 2.00 s .. 2.29 s, answered only at the resume
    assert o["max_ms"] == pytest.approx(330.0)  # tenant-0001's first answer from us-1: 2.31 + 20 ms


def test_a_pause_whose_clients_only_wait_for_the_resume_fails() -> None:
    v = check_failover(pause_run(move_after_s=None))
    assert not v.ok and "served only when the outage ended" in " ".join(v.reasons)
    assert v.figures["outages"][0]["stalled_requests"] == 200
    assert v.figures["p99"] == pytest.approx(2002.0, abs=10)  # they did wait until the resume


def test_a_blackhole_ends_at_the_heal_and_timeouts_are_failed_requests() -> None:
    rec = recording(THREE, [FaultRecord(2.0, "blackhole", "eu"), FaultRecord(5.0, "heal")])

    def answer(t: float):
        if t < 2.0 or t >= 5.0:
            return "eu-1"
        if t < 2.4:
            return ("", 0, 1.0)  # the router's per-try timeout: no answer
        return ("us-1", 200, 0.01)

    traffic(rec, "eu", answer, start=0.0, end=6.0, keys=KEYS)
    v = check_failover(rec)
    assert v.ok, v.reasons
    [o] = v.figures["outages"]
    assert (o["kind"], o["back_s"]) == ("blackhole", 5.0)
    assert o["failed_requests"] == o["timed_out_requests"] == 40
    assert o["max_ms"] == pytest.approx(420.0)


def test_a_partition_that_cuts_a_region_from_the_router_is_an_outage_and_one_between_regions_is_not() -> None:
    cut = FaultRecord(2.0, "partition", "eu|us,ap,router", {"groups": [["eu"], ["us", "ap", "router"]]})
    rec = recording(THREE, [cut, FaultRecord(3.0, "end_partition", "all links")])
    traffic(rec, "eu", lambda t: "eu-1" if t < 2.0 or t >= 3.0 else ("us-1" if t >= 2.1 else None),
            start=0.0, end=4.0, keys=KEYS)
    fo = failover_times(rec)
    [o] = fo["outages"]
    assert (o["kind"], o["nodes"], o["back_s"]) == ("partition", ["eu-1"], 3.0)
    assert check_failover(rec).ok
    between = FaultRecord(2.0, "partition", "eu|us,ap", {"groups": [["eu"], ["us", "ap"]]})
    rec.faults = [between, FaultRecord(3.0, "heal")]
    assert failover_times(rec)["outages"] == []


def test_one_node_of_a_two_node_region_is_an_outage_served_by_the_other_node() -> None:
    scen = Scenario.build(duration_s=10, nodes_per_region=2, tenants=2)
    rec = recording(scen, [FaultRecord(2.0, "kill", "eu-1")])
    traffic(rec, "eu", lambda t: ("eu-1" if int(t * 100) % 2 else "eu-2") if t < 2.0 else "eu-2",
            start=0.0, end=4.0, keys=KEYS)
    v = check_failover(rec)
    assert v.ok, v.reasons
    [o] = v.figures["outages"]
    assert o["nodes"] == ["eu-1"] and o["clients"] == 2 and o["max_ms"] == pytest.approx(15.0)


def test_an_outage_that_affected_no_measured_client_fails_as_nothing_measured() -> None:
    rec = recording(THREE, [FaultRecord(2.0, "kill", "ap")])
    traffic(rec, "eu", lambda t: "eu-1", start=0.0, end=4.0)  # ap has no client at all
    v = check_failover(rec)
    assert not v.ok and "nothing measured" in v.reasons[0] and "ap" in v.reasons[0]
    assert not summarize(rec)["checks"]["failover"]


def test_a_planned_outage_that_was_never_applied_fails_and_no_outage_is_not_applicable() -> None:
    planned = Scenario.build(duration_s=10, kill_region_at_s=2.0, kill_region="eu")
    rec = recording(planned)
    traffic(rec, "eu", lambda t: "eu-1", start=0.0, end=4.0)
    v = check_failover(rec)
    assert not v.ok and "plans a kill but none was applied" in v.reasons[0]
    calm = recording(THREE)
    traffic(calm, "eu", lambda t: "eu-1", start=0.0, end=4.0)
    v = check_failover(calm)
    assert v.ok and v.figures["applicable"] is False and "not applicable" in v.figures["looked_at"]
    assert not check_failover(calm, max_failover_ms=500).ok  # a bound with nothing to bound


def test_the_summary_reports_failover_per_outage_kind() -> None:
    rec = kill_run(served_elsewhere=True)
    s = summarize(rec, require_complete=False, error_budget_pct=100)
    assert s["checks"]["failover"], s["reasons"]
    assert s["failover_ms"]["max"] == pytest.approx(65.0)
    assert s["failover"]["by_kind"]["kill"]["clients"] == 2 and s["failover"]["failed_requests"] == 5
    assert "clients_ms" not in s["failover"]["outages"][0]
    assert not summarize(rec, max_failover_ms=60, error_budget_pct=100)["checks"]["failover"]
