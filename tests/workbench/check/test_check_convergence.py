"""Convergence per heal and restart, against the bound: slow or unmeasurable agreement fails."""

from __future__ import annotations

import pytest
from check_histories import WALL, recording

from workbench.check import check_convergence
from workbench.history import FaultRecord, StateSample
from workbench.spec.scenario import Scenario

SCEN = Scenario.build(regions=2, gossip_interval_ms=20, duration_s=20)  # bound: 2 x 20 ms


def sample(rec, t: float, me: str, own: int, other: str, seen: int) -> None:
    rec.states.append(StateSample(t, me, WALL + t, {"k": own + seen},
                                  {"k": {me: (1, own), other: (1, seen)}}))


def history(events: list[tuple[float, float]], *, step: float = 0.01, restart_boot: float = 0.0,
            restart_at: float | None = None) -> object:
    """Two nodes; at each (event time, delay) each learns the other's new count ``delay`` after it.
    With ``restart_at``, us-1 is not sampled for ``restart_boot`` seconds after its restart."""
    faults = [FaultRecord(t, "heal") for t, _ in events if t != restart_at]
    if restart_at is not None:
        faults.append(FaultRecord(restart_at, "restart", "us-1"))
    rec = recording(SCEN, sorted(faults, key=lambda f: f.t_s))
    own = {"eu-1": 10, "us-1": 20}
    for i in range(int(SCEN.duration_s / step)):
        t = round(i * step, 6)
        for me, other in (("eu-1", "us-1"), ("us-1", "eu-1")):
            if restart_at is not None and me == "us-1" and restart_at <= t < restart_at + restart_boot:
                continue
            done = sum(1 for e, d in events if t >= e + d)  # events this node has caught up with
            sample(rec, t, me, own[me] + 10 * sum(1 for e, _ in events if t >= e), other, own[other] + 10 * done)
    return rec


def test_every_heal_and_restart_is_measured_with_p50_and_max() -> None:
    v = check_convergence(history([(3.0, 0.02), (8.0, 0.03)], restart_at=8.0, restart_boot=0.5))
    assert v.ok, v.reasons
    assert [e["event"].split(" at")[0] for e in v.figures["events"]] == ["heal", "restart us-1"]
    heal, restart = v.figures["events"]
    assert heal["agreement_ms"] == pytest.approx(20.0, abs=1)
    assert restart["start_s"] == pytest.approx(8.5, abs=0.011)  # its clock starts when us-1 answers again
    assert v.figures["convergence_max_ms"] == max(heal["agreement_ms"], restart["agreement_ms"])
    assert restart["agreement_ms"] == 0.0  # us-1 answered after everything had converged
    assert v.figures["convergence_p50_ms"] == 0.0  # nearest rank of 2
    assert v.figures["allowed_ms"] == 90.0  # 2 gossip intervals of 20 ms + 50 ms delivery
    assert "2 gossip intervals" in v.figures["bound_rule"]


def test_a_stated_convergence_bound_replaces_the_default_both_ways() -> None:
    slow = history([(3.0, 0.02), (8.0, 0.3)])  # 300 ms to agree after the second heal
    assert not check_convergence(slow).ok
    v = check_convergence(slow, max_ms=400)
    assert v.ok and v.figures["allowed_ms"] == 400.0 and v.figures["bound_rule"] == "max_convergence_ms = 400"
    assert not check_convergence(history([(3.0, 0.06)]), max_ms=30).ok  # 60 ms > a stated 30 ms


def test_a_slow_heal_fails_even_when_another_was_fast() -> None:
    v = check_convergence(history([(3.0, 0.02), (8.0, 0.3)]))
    assert not v.ok and v.reasons[0].startswith("heal at 8.000s")
    assert [e["ok"] for e in v.figures["events"]] == [True, False]


def test_sampling_coarser_than_the_bound_cannot_pass_a_slow_cluster() -> None:
    v = check_convergence(history([(3.0, 0.3)], step=1.0))  # 300 ms late, samples 1 s apart
    assert not v.ok and "sampled too coarsely" in v.reasons[0]


def test_a_heal_with_nothing_sampled_after_it_fails_and_no_heal_is_not_applicable() -> None:
    rec = history([(3.0, 0.02)])
    rec.states = [s for s in rec.states if s.t_s < 3.0]
    v = check_convergence(rec)
    assert not v.ok and "nothing measured" in v.reasons[0]
    rec.faults = []
    v = check_convergence(rec)
    assert v.ok and v.figures["applicable"] is False and "not applicable" in v.figures["note"]


def test_a_restarted_node_is_timed_from_its_first_served_request_not_its_cold_start() -> None:
    """A cold node answers /v1/state before its peers' baselines arrived; it serves only after."""
    from check_histories import request

    rec = history([(3.0, 0.02), (8.0, 0.4)], restart_at=8.0)  # us-1 learns eu-1's count 400 ms late
    assert not check_convergence(rec).ok  # timed from its first state sample: too slow
    rec.requests.append(request(8.38, "us", "us-1"))  # its first served request, after its cold sync
    v = check_convergence(rec)
    assert v.ok, v.reasons
    assert v.figures["events"][1]["start_s"] == pytest.approx(8.385)
