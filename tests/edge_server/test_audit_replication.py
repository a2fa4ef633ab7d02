"""Audit replicas across regions with real nodes: every event of a node reaches the replica holder
in the next region, acknowledged, resent after the holder was killed, verifiable by the same tool;
forged, misaddressed, out-of-order and replayed messages are refused (or change nothing) and counted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from procs import ClusterProcs, request, wait_until

from edge_server.audit.export import EventFilter, iter_events
from edge_server.wire import SIGNATURE_HEADER, sign

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]


class ReplicatedCluster(ClusterProcs):
    def toml(self) -> str:
        return super().toml() + ("\n[audit]\nsegment_bytes = 16384\ncompress_level = 1\nreplicate = true\n"
                                 "replicate_interval_ms = 20\n")


def _grants(cluster: ClusterProcs, node: str, count: int) -> None:
    for i in range(count):
        r = request(cluster.url(node), "POST", "/v1/limits/check", json={"key": f"r{i % 7}"})
        assert r.status == 200 and r.json()["allowed"], r.body


def _held(cluster: ClusterProcs, holder: str, origin: str) -> int:
    return cluster.state(holder, [])["audit_replicas"]["held"].get(origin, 0)


def _post(cluster: ClusterProcs, node: str, body: bytes, signature: str | None) -> tuple[int, dict]:
    headers = {SIGNATURE_HEADER: signature} if signature else {}
    r = request(cluster.url(node), "POST", "/v1/audit/replica", body=body, headers=headers)
    return r.status, r.json()


def test_events_reach_the_next_region_and_survive_its_restart(tmp_path: Path) -> None:
    cluster = ReplicatedCluster(tmp_path, regions=["eu", "us"], rate=100_000, burst=100_000)
    with cluster:
        _grants(cluster, "eu-1", 300)
        wait_until(lambda: _held(cluster, "us-1", "eu-1") == 300, timeout=10.0, what="us-1 to hold eu-1's 300 events")
        cluster.kill9("us-1")
        _grants(cluster, "eu-1", 300)  # the holder is down: kept and resent
        rep = cluster.state("eu-1", [])["audit_replication"]
        assert rep["target"] == "us-1" and rep["lag_events"] > 0 and rep["lag_s"] > 0, rep
        cluster.restart("us-1")
        wait_until(lambda: _held(cluster, "us-1", "eu-1") == 600, timeout=15.0, what="eu-1's events resent to us-1")
        wait_until(lambda: cluster.state("eu-1", [])["audit_replication"]["lag_events"] == 0, timeout=5.0,
                   what="eu-1 to see its events acknowledged")
        # us-1's own events went the other way round (two regions: each holds the other's).
        _grants(cluster, "us-1", 50)
        wait_until(lambda: _held(cluster, "eu-1", "us-1") == 50, timeout=10.0, what="eu-1 to hold us-1's events")
    replicas = cluster.audit_dir / "replicas"
    assert len(list((replicas / "eu-1").glob("seg-*.jsonl.gz"))) >= 3  # sealed and signed like the origin's
    out = subprocess.run([sys.executable, "-m", "edge_server", "audit", "verify", str(replicas), "--cluster",
                          str(cluster.cluster_file)], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "eu-1: ok: 600 events" in out.stdout and "us-1: ok: 50 events" in out.stdout, \
        out.stdout + out.stderr
    # The replica is the origin's trail, line for line (cut into segments at other places).
    only_eu = EventFilter(nodes=("eu-1",))
    assert [line for line, _ in iter_events([replicas], only_eu)] == [
        line for line, _ in iter_events([cluster.audit_dir], only_eu)]


def test_forged_misaddressed_out_of_order_and_replayed_messages(tmp_path: Path) -> None:
    cluster = ReplicatedCluster(tmp_path, regions=["eu", "us"], rate=100_000, burst=100_000)
    with cluster:
        _grants(cluster, "eu-1", 20)
        wait_until(lambda: _held(cluster, "us-1", "eu-1") == 20, timeout=10.0, what="us-1 to hold eu-1's events")
        lines = (cluster.audit_dir / "eu-1.jsonl").read_bytes().splitlines(keepends=True)
        secret = cluster.secret.encode()

        def message(to: str, payload: list[bytes], origin: str = "eu-1") -> bytes:
            return orjson.dumps({"v": 1, "origin": origin, "region": "eu", "to": to}) + b"\n" + b"".join(payload)

        body = message("us-1", lines[:5])
        status, doc = _post(cluster, "us-1", body, None)
        assert status == 401 and doc["error"]["code"] == "replica_bad_signature"
        status, doc = _post(cluster, "us-1", body, sign(b"not-the-cluster-secret", body))
        assert status == 401
        status, doc = _post(cluster, "us-1", message("eu-1", lines[:5]), sign(secret, message("eu-1", lines[:5])))
        assert status == 400 and doc["error"]["code"] == "replica_misaddressed"
        status, doc = _post(cluster, "us-1", body, sign(secret, body))  # a replay: lines it holds
        assert status == 200 and doc["appended"] == 0 and doc["last_seq"] == 20
        ev = orjson.loads(lines[5])
        ev["seq"] = 25  # a gap: out of order
        gap = message("us-1", [orjson.dumps(ev) + b"\n"])
        status, doc = _post(cluster, "us-1", gap, sign(secret, gap))
        assert status == 409 and doc["last_seq"] == 20 and doc["error"]["code"] == "replica_out_of_order"
        ev = orjson.loads(lines[-1])
        ev["seq"], ev["cost"] = 21, 5  # the next seq, but not a line eu-1 wrote (a correctly signed forgery)
        forged = message("us-1", [orjson.dumps(ev) + b"\n"])
        status, doc = _post(cluster, "us-1", forged, sign(secret, forged))
        assert status == 409 and "chain" in doc["error"]["message"]
        refused = cluster.state("us-1", [])["audit_replicas"]["refused"]
        assert refused == {"bad_signature": 2, "misaddressed": 1, "out_of_order": 2}, refused
        assert _held(cluster, "us-1", "eu-1") == 20


def test_a_node_that_lost_its_disk_rebuilds_its_trail_from_the_replica(tmp_path: Path) -> None:
    import shutil

    cluster = ReplicatedCluster(tmp_path, regions=["eu", "us"], rate=100_000, burst=100_000)
    with cluster:
        _grants(cluster, "eu-1", 400)
        before = cluster.state("eu-1")
        own = {k: v["nodes"]["eu-1"]["count"] for k, v in before["keys"].items()}
        wait_until(lambda: _held(cluster, "us-1", "eu-1") == 400, timeout=10.0, what="us-1 to hold eu-1's events")
        cluster.kill9("eu-1")
        (cluster.audit_dir / "eu-1.jsonl").unlink()  # the disk is lost
        shutil.rmtree(cluster.audit_dir / "eu-1")
        cluster.restart("eu-1")
        after = cluster.state("eu-1")
        assert after["audit_last_seq"] == 400 and after["audit_total_cost"] == before["audit_total_cost"]
        assert {k: v["nodes"]["eu-1"]["count"] for k, v in after["keys"].items()} == own
        _grants(cluster, "eu-1", 10)  # numbering and chain carry on, and the replica follows
        wait_until(lambda: _held(cluster, "us-1", "eu-1") == 410, timeout=10.0, what="the replica to follow")
        assert "rebuilt from its replica" in cluster.log_tail("eu-1", 200)
    for folder in (cluster.audit_dir, cluster.audit_dir / "replicas"):
        out = subprocess.run([sys.executable, "-m", "edge_server", "audit", "verify", str(folder), "--cluster",
                              str(cluster.cluster_file)], capture_output=True, text=True, timeout=60, cwd=REPO,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0 and "eu-1: ok: 410 events" in out.stdout, out.stdout + out.stderr
