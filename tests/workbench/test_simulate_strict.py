"""The simulator in strict mode: the real StrictTable and voters, judged against the plain envelope."""

from __future__ import annotations

import json
from pathlib import Path

from edge_server.strict.table import StrictTable
from workbench.cli import main as cli_main
from workbench.run.sim.schedule import SimFault
from workbench.run.sim.world import run_world
from workbench.run.simulate import draw_schedule, judge, simulate
from workbench.spec.scenario import FaultAction, LimitSpec, LoadSpec, Scenario, Topology


class NoFence(StrictTable):
    """A broken strict core: every node mints floating rights as if it held the whole lease.  (Both
    hooks: the settle of a take reads the share from ``_steps`` and applies the caps inline.)"""

    def _caps(self, st, phi):  # type: ignore[no-untyped-def]
        return super()._caps(st, 1.0)

    def _steps(self):  # type: ignore[no-untyped-def]
        return WHOLE_LEASE


WHOLE_LEASE = ([float("-inf")], [1.0])  # phi = 1 at every time


def three_regions(*faults: FaultAction, mode: str = "strict", rate: float = 50.0, duration_s: float = 12.0,
                  seed: int = 7) -> Scenario:
    return Scenario(name="strict", topology=Topology({"eu": 1, "us": 1, "ap": 1}, gossip_interval_ms=100.0),
                    limits=(LimitSpec("*", rate, rate),),
                    load=LoadSpec(rate_rps=9 * rate, arrival="constant", route="check"),
                    faults=faults, duration_s=duration_s, seed=seed, mode=mode)


def admitted_between(rec, a: float, b: float) -> float:
    return sum(ev.cost for ev in rec.audit if a <= ev.ts - rec.started_wall < b)


def test_random_strict_schedules_never_exceed_the_plain_envelope() -> None:
    admitted = 0.0
    for i in range(30):
        scenario, faults = draw_schedule(5, i, duration_s=8.0, max_faults=6, mode="strict")
        res = judge(scenario, faults, run_world(scenario, faults))
        assert res.recording.extra["table"] == "StrictTable"
        assert all(k["bound"] == 0.0 for k in res.keys.values())
        assert res.excess_over_bound <= 1e-6, (i, res.keys, [f.to_dict() for f in faults])
        assert res.ok
        admitted += res.envelope.figures.get("admitted_tokens") or 0
    assert admitted > 0  # a check with nothing admitted would prove nothing


def test_a_partition_over_admits_in_eventual_mode_and_never_in_strict_mode() -> None:
    cut = FaultAction(3.0, "partition", groups=(("eu",), ("us",), ("ap",)), duration_s=6.0)
    eventual = simulate(three_regions(cut, mode="eventual"))
    strict = simulate(three_regions(cut))
    e_worst = max(k["worst_excess"] for k in eventual.keys.values())
    s_worst = max(k["worst_excess"] for k in strict.keys.values())
    assert e_worst > 50.0  # three sides each spend the rate: about 2 R x 6 s over the envelope
    assert s_worst <= 1e-6 and strict.ok
    # the isolated sides fall to their pinned shares: well below R during the cut, yet not zero
    during = admitted_between(strict.recording, 5.0, 9.0) / 4.0
    assert 0 < during < 50.0


def test_strict_mode_serves_most_of_the_rate_without_faults() -> None:
    res = simulate(three_regions(duration_s=10.0))
    assert res.ok
    rate = admitted_between(res.recording, 4.0, 10.0) / 6.0
    assert rate > 0.8 * 50.0


def test_a_core_without_fencing_over_admits_under_a_partition_and_the_checker_says_so() -> None:
    cut = FaultAction(3.0, "partition", groups=(("eu",), ("us",), ("ap",)), duration_s=6.0)
    res = simulate(three_regions(cut), strict_table=NoFence)
    assert not res.ok and res.excess_over_bound > 1.0


def test_strict_runs_are_deterministic_and_survive_kills_restarts_pauses_and_skew() -> None:
    faults = (FaultAction(2.0, "kill", "us-1"), FaultAction(4.0, "restart", "us-1"),
              FaultAction(5.0, "pause", "eu-1"), FaultAction(6.5, "resume", "eu-1"))
    extra = [SimFault(3.0, "skew", "ap-1", ms=-5000.0), SimFault(7.0, "restart_wiped", "ap-1"),
             SimFault(1.0, "duplicate", pct=40.0, duration_s=8.0), SimFault(1.0, "reorder", pct=40.0, ms=80.0,
                                                                          duration_s=8.0)]
    first = simulate(three_regions(*faults), extra)
    second = simulate(three_regions(*faults), extra)
    assert first.ok and first.excess_over_bound <= 1e-6
    assert [ev.ts for ev in first.recording.audit] == [ev.ts for ev in second.recording.audit]
    refused = first.recording.extra["gossip_refused"]
    assert sum(c.get("replayed", 0) for c in refused.values()) > 0  # duplicates were refused, counted
    assert admitted_between(first.recording, 8.0, 12.0) > 0  # the restarted nodes serve again


def test_cli_strict_mode_json(tmp_path: Path) -> None:
    out = tmp_path / "sum.json"
    code = cli_main(["simulate", "--mode", "strict", "--schedules", "3", "--duration-s", "4", "--quiet",
                     "--json", str(out), "--out", str(tmp_path / "ce")])
    doc = json.loads(out.read_text())
    assert code == 0 and doc["mode"] == "strict" and doc["core"].endswith("StrictTable")
    assert doc["max_excess_over_bound_tokens"] <= 0 and doc["failed"] == 0


def test_a_pause_during_an_audit_write_turns_the_late_answer_into_a_denial() -> None:
    """The simulated node answers a grant once its audit write is done; a pause of the process in
    between holds the answer, and the lease re-check right before it leaves refuses it (spent, audited)."""
    pauses = [FaultAction(1.0 + 1.5 * i, "pause", target="eu", duration_s=0.8) for i in range(7)]
    res = simulate(three_regions(*pauses, rate=1000.0, seed=3))
    rec = res.recording
    revoked = rec.extra["revoked_after_write"]
    assert revoked["eu-1"] >= 1  # the paused node held a grant past its lease (deterministic for this seed)
    late = [r for r in rec.requests if r.error == "lease_ended_before_answer"]
    assert len(late) == sum(revoked.values())  # other nodes too: their share fell while eu's voter slept
    assert all(r.status == 200 and r.allowed is False for r in late)
    assert res.ok and res.excess_over_bound <= 1e-6
