"""The simulator: determinism, the partition bound, catching a broken core, shrinking, files and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench.check import check_envelope, check_token_loss
from workbench.cli import main as cli_main
from workbench.history import Recording
from workbench.run.sim.files import read_schedule, write_schedule
from workbench.run.sim.schedule import SimFault, random_schedule, sim_faults_of
from workbench.run.sim.shrink import shrink, with_faults
from workbench.run.sim.world import run_world
from workbench.run.simulate import judge, load_core, schedule_rng, simulate
from workbench.spec.scenario import FaultAction, LimitSpec, LoadSpec, Scenario, Topology

BROKEN = str(Path(__file__).parent / "sim" / "broken_core.py") + ":NeverSubtractsPeers"
NeverSubtractsPeers = load_core(BROKEN)


def three_regions(*faults: FaultAction, rate: float = 50.0, load_rps: float = 450.0, seed: int = 7,
                  duration_s: float = 20.0) -> Scenario:
    return Scenario(name="hand", topology=Topology({"eu": 1, "us": 1, "ap": 1}, gossip_interval_ms=100.0),
                    limits=(LimitSpec("*", rate, rate),),
                    load=LoadSpec(rate_rps=load_rps, arrival="constant", route="check"),
                    faults=faults, duration_s=duration_s, seed=seed)


def granted_between(rec, a: float, b: float) -> float:
    return sum(ev.cost for ev in rec.audit if a <= ev.ts - rec.started_wall < b)


# ----------------------------------------------------------------------------- determinism
def test_same_seed_gives_the_same_history_and_another_seed_another() -> None:
    scenario, faults = random_schedule(schedule_rng(11, 3), index=3, max_faults=8)
    first, second = run_world(scenario, faults), run_world(scenario, faults)
    assert first.requests and first.audit and first.states
    for name in ("requests", "audit", "faults", "states"):
        assert getattr(first, name) == getattr(second, name), name
    assert first.extra == second.extra
    other = run_world(Scenario.from_dict({**scenario.to_dict(), "seed": scenario.seed + 1}), faults)
    assert [r.start_s for r in other.requests] != [r.start_s for r in first.requests]


def test_a_schedule_file_replays_the_same_run(tmp_path: Path) -> None:
    scenario = three_regions(FaultAction(3.0, "partition", groups=(("eu",), ("us", "ap")), duration_s=2.0),
                             FaultAction(6.0, "kill", "us-1"), duration_s=12.0)
    extra = [SimFault(4.0, "skew", "ap-1", ms=-1500.0), SimFault(2.0, "duplicate", pct=30.0, duration_s=5.0),
             SimFault(7.5, "restart_wiped", "us-1"), SimFault(8.0, "reorder", link=("eu", "ap"), pct=40.0, ms=80.0),
             SimFault(9.0, "restart", "eu-1")]  # a drill fault given with the rest goes into the drill's list
    faults = sim_faults_of(scenario, extra)
    path = write_schedule(tmp_path / "s.toml", scenario, faults, ["a note"])
    back_scenario, back_faults = read_schedule(path)
    assert back_scenario == with_faults(scenario, faults)
    assert back_faults == faults
    assert run_world(back_scenario, back_faults).audit == run_world(with_faults(scenario, faults), faults).audit
    drill = Scenario.from_file(path)  # what `workbench drill --scenario` reads: simulator-only faults dropped
    assert [f.action for f in drill.faults] == ["partition", "kill", "restart"]
    assert "restart_wiped" in path.read_text() and "# sim-fault = " in path.read_text()
    assert drill.cluster_toml({n: 9000 + i for i, n in enumerate(drill.topology.node_ids)}, router_port=8999,
                              secret="s", audit_dir="audit")


# ----------------------------------------------------------------------------- the bound
def test_no_fault_run_admits_the_limit_and_stays_within_the_steady_bound() -> None:
    res = simulate(three_regions())
    key = res.keys["tenant-0000"]
    admitted = res.envelope.figures["admitted_tokens"]
    assert 50 * 20 * 0.9 <= admitted <= 50 + 50 * 20 + key["bound"]
    assert res.ok and key["worst_excess"] <= key["terms"]["steady"]


def test_the_invoke_route_answers_429_and_every_admitted_reply_is_audited_once() -> None:
    res = simulate(Scenario.build(duration_s=5.0, load_rps=150.0, rate=50.0, burst=50.0))
    rec = res.recording
    assert {r.status for r in rec.requests} == {200, 429} and {r.route for r in rec.requests} == {"invoke"}
    admitted = [r.request_id for r in rec.requests if r.admitted]
    assert sorted(admitted) == sorted(ev.request_id for ev in rec.audit)
    assert check_token_loss(rec).ok


def test_a_small_burst_is_not_over_admitted_in_steady_state() -> None:
    """The simulator's first real finding: with a burst below (N-1) x share, a debt floor of one burst
    forgave every gossip round's in-flight spend (4 nodes, R 50, B 2.5, g 250 ms: 1.9x R admitted)."""
    scenario = Scenario(name="debt-floor", topology=Topology({"us": 1, "eu": 1, "ap": 2}, gossip_interval_ms=250.0),
                        limits=(LimitSpec("*", 50.0, 2.5),), load=LoadSpec(rate_rps=163.0, route="check"),
                        duration_s=12.0, seed=4)
    res = simulate(scenario)
    admitted = res.envelope.figures["admitted_tokens"]
    assert res.ok, res.keys
    assert admitted <= 2.5 + 50.0 * 12.0 + res.keys["tenant-0000"]["bound"]


def test_a_partition_into_k_sides_over_admits_about_k_times_within_the_bound() -> None:
    rate, start, length = 50.0, 5.0, 10.0
    groups = (("eu",), ("us",), ("ap",))
    res = simulate(three_regions(FaultAction(start, "partition", groups=groups, duration_s=length), rate=rate))
    rec, key = res.recording, res.keys["tenant-0000"]
    during = granted_between(rec, start + 1.0, start + length)  # after the peers timed out
    assert 0.85 * 3 * rate * (length - 1.0) <= during <= 1.1 * 3 * rate * (length - 1.0) + 3 * rate
    assert key["worst_excess"] >= 0.8 * (len(groups) - 1) * rate * length
    assert res.ok, key
    assert key["terms"]["partitions"] >= (len(groups) - 1) * rate * length
    healed = granted_between(rec, start + length + 2.0, 20.0)  # debt paid back, then the limit again
    assert healed <= rate * (20.0 - start - length - 2.0) + rate


def test_a_clock_past_the_replay_window_partitions_its_node_and_the_bound_counts_it() -> None:
    near = simulate(three_regions(load_rps=300.0), [SimFault(5.0, "skew", "eu-1", ms=20_000.0)])
    far = simulate(three_regions(load_rps=300.0), [SimFault(5.0, "skew", "eu-1", ms=40_000.0)])
    assert near.recording.extra["gossip_refused"] == {}
    assert far.recording.extra["gossip_refused"]["eu-1"]["stale"] > 0  # refused, counted, never merged
    assert far.keys["tenant-0000"]["worst_excess"] > 0.8 * 50.0 * 15.0  # eu-1 enforced alone for 15 s
    assert near.ok and far.ok, (near.keys, far.keys)


def test_restart_recovers_its_own_count_and_a_wiped_restart_never_counts_below_its_peers_copy() -> None:
    """A restart recovers its entry from its audit trail.  A wiped one has no trail: it takes its old
    entry back from the first peer that sends it (the peers' probes find it within a probe period, before
    its first grant here), or, when it grants before that, starts a new generation; never an entry lower
    than the copy its peers hold."""
    for action in ("restart", "restart_wiped"):
        scenario = three_regions(FaultAction(4.0, "kill", "eu-1"), duration_s=10.0, load_rps=30.0)
        res = simulate(scenario, [SimFault(5.0, action, "eu-1")])
        rec = res.recording
        grants = [ev for ev in rec.audit if ev.node == "eu-1"]
        before = {ev.gen for ev in grants if ev.ts - rec.started_wall < 4.0}
        after = {ev.gen for ev in grants if ev.ts - rec.started_wall > 5.0}
        assert len(before) == 1 and len(after) == 1
        assert min(after) >= max(before)
        old = [s for s in rec.states if s.node != "eu-1" and s.t_s < 4.0][-1].counts["tenant-0000"]["eu-1"]
        first = next(s for s in rec.states if s.node == "eu-1" and s.t_s > 5.0 and "tenant-0000" in s.counts)
        assert first.counts["tenant-0000"]["eu-1"] >= tuple(old)  # (generation, count): never behind
        last = [s for s in rec.states if s.node == "eu-1"][-1]
        gen, count = last.counts["tenant-0000"]["eu-1"]
        if action == "restart":
            assert count == sum(ev.cost for ev in grants if ev.gen == gen)  # never lower than its audit trail
        else:  # the grants its peers never heard of died with its data; every later one is counted
            new = sum(ev.cost for ev in grants if ev.ts - rec.started_wall > 5.0)
            assert old[1] + new <= count <= sum(ev.cost for ev in grants if ev.gen == gen)
        assert res.ok, res.keys


# ----------------------------------------------------------------------------- catching a broken core
def test_a_core_that_never_subtracts_peers_spend_fails_and_shrinks() -> None:
    scenario = three_regions(FaultAction(2.0, "latency", ms=20.0, duration_s=3.0),
                             FaultAction(9.0, "pause", "ap-1"), FaultAction(10.0, "resume", "ap-1"),
                             duration_s=12.0)
    extra = [SimFault(3.0, "skew", "us-1", ms=500.0), SimFault(5.0, "duplicate", pct=20.0, duration_s=2.0)]
    assert simulate(scenario, extra).ok
    broken = simulate(scenario, extra, table_factory=NeverSubtractsPeers)
    assert not broken.ok and broken.excess_over_bound > 100

    def fails(sc: Scenario, faults: list[SimFault]) -> bool:
        return not judge(sc, faults, run_world(sc, faults, table_factory=NeverSubtractsPeers)).ok

    small = shrink(scenario, broken.faults, fails, max_runs=40)
    assert len(small.faults) < len(broken.faults)
    assert fails(small.scenario, small.faults)
    assert with_faults(scenario, small.faults).faults == small.scenario.faults


def test_the_shrinker_keeps_exactly_the_faults_a_failure_needs() -> None:
    scenario = three_regions(duration_s=10.0)
    faults = [SimFault(1.0, "latency", ms=5.0, duration_s=1.0), SimFault(2.0, "kill", "eu-1"),
              SimFault(3.0, "duplicate", pct=10.0),
              SimFault(4.0, "partition", groups=(("us",), ("ap",)), duration_s=4.0),
              SimFault(5.0, "skew", "ap-1", ms=100.0), SimFault(6.0, "restart", "eu-1"), SimFault(7.0, "heal")]

    def fails(_sc: Scenario, fl: list[SimFault]) -> bool:  # needs the kill and the partition, nothing else
        acts = {f.action for f in fl}
        return {"kill", "partition"} <= acts

    small = shrink(scenario, faults, fails)
    assert [f.action for f in small.faults] == ["kill", "partition"]
    assert small.faults[1].duration_s < 4.0  # milder values where the failure allows them
    assert [f.action for f in small.scenario.faults] == ["kill", "partition"]


# ----------------------------------------------------------------------------- command line
def test_cli_json_keys_and_exit_codes(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    assert cli_main(["simulate", "--schedules", "3", "--seed", "4", "--duration-s", "10", "--json", str(out),
                     "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    for key in ("schedules", "failed", "seconds", "max_excess_over_bound_tokens", "counterexample", "invariants_ok"):
        assert key in doc
    assert doc["schedules"] == 3 and doc["failed"] == 0 and doc["invariants_ok"] is True
    assert doc["counterexample"] is None

    assert cli_main(["simulate", "--schedules", "3", "--seed", "4", "--duration-s", "30", "--json", str(out),
                     "--out", str(tmp_path / "bad"), "--core", BROKEN, "--quiet"]) == 1
    doc = json.loads(out.read_text())
    assert doc["failed"] >= 1 and doc["invariants_ok"] is False and doc["max_excess_over_bound_tokens"] > 0
    example = Path(doc["counterexample"])
    assert example.exists() and doc["shrunk"]["still_fails"]
    assert cli_main(["simulate", "--scenario", str(example), "--core", BROKEN]) == 1
    history = tmp_path / "history"
    assert cli_main(["simulate", "--scenario", str(example), "--json", str(out), "--out", str(history)]) == 0
    assert json.loads(out.read_text())["invariants_ok"] is True  # the real core holds on the same schedule
    rec = Recording.load(history)  # the drill's history format, judged by the same checker
    assert rec.complete and rec.audit and rec.requests and check_envelope(rec).figures["keys"]


BAD_SCENARIO = """{sim}
name = "bad"
duration_s = 10.0
limits = [{{pattern = "*", rate = 50.0, burst = 50.0}}]
faults = [{real}]
[topology]
nodes_per_region = {{eu = 1, us = 1}}
"""


@pytest.mark.parametrize(("sim", "real", "names"), [
    ('# sim-fault = {at_s = 3.0, action = "skew", target = "mars-1", ms = 10.0}', "", "sim-fault (line 1).target"),
    ('# sim-fault = {at_s = 30.0, action = "duplicate", pct = 10.0}', "", "sim-fault (line 1).at_s"),
    ('# sim-fault = {at_s = 3.0, action = "explode"}', "", "sim-fault (line 1).action"),
    ("", '{at_s = 2.0, action = "kill", target = "ap"}', "faults[0].target"),
    ("", '{at_s = 2.0, action = "partition", groups = [["eu"], ["mars"]]}', "faults[0].groups"),
    ("", '{at_s = 12.0, action = "kill", target = "eu"}', "faults[0].at_s"),
    ("", '{at_s = 1.0, action = "explode"}', "faults[0].action"),
])
def test_bad_scenario_exits_2_with_one_line_naming_the_parameter(tmp_path: Path, capsys, sim, real, names) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_SCENARIO.format(sim=sim, real=real))
    assert cli_main(["simulate", "--scenario", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err and "Traceback" not in err


@pytest.mark.parametrize(("flags", "names"), [
    (["--mode", "bogus"], "--mode"), (["--schedules", "0"], "--schedules"), (["--duration-s", "0.5"], "--duration-s"),
    (["--core", "no_such_module:Table"], "--core"), (["--core", "json:JSONDecoder"], "--core"),
    (["--scenario", "x.toml", "--schedules", "5"], "--schedules"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, flags, names) -> None:
    assert cli_main(["simulate", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err


def test_a_node_restarted_with_its_clock_set_back_is_not_refused_by_its_peers() -> None:
    """Found by the simulator: with a boot id from the wall clock alone, every peer refused the
    restarted node as ``replayed`` until its clock passed the old boot (1 of 545 requests admitted)."""
    scenario = three_regions(FaultAction(5.0, "restart", "eu-1"), duration_s=12.0, load_rps=120.0)
    res = simulate(scenario, [SimFault(4.0, "skew", "eu-1", ms=-10_000.0)])
    after = [r for r in res.recording.requests if r.node == "eu-1" and r.start_s > 6.0]
    assert after and sum(r.admitted for r in after) > len(after) / 5, (len(after), sum(r.admitted for r in after))
