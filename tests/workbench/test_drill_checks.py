"""What the verdict needs from a real drill: dense state samples around a heal, and every request of
every generator process in the history (real processes on loopback, a few seconds each)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from workbench.run.drill import run_drill, state_sampling_windows
from workbench.spec.scenario import Scenario

pytestmark = pytest.mark.integration


def test_sampling_windows_surround_every_heal_restart_and_timed_end() -> None:
    scen = Scenario.build(duration_s=20, partition_at_s=2.0, heal_at_s=5.0, kill_region_at_s=8.0,
                          restart_region_at_s=12.0)
    assert state_sampling_windows(scen) == [(4.5, 7.0), (11.5, 14.0)]
    assert state_sampling_windows(Scenario.build(duration_s=5)) == []


async def test_a_heal_is_sampled_densely_and_two_generator_processes_lose_no_record(tmp_path: Path) -> None:
    scenario = Scenario.build(name="t-heal", duration_s=5.0, rate=200.0, burst=100.0, load_rps=120.0,
                              route="check", partition_at_s=1.0, heal_at_s=2.5, gossip_interval_ms=20.0,
                              processes=2, seed=9)
    result = await run_drill(scenario, tmp_path / "run")
    rec, s = result.recording, result.summary
    # every request both processes sent is in the history, and the verdict says so
    sent = rec.extra["generator"]["sent"]
    assert sent == sum(1 for r in rec.requests if r.error != "max_inflight reached") > 0
    assert s["checks"]["complete"], s["reasons"]
    # around the heal every node was sampled every gossip interval (20 ms) instead of every second;
    # a busy machine stretches the gaps, so only the median is asserted, with room for a loaded loop
    heal = next(f.t_s for f in rec.faults if f.action == "heal")
    for node in scenario.topology.node_ids:
        times = sorted(x.t_s for x in rec.states if x.node == node and heal - 0.4 <= x.t_s <= heal + 1.5)
        gaps = sorted(b - a for a, b in itertools.pairwise(times))
        assert len(times) > 10 and gaps[len(gaps) // 2] <= 0.1, (node, len(times), gaps[len(gaps) // 2])
    conv = s["convergence"]
    assert conv["applicable"] and conv["events"] == 1 and s["convergence_ms"] is not None
    assert s["checked"]["convergence"].startswith("1 heal / restart events")
