"""A replica holder that falls behind catches up from the origin's segments, not from memory.

Real nodes: the holder is paused (SIGSTOP) while the origin writes enough events to seal several
segments; the origin keeps serving, reports the backlog and the recovery point (``/v1/state`` and
``/metrics``), and after the resume the holder receives every event -- read back from the sealed,
compressed segments -- and the replica is the origin's trail line for line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from procs import ClusterProcs, metric_value, request, wait_until

from edge_server.audit.export import EventFilter, iter_events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class SmallSegments(ClusterProcs):
    def toml(self) -> str:
        return super().toml() + "\n[audit]\nsegment_bytes = 8192\ncompress_level = 1\nreplicate_interval_ms = 20\n"


def test_a_paused_holder_catches_up_from_sealed_segments(tmp_path: Path) -> None:
    cluster = SmallSegments(tmp_path, regions=["eu", "us"], rate=100_000, burst=100_000)
    with cluster:
        holder = cluster.nodes["us-1"].child
        assert holder is not None
        holder.pause()
        try:
            for i in range(400):  # ~40 events a segment: about ten segments while the holder sleeps
                r = request(cluster.url("eu-1"), "POST", "/v1/limits/check", json={"key": f"p{i % 9}"})
                assert r.status == 200 and r.json()["allowed"], r.body
            state = cluster.state("eu-1", [])
            rep = state["audit_replication"]
            assert state["audit_segments"] >= 5, state["audit_segments"]
            assert rep["acked_seq"] == 0 and rep["lag_events"] == 400 and rep["lag_s"] > 0, rep
            text = cluster.metrics("eu-1")
            assert metric_value(text, "edge_audit_replication_lag_events", holder="us-1") == 400
            assert metric_value(text, "edge_audit_replication_lag_seconds", holder="us-1") > 0
            sealed = sorted((cluster.audit_dir / "eu-1").glob("seg-*.jsonl.gz"))
            assert sealed and sealed[0].name == "seg-000000000001.jsonl.gz"  # the backlog's start is sealed
        finally:
            holder.resume()
        wait_until(lambda: cluster.state("us-1", [])["audit_replicas"]["held"].get("eu-1") == 400, timeout=20.0,
                   what="us-1 to catch up with eu-1's 400 events")
        wait_until(lambda: cluster.state("eu-1", [])["audit_replication"]["lag_events"] == 0, timeout=5.0,
                   what="eu-1 to see them acknowledged")
        assert metric_value(cluster.metrics("eu-1"), "edge_audit_replication_acked_seq", holder="us-1") == 400
    only_eu = EventFilter(nodes=("eu-1",))
    assert [line for line, _ in iter_events([cluster.audit_dir / "replicas"], only_eu)] == [
        line for line, _ in iter_events([cluster.audit_dir], only_eu)]
