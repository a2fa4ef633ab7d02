"""The token-loss check's fourth source in a real drill: replication on (the scenario's
``replicate``, the default), real nodes on loopback write each other's replicas, and the check reads
them -- passing when the trails are intact, accounting for a node whose own trail is lost, and
catching the loss when the replica does not have it either."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from workbench.check import check_token_loss
from workbench.check.tokens import read_replicas, replica_folder
from workbench.run.drill import run_drill
from workbench.spec.scenario import Scenario, ScenarioError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def test_the_scenario_key_reaches_the_cluster_file() -> None:
    on, off = Scenario.build(), Scenario.build(replicate=False)
    assert on.topology.replicate and not off.topology.replicate
    assert Scenario.from_dict(off.to_dict()) == off
    ports = {"eu-1": 9001, "us-1": 9002, "ap-1": 9003}
    cfg = off.cluster_config(ports, router_port=9000, secret="s" * 16, audit_dir="audit")
    assert cfg.audit.replicate is False
    assert on.cluster_config(ports, router_port=9000, secret="s" * 16, audit_dir="audit").audit.replicate
    with pytest.raises(ScenarioError) as err:
        Scenario.build(replicate="yes")
    assert err.value.field == "replicate"


async def test_a_drill_reads_the_replicas_and_catches_a_lost_trail(tmp_path: Path) -> None:
    scenario = Scenario.build(name="t-replicas", duration_s=3.0, regions=2, rate=500.0, burst=200.0,
                              load_rps=100.0, route="check", seed=5)
    result = await run_drill(scenario, tmp_path / "run")
    rec = result.recording
    folder = replica_folder(rec)
    assert folder is not None and folder.is_dir(), rec.extra
    verdict = check_token_loss(rec)
    figures = verdict.figures
    assert verdict.ok, verdict.reasons
    assert result.summary["checks"]["token_loss"], result.summary["reasons"]
    assert figures["replica_nodes"] == ["eu-1", "us-1"]  # each region holds the other's trail
    assert figures["replica_mismatch"] == 0 and figures["replica_missing_grants"] == 0
    assert figures["accounted_by_replica_only"] == 0  # every replica event is also in its origin's trail
    replicas = read_replicas(folder)
    held = [ev for ev in replicas if ev.node == "eu-1"]
    assert held and figures["replica_events"] == len(replicas)

    # eu-1's disk is lost: its own trail is gone, the replica in us still accounts for its grants
    lost = dataclasses.replace(rec, audit=[ev for ev in rec.audit if ev.node != "eu-1"])
    verdict = check_token_loss(lost)
    assert verdict.figures["accounted_by_replica_only"] == len(held)
    behind = figures["not_replicated_at_end"].get("eu-1", 0)  # the recovery point at the end: truly lost
    assert verdict.ok == (behind == 0), (behind, verdict.reasons)

    # and the replica does not have them either: the check catches the loss
    verdict = check_token_loss(lost, replicas=[ev for ev in replicas if ev.node != "eu-1"])
    assert not verdict.ok and any("have no audit event" in r for r in verdict.reasons), verdict.reasons

    # one event gone from the middle of eu-1's own trail is not a lost disk: the replica shows the hole
    middle = sorted(ev.seq for ev in rec.audit if ev.node == "eu-1")[len(held) // 2]
    holed = dataclasses.replace(rec, audit=[ev for ev in rec.audit if (ev.node, ev.seq) != ("eu-1", middle)])
    verdict = check_token_loss(holed)
    assert not verdict.ok and verdict.figures["origin_trail_holes"] == 1, verdict.reasons

    # a replica that lacks one of eu-1's grants while holding later ones disagrees with the clients
    gap = [ev for ev in replicas if not (ev.node == "eu-1" and ev.seq == 1)]
    verdict = check_token_loss(rec, replicas=gap)
    assert not verdict.ok and verdict.figures["replica_missing_grants"] == 1, verdict.reasons
