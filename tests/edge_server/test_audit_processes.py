"""The audit trail with real node processes: kill -9 and restart with a trail of many segments,
the usage summary against the grants the clients saw, and a node that refuses a trail that does not
fit (exit 3, one line naming the file)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
from procs import API_KEY, TENANT, ClusterProcs, request, run_node_to_exit, wait_until

from edge_server.audit.chain import ChainKeys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]
SEGMENT_BYTES = 16_384


class AuditCluster(ClusterProcs):
    """The harness's cluster file plus an ``[audit]`` table with small segments."""

    def toml(self) -> str:
        return super().toml() + f"\n[audit]\nsegment_bytes = {SEGMENT_BYTES}\ncompress_level = 1\n"


def _grant(url: str, key: str, cost: int) -> tuple[str, int, int]:
    r = request(url, "POST", "/v1/limits/check", json={"key": key, "cost": cost})
    assert r.status == 200, (r.status, r.body)
    return key, cost if r.json()["allowed"] else 0, r.status


def _invoke(url: str) -> int:
    r = request(url, "POST", "/v1/skills/rating/invoke", json={"cost": 2},
                headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status == 200, (r.status, r.body)
    return 2


def _load(cluster: ClusterProcs, node: str, count: int, seen: Counter) -> None:
    url = cluster.url(node)
    with ThreadPoolExecutor(8) as pool:
        for key, cost, _status in pool.map(lambda i: _grant(url, f"k{i % 10}", 1 + i % 3), range(count)):
            seen[key] += cost
        seen[TENANT] += sum(pool.map(lambda _i: _invoke(url), range(50)))


def _audit(cluster: ClusterProcs, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_server", "audit", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def _recovered_line(cluster: ClusterProcs, node: str) -> dict:
    for path in cluster.nodes[node].logs:
        for line in path.read_text().splitlines():
            if '"audit recovered"' in line:
                return json.loads(line)
    raise AssertionError("no 'audit recovered' log line\n" + cluster.log_tail(node))


def test_kill9_restart_with_many_segments_replays_the_tail_and_keeps_every_grant(tmp_path: Path) -> None:
    cluster = AuditCluster(tmp_path, regions=["eu"], rate=1_000_000, burst=1_000_000)
    seen: Counter = Counter()
    with cluster:
        _load(cluster, "eu-1", 1500, seen)
        before = cluster.state("eu-1")
        total = before["audit_last_seq"]
        assert total == 1550, before  # 1500 checks and 50 invokes, every one granted
        # Sealing runs behind the writes in a thread; once it has caught up, a restart replays only
        # the open segment (a crash before that replays the segments after the last checkpoint too).
        wait_until(lambda: cluster.state("eu-1", [])["audit_unsealed"] == 0, timeout=20.0,
                   what="eu-1 to seal its closed segments")
        assert cluster.state("eu-1", [])["audit_segments"] >= 10
        cluster.kill9("eu-1")
        cluster.restart("eu-1")
        rec = _recovered_line(cluster, "eu-1")
        assert rec["events"] == total and rec["checkpoint"], rec
        assert rec["replayed_events"] < 2 * SEGMENT_BYTES / 200, rec  # the open segment, not the trail
        after = cluster.state("eu-1")
        own = {k: v["nodes"]["eu-1"]["count"] for k, v in after["keys"].items()}
        assert own == dict(seen), (own, seen)  # every answered grant counted again, none twice
        assert after["audit_total_cost"] == sum(seen.values())
        events = cluster.audit_events("eu-1", page=700)  # the route reads sealed segments too
        assert [e["seq"] for e in events] == list(range(1, total + 1))
        assert set(events[0]) >= {"seq", "id", "key", "cost", "node", "region", "ts", "request_id", "gen"}
        _load(cluster, "eu-1", 100, seen)  # and it carries on
    segments = list((cluster.audit_dir / "eu-1").glob("seg-*.jsonl.gz"))
    assert len(segments) >= 10
    out = _audit(cluster, "verify", str(cluster.audit_dir), "--cluster", str(cluster.cluster_file))
    assert out.returncode == 0 and "eu-1: ok: 1700 events" in out.stdout, out.stdout + out.stderr
    out = _audit(cluster, "usage", str(cluster.audit_dir), "--format", "json")
    assert out.returncode == 0, out.stderr
    usage = {tenant: u["tokens"] for tenant, u in orjson.loads(out.stdout).items()}
    assert usage == dict(seen)  # the summary reconciles with what the clients were granted
    out = _audit(cluster, "export", str(cluster.audit_dir), "--tenant", TENANT, "--format", "csv")
    rows = out.stdout.splitlines()
    assert rows[0].startswith("seq,id,key,cost,node") and len(rows) == 1 + seen[TENANT] // 2


def test_a_node_refuses_a_checkpoint_that_does_not_match_its_segment(tmp_path: Path) -> None:
    cluster = AuditCluster(tmp_path, regions=["eu"], rate=1_000_000, burst=1_000_000)
    with cluster:
        _load(cluster, "eu-1", 500, Counter())
    # A clean stop seals every closed segment, so the newest checkpoint is the newest segment's.
    ckpts = sorted((cluster.audit_dir / "eu-1").glob("seg-*.ckpt.json"))
    assert ckpts
    doc = orjson.loads(ckpts[-1].read_bytes())
    doc["last_seq"] -= 1
    ckpts[-1].write_bytes(orjson.dumps(ChainKeys(cluster.secret.encode()).sign(doc)))
    out = run_node_to_exit(cluster.cluster_file, "eu-1")
    assert out.returncode == 3, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert ckpts[-1].name in line and "does not match its segment" in line and "Traceback" not in out.stderr
