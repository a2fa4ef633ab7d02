"""A first start or a lost disk: a replicating node with no trail asks its replica holders first.

Real nodes on loopback: a cluster started from nothing starts fresh; a node whose holder does not
answer refuses to start (exit 3, naming the holder and the setting) or, with ``start_fresh``, serves
after the wait -- and when the holder turns up with the node's older trail, replication stops in
conflict instead of acknowledging a forked trail.  The rule itself is unit-tested (``decide``), and
the question's answer is signed and carries the asker's nonce.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from procs import ClusterProcs, metric_value, request, run_node_to_exit, wait_until

from edge_server.audit.bootstrap import HELD_PATH, decide
from edge_server.config import ConfigError, parse_cluster
from edge_server.wire import SIGNATURE_HEADER, sign

pytestmark = pytest.mark.timeout(120)


class BootCluster(ClusterProcs):
    """Two regions (each node holds the other's replica), replication on by default, a short wait."""

    def __init__(self, directory: Path, audit: str = "") -> None:
        self.audit_lines = audit
        super().__init__(directory, regions=["eu", "us"], rate=100_000, burst=100_000)

    def toml(self) -> str:
        return super().toml() + "\n[audit]\nreplicate_interval_ms = 20\nholders_wait_s = 1.0\n" + self.audit_lines


def _grants(cluster: ClusterProcs, node: str, count: int) -> None:
    for i in range(count):
        r = request(cluster.url(node), "POST", "/v1/limits/check", json={"key": f"b{i % 5}"})
        assert r.status == 200 and r.json()["allowed"], r.body


def _lose_disk(cluster: ClusterProcs, node: str) -> None:
    cluster.kill9(node)
    cluster.audit_path(node).unlink()
    shutil.rmtree(cluster.audit_dir / node, ignore_errors=True)


# ----------------------------------------------------------------------------- the rule


def test_the_rule() -> None:
    assert decide({"us-1": 0}, "refuse").action == "fresh"
    assert decide({}, "refuse").action == "fresh"  # a single region: nobody could hold a copy
    assert decide({"us-1": None}, "refuse").action == "refuse"
    assert decide({"us-1": None}, "start_fresh").action == "fresh"
    choice = decide({"us-1": 40, "ap-1": None}, "refuse")  # a copy found: rebuild, whatever the setting
    assert (choice.action, choice.holder) == ("rebuild", "us-1")
    assert decide({"us-1": 40, "ap-1": 90}, "refuse").holder == "ap-1"  # the one holding the most
    assert "us-1: no answer" in decide({"us-1": None}, "refuse").describe()


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("holders_unanswered", '"maybe"', "one of refuse, start_fresh"),
    ("holders_unanswered", "1", "a non-empty string"),
    ("holders_wait_s", "-1", "a number >= 0"),
    ("replicate", '"yes"', "true or false"),
])
def test_bad_settings_name_the_key_and_what_is_expected(key: str, value: str, expected: str) -> None:
    import tomllib

    raw = tomllib.loads('[cluster]\nsecret = "a-secret-of-some-length"\n[[regions]]\nname = "eu"\n'
                        '[[regions.nodes]]\nid = "eu-1"\n'
                        f'port = 8101\n[[limits]]\npattern = "*"\nrate = 1.0\nburst = 1\n[audit]\n{key} = {value}\n')
    with pytest.raises(ConfigError) as err:
        parse_cluster(raw, source="c.toml")
    assert f"audit.{key}" in str(err.value) and expected in str(err.value) and "c.toml" in str(err.value)


# ----------------------------------------------------------------------------- real nodes


@pytest.mark.integration
def test_a_new_cluster_starts_fresh_and_a_lost_disk_is_rebuilt(tmp_path: Path) -> None:
    cluster = BootCluster(tmp_path)
    with cluster:  # both start from nothing at once: each holder answers "none"
        for node in ("eu-1", "us-1"):
            assert "a fresh trail" in cluster.log_tail(node, 50)
        _grants(cluster, "eu-1", 120)
        wait_until(lambda: cluster.state("us-1", [])["audit_replicas"]["held"].get("eu-1") == 120, timeout=10.0,
                   what="us-1 to hold eu-1's events")
        text = cluster.metrics("eu-1")
        assert metric_value(text, "edge_audit_replication_acked_seq", holder="us-1") == 120
        assert metric_value(text, "edge_audit_replication_lag_seconds", holder="us-1") == 0
        assert metric_value(cluster.metrics("us-1"), "edge_audit_replica_held_seq", origin="eu-1") == 120
        # the question and its answer: signed, with the asker's nonce; bad questions are 400s naming the field
        r = request(cluster.url("us-1"), "GET", f"{HELD_PATH}?origin=eu-1&nonce=0123456789abcdef")
        assert r.status == 200 and r.headers[SIGNATURE_HEADER.lower()] == sign(cluster.secret.encode(), r.body)
        assert orjson.loads(r.body) == {"origin": "eu-1", "holder": "us-1", "last_seq": 120,
                                        "nonce": "0123456789abcdef"}
        for query, field in (("origin=eu-1", "nonce"), ("origin=zz-9&nonce=0123456789", "origin"),
                             ("origin=us-1&nonce=0123456789", "origin")):
            r = request(cluster.url("us-1"), "GET", f"{HELD_PATH}?{query}")
            assert r.status == 400 and r.error["field"] == field, r.body
        _lose_disk(cluster, "eu-1")
        cluster.restart("eu-1")
        assert cluster.state("eu-1", [])["audit_last_seq"] == 120
        assert "rebuilt from its replica" in cluster.log_tail("eu-1", 50)


@pytest.mark.integration
def test_an_unanswered_holder_refuses_the_start(tmp_path: Path) -> None:
    cluster = BootCluster(tmp_path)  # holders_unanswered = "refuse", the default; us-1 never started
    out: subprocess.CompletedProcess = run_node_to_exit(cluster.cluster_file, "eu-1", timeout=30.0)
    assert out.returncode == 3, out.stderr
    assert "us-1 did not answer within 1 s" in out.stderr and 'holders_unanswered = "start_fresh"' in out.stderr
    assert not cluster.audit_path("eu-1").exists()  # nothing of a trail was started


@pytest.mark.integration
def test_start_fresh_serves_and_a_holder_with_an_older_trail_is_a_conflict(tmp_path: Path) -> None:
    cluster = BootCluster(tmp_path, 'holders_unanswered = "start_fresh"\n')
    with cluster:
        _grants(cluster, "eu-1", 60)
        wait_until(lambda: cluster.state("us-1", [])["audit_replicas"]["held"].get("eu-1") == 60, timeout=10.0,
                   what="us-1 to hold eu-1's events")
        cluster.kill9("us-1")
        _lose_disk(cluster, "eu-1")
        cluster.restart("eu-1")  # its holder is down: after the wait it serves from a fresh trail
        assert "us-1: no answer" in cluster.log_tail("eu-1", 50)
        _grants(cluster, "eu-1", 5)
        cluster.restart("us-1")  # holds 60 events of the eu-1 that was: not these 5

        def conflict() -> str:
            return cluster.state("eu-1", [])["audit_replication"]["conflict"]

        wait_until(lambda: bool(conflict()), timeout=10.0, what="eu-1 to see the conflict")
        assert "holds another trail of eu-1 (up to seq 60" in conflict()
        rep = cluster.state("eu-1", [])["audit_replication"]
        assert rep["acked_seq"] == 0 and rep["lag_events"] == 5
        assert metric_value(cluster.metrics("eu-1"), "edge_audit_replication_conflict", holder="us-1") == 1
        assert cluster.state("us-1", [])["audit_replicas"]["held"]["eu-1"] == 60  # the old copy is kept
