"""Token loss with the replicated trails as a fourth source: real replica files, written by the
node's own writer into a run folder's ``audit/replicas``, account for the grants of a node whose own
trail is gone, and a replica that disagrees with its origin, or lacks a grant it should hold, fails."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from check_histories import audited_run

from edge_server.audit import AuditLog
from edge_server.config import AuditConfig
from workbench.check import check_token_loss
from workbench.check.tokens import read_replicas, replica_folder
from workbench.history import AuditEvent, Recording
from workbench.spec.scenario import Scenario

SCEN = Scenario.build(rate=10, burst=5, duration_s=10)
NODES = ("eu-1", "us-1", "ap-1")
SECRET = b"replica-test-secret-0123456789abcdef"


def history() -> Recording:
    """12 consistent grants (4 per node), the audit numbered per node as a node numbers its trail."""
    rec = audited_run(SCEN, [(0.5 + 0.5 * i, "tenant-0000", NODES[i % 3]) for i in range(12)], final_nodes=NODES)
    seqs = dict.fromkeys(NODES, 0)
    for ev in rec.audit:
        seqs[ev.node] += 1
        ev.seq, ev.id = seqs[ev.node], f"{ev.node}:{seqs[ev.node]}"
    return rec


def write_replicas(run_dir: Path, events: list[AuditEvent]) -> Path:
    """The replicas as a holder writes them: one trail per origin under ``audit/replicas``, tiny
    segments so that sealed (gzip) segments are read too."""
    folder = run_dir / "audit" / "replicas"

    async def write() -> None:
        logs: dict[str, AuditLog] = {}
        for ev in events:
            log = logs.get(ev.node)
            if log is None:
                log = logs[ev.node] = AuditLog(folder, ev.node, ev.region, SECRET, AuditConfig(segment_bytes=4096))
                log.open()
            await log.append(ev.key, ev.cost, ev.gen, ev.request_id, ev.ts)
        for log in logs.values():
            await log.wait_sealed(10.0)
            log.close()

    asyncio.run(write())
    return folder


def test_replicas_that_match_their_origins_pass_and_are_counted(tmp_path: Path) -> None:
    rec = history()
    write_replicas(tmp_path, rec.audit)
    rec.extra["cluster"] = {"run_dir": str(tmp_path)}
    assert replica_folder(rec) == tmp_path / "audit" / "replicas"
    v = check_token_loss(rec)
    assert v.ok, v.reasons
    assert v.figures["replica_events"] == 12 and v.figures["replica_nodes"] == list(sorted(NODES))
    assert v.figures["accounted_by_replica_only"] == 0 and v.figures["not_replicated_at_end"] == {}
    assert "12 replica events" in v.figures["looked_at"]


def test_a_node_whose_disk_is_lost_still_has_its_grants_accounted_for_by_its_replica(tmp_path: Path) -> None:
    rec = history()
    write_replicas(tmp_path, rec.audit)
    rec.audit = [ev for ev in rec.audit if ev.node != "eu-1"]  # eu-1's own trail is gone
    without = check_token_loss(rec)
    assert not without.ok and without.figures["answered_without_audit"] == 4
    assert without.figures["replicas"].startswith("none")
    rec.extra["cluster"] = {"run_dir": str(tmp_path)}
    v = check_token_loss(rec)
    assert v.ok, v.reasons
    assert v.figures["accounted_by_replica_only"] == 4 and v.figures["token_loss"] == 0


def test_a_replica_event_that_differs_from_its_origin_is_a_disagreement(tmp_path: Path) -> None:
    rec = history()
    replicas = read_replicas(write_replicas(tmp_path, rec.audit))
    replicas[1] = dataclasses.replace(replicas[1], cost=5)
    v = check_token_loss(rec, replicas=replicas)
    assert not v.ok and v.figures["replica_mismatch"] == 1
    assert "differ from their origin" in v.reasons[0] and f"{replicas[1].node}:{replicas[1].seq}" in v.reasons[0]


def test_a_grant_answered_before_the_replicas_newest_event_but_absent_from_it_is_loss(tmp_path: Path) -> None:
    rec = history()
    replicas = read_replicas(write_replicas(tmp_path, rec.audit))
    gone = next(ev for ev in replicas if ev.node == "eu-1" and ev.seq == 2)
    v = check_token_loss(rec, replicas=[ev for ev in replicas if ev is not gone])  # eu-1's seq 3 and 4 are there
    assert not v.ok and v.figures["replica_missing_grants"] == 1 and v.figures["replica_mismatch"] == 0
    assert gone.request_id in v.reasons[0] and "missing from their node's replica" in v.reasons[0]


def test_events_the_replica_had_not_received_at_the_end_are_the_recovery_point_not_loss(tmp_path: Path) -> None:
    rec = history()
    eu = [ev for ev in rec.audit if ev.node == "eu-1"]
    write_replicas(tmp_path, [ev for ev in rec.audit if ev is not eu[-1]])  # the newest still in flight
    rec.extra["audit_replicas_dir"] = str(tmp_path / "audit" / "replicas")
    v = check_token_loss(rec)
    assert v.ok, v.reasons
    assert v.figures["not_replicated_at_end"] == {"eu-1": 1}
    assert v.figures["not_replicated_oldest_age_s"]["eu-1"] > 0


def test_an_unreadable_replica_is_a_clear_failure_not_a_crash(tmp_path: Path) -> None:
    rec = history()
    folder = write_replicas(tmp_path, rec.audit)
    with open(folder / "us-1.jsonl", "ab") as fh:
        fh.write(b"not an event\n")
    rec.extra["audit_replicas_dir"] = str(folder)
    v = check_token_loss(rec)
    assert not v.ok and "replica trails could not be read" in v.reasons[0] and "us-1.jsonl" in v.reasons[0]
