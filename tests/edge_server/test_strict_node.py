"""Strict mode in the node: its config, a real 3-region strict cluster, its messages, and a partition drill.

The partition is a real drill (processes, router, fault proxies) judged on safety: the plain envelope
with no allowance, and each cut-off region held to about its pinned share -- never on timing.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from procs import SECRET, ClusterProcs, metric_value, request, wait_until

from edge_server.config import ConfigError, StrictConfig, parse_cluster
from edge_server.config_dump import dump_cluster
from edge_server.strict.wire import encode
from workbench.check import check_envelope
from workbench.history import Recording
from workbench.run.drill import run_drill
from workbench.spec.scenario import Scenario

CHECK = "/v1/limits/check"


class StrictProcs(ClusterProcs):
    """The test harness's cluster, in strict mode."""

    strict = StrictConfig()

    def config(self):  # type: ignore[no-untyped-def]
        return dataclasses.replace(super().config(), mode="strict", strict=self.strict)


def _doc(mode: str = "strict", regions: int = 3, **strict: object) -> dict:
    doc = {"cluster": {"secret": "s" * 16, "mode": mode, "gossip_interval_ms": 20.0},
           "regions": [{"name": f"r{i}", "nodes": [{"id": f"r{i}-1", "host": "127.0.0.1", "port": 9000 + i}]}
                       for i in range(regions)],
           "limits": [{"pattern": "*", "rate": 10.0, "burst": 10.0}]}
    if strict:
        doc["strict"] = strict
    return doc


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(("doc", "key", "expected"), [
    (_doc(regions=2), "regions", "at least 3 regions"),
    (_doc(alpha=1.5), "strict.alpha", "[0, 1]"),
    (_doc(lease_ms=40.0), "strict.lease_ms", "at least 3 gossip intervals"),
    (_doc(rho=0.5), "strict.rho", "[0, 0.1)"),
    (_doc(alpha="high"), "strict.alpha", "a number"),
    (_doc(leese_ms=500.0), "strict.leese_ms", ""),
])
def test_bad_strict_settings_name_file_key_and_expected_value(doc, key, expected) -> None:
    with pytest.raises(ConfigError) as err:
        parse_cluster(doc, source="c.toml")
    assert err.value.key == key and "c.toml" in str(err.value) and expected in str(err.value)


def test_strict_settings_round_trip_and_eventual_mode_ignores_them() -> None:
    config = parse_cluster(_doc(alpha=0.5, lease_ms=800.0, rho=1e-4), source="c.toml")
    assert config.mode == "strict" and config.strict == StrictConfig(alpha=0.5, lease_ms=800.0, rho=1e-4)
    assert parse_cluster(tomllib.loads(dump_cluster(config)), source="c.toml") == config
    assert config.strict.settings(config.gossip_interval_ms).reclaim_s > 0.8
    eventual = parse_cluster(_doc(mode="eventual", regions=1, lease_ms=40.0), source="c.toml")
    assert eventual.mode == "eventual"  # strict's own checks apply only in strict mode


# ------------------------------------------------------------------------ a real strict cluster


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_strict_cluster_serves_inside_the_envelope_and_shows_its_rights(tmp_path: Path) -> None:
    with StrictProcs(tmp_path, rate=100, burst=100) as c:
        wait_until(lambda: c.state("eu-1")["strict"]["lease_valid"], timeout=5.0, what="eu-1's first lease")
        answers = [request(c.url(n), "POST", CHECK, json={"key": "k", "cost": 1}) for n in c.nodes for _ in range(80)]
        assert all(r.status == 200 for r in answers)
        allowed = sum(r.json()["allowed"] for r in answers)
        assert 0 < allowed <= 100 + 100 * 10  # some served; never beyond B + R t for the few seconds it took
        st = c.state("eu-1")
        strict = st["strict"]
        assert st["mode"] == "strict" and strict["incarnation"] == st["boot"]
        assert strict["actor"] == f"eu-1#{st['boot']}" and 0 < strict["phi"] <= 1
        assert "k" in strict["keys"] and strict["voter"]["id"] == "voter-eu"
        assert "voter" not in c.state("us-1")["strict"] or c.state("us-1")["strict"]["voter"]["id"] == "voter-us"
        text = c.metrics("eu-1")
        for name in ("edge_strict_rights_held", "edge_strict_transfers_sent", "edge_strict_lease_age_seconds",
                     "edge_strict_fenced_seconds", "edge_strict_lease_share"):
            assert metric_value(text, name) == metric_value(text, name)  # present (and not NaN)
        audited = sum(c.state(n)["audit_total_cost"] for n in c.nodes)
        assert audited == allowed  # every admission is in an audit trail


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_forged_replayed_and_wrong_mode_messages_are_refused_and_counted(tmp_path: Path) -> None:
    with StrictProcs(tmp_path, rate=100, burst=100) as c:
        url = c.url("eu-1")
        far, far_sig = encode(SECRET.encode(), "strict_ack", "us-1#99999999999999", 7, 0)  # boot in year 5138
        future = request(url, "POST", "/v1/strict", json=[[far.decode(), far_sig]])
        assert future.status == 400 and future.json()["refused"] == {"future_incarnation": 1}
        newer = f"us-1#{c.state('us-1')['boot'] + 1000}"  # a plausible newer incarnation
        data, sig = encode(SECRET.encode(), "strict_ack", newer, 7, 0)
        forged = request(url, "POST", "/v1/strict", json=[[data.decode(), "0" * 64]])
        assert forged.status == 401, forged.body
        assert forged.json()["refused"] == {"bad_signature": 1}
        first = request(url, "POST", "/v1/strict", json=[[data.decode(), sig]])
        again = request(url, "POST", "/v1/strict", json=[[data.decode(), sig]])
        assert first.status == 200 and again.status == 409 and again.json()["refused"] == {"replayed": 1}
        garbled = request(url, "POST", "/v1/strict", body=b"{not json", headers={"Content-Type": "application/json"})
        assert garbled.status == 400
        wrong = request(url, "POST", "/v1/gossip", body=b"{}")
        assert wrong.status == 409 and wrong.error["code"] == "wrong_mode"
        text = c.metrics("eu-1")
        assert metric_value(text, "edge_strict_refused_total", reason="bad_signature") == 1
        # exactly the test's replay: the claim of a newer us-1 incarnation did not fence the real us-1
        assert metric_value(text, "edge_strict_refused_total", reason="replayed") == 1
        assert metric_value(text, "edge_strict_refused_total", reason="future_incarnation") == 1
        assert metric_value(text, "edge_strict_refused_total", reason="malformed") == 1


# ------------------------------------------------------------------------ a partition, as a drill


@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_a_partition_drill_keeps_the_plain_envelope_and_each_side_its_pinned_share(tmp_path: Path) -> None:
    rate, burst, alpha = 40.0, 20.0, 0.2
    scenario = Scenario.build(name="t-strict-split", duration_s=8.0, rate=rate, burst=burst, load_rps=150.0,
                              mode="strict", partition_at_s=2.5, heal_at_s=6.0, route="check", seed=5)
    result = await run_drill(scenario, tmp_path / "run")
    assert result.summary["token_loss"] == 0
    rec = Recording.load(tmp_path / "run")
    verdict = check_envelope(rec, tolerance_tokens=0.0, slack_s=0.0, source="audit")
    assert verdict.ok, verdict.reasons
    assert all(k["worst_excess"] <= 1e-6 for k in verdict.figures["keys"].values())
    assert rec.audit  # something was admitted: the check had something to check
    # each region is cut off alone from 2.5 s to 6 s; one lease (0.5 s) and a margin later it holds only
    # its pinned share: alpha w R per second plus at most its share of the burst (eventual mode: R each)
    a, b = 3.5, 6.0
    w = 1 / 3
    for region in ("eu", "us", "ap"):
        inside = sum(ev.cost for ev in rec.audit if ev.region == region and a <= ev.ts - rec.started_wall < b)
        assert inside <= alpha * w * rate * (b - a) + w * burst, (region, inside)
