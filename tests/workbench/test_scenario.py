"""Scenario: flat build, dict round trip, files, validation errors that name the field, cluster file."""

from __future__ import annotations

import json
import tomllib

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.config import parse_cluster
from workbench.spec.scenario import (
    PARAMETERS,
    FaultAction,
    LimitSpec,
    LoadSpec,
    Scenario,
    ScenarioError,
    Topology,
    default_latency_ms,
)


def ports(s: Scenario) -> dict[str, int]:
    return {n: 9100 + i for i, n in enumerate(s.topology.node_ids, 1)}


def test_defaults_are_a_three_region_cluster() -> None:
    s = Scenario.build()
    assert s.topology.regions == ("eu", "us", "ap")
    assert s.topology.node_ids == ("eu-1", "us-1", "ap-1")
    assert s.topology.latency_ms["eu"]["us"] == 80.0 == s.topology.latency_ms["us"]["eu"]
    assert s.limits == (LimitSpec("*", 100.0, 100.0),)
    assert s.faults == ()
    assert Scenario.build() == Scenario()


def test_parameter_names_match_build_defaults() -> None:
    names = Scenario.parameter_names()
    assert names == tuple(PARAMETERS)
    assert {"regions", "nodes_per_region", "rate", "burst", "gossip_interval_ms", "load_rps", "duration_s",
            "kill_region_at_s"} <= set(names)
    assert Scenario.build(**Scenario.parameter_defaults()) == Scenario.build()


def test_demo_like_build() -> None:
    s = Scenario.build(regions=3, nodes_per_region=2, rate=100, burst=100, load_rps=150, duration_s=30,
                       kill_region_at_s=10, restart_region_at_s=20, region_weights="eu=1,us=3,ap=1", tenants=4)
    assert s.topology.node_ids == ("eu-1", "eu-2", "us-1", "us-2", "ap-1", "ap-2")
    assert [(f.at_s, f.action, f.target) for f in s.faults] == [(10.0, "kill", "us"), (20.0, "restart", "us")]
    assert s.topology.resolve("us") == ("us-1", "us-2")
    assert s.topology.region_of("ap-2") == "ap"
    assert s.load.tenant_names() == ("tenant-0000", "tenant-0001", "tenant-0002", "tenant-0003")
    assert s.api_keys()["key-tenant-0001"] == "tenant-0001"


def test_build_fault_parameters() -> None:
    s = Scenario.build(partition_at_s=5, partition_groups="eu|us,ap", heal_at_s=8, latency_at_s=1,
                       latency_link="eu,us", latency_add_ms=30, latency_jitter_ms=5, loss_at_s=2, loss_pct=5,
                       pause_at_s=3, pause_target="ap-1", resume_at_s=4,
                       faults=[{"at_s": 6, "action": "kill", "target": "router"}])
    assert [f.action for f in s.faults] == ["latency", "loss", "pause", "resume", "partition", "kill", "heal"]
    part = s.faults[4]
    assert part.groups == (("eu",), ("us", "ap"))
    assert s.faults[0].link == ("eu", "us") and s.faults[0].ms == 30.0 and s.faults[0].jitter_ms == 5.0


def test_default_partition_isolates_every_region() -> None:
    s = Scenario.build(partition_at_s=1)
    assert s.faults[0].groups == (("eu",), ("us",), ("ap",))


def test_region_names_and_flat_latency() -> None:
    s = Scenario.build(regions=2, region_names="x,y", region_latency_ms=7)
    assert s.topology.latency_ms == {"x": {"y": 7.0}, "y": {"x": 7.0}}
    many = Scenario.build(regions=8)
    assert many.topology.regions[-2:] == ("r7", "r8")
    assert default_latency_ms("r7", "eu") == 200.0 and default_latency_ms("eu", "eu") == 0.0


@pytest.mark.parametrize(("params", "field"), [
    ({"bogus": 1}, "bogus"),
    ({"rate": -1}, "rate"),
    ({"burst": 0}, "burst"),
    ({"load_rps": -5}, "load_rps"),
    ({"users": 0}, "users"),
    ({"duration_s": 0}, "duration_s"),
    ({"kill_region_at_s": 31}, "kill_region_at_s"),
    ({"kill_region_at_s": 3, "kill_region": "mars"}, "kill_region"),
    ({"pause_at_s": 3, "pause_target": "eu-9"}, "pause_target"),
    ({"partition_at_s": 1, "partition_groups": "eu|mars"}, "partition_groups"),
    ({"partition_at_s": 1, "partition_groups": "eu|eu-1"}, "partition_groups"),
    ({"latency_at_s": 1, "latency_add_ms": 0}, "latency_add_ms"),
    ({"latency_at_s": 1, "latency_link": "eu"}, "latency_link"),
    ({"loss_at_s": 1, "loss_pct": 101}, "loss_pct"),
    ({"region_weights": {"mars": 1}}, "region_weights"),
    ({"region_weights": "eu"}, "region_weights"),
    ({"region_names": "a,a,b"}, "region_names"),
    ({"skill_p99_ms": 10}, "skill_p99_ms"),
    ({"skill_error_rate": 2}, "skill_error_rate"),
    ({"key_dist": "pareto"}, "key_dist"),
    ({"load_mode": "sideways"}, "load_mode"),
    ({"seed": 1.5}, "seed"),
    ({"mode": "strictest"}, "mode"),
    ({"gossip_interval_ms": float("nan")}, "gossip_interval_ms"),
    ({"faults": [{"at_s": 1, "action": "nuke"}]}, "faults[0].action"),
    ({"faults": [{"at_s": 1, "action": "kill"}]}, "faults[0].target"),
    ({"faults": [{"action": "heal"}]}, "faults[0].at_s"),
    ({"faults": [{"at_s": 1, "action": "heal", "when": 2}]}, "faults[0].when"),
])
def test_bad_parameters_name_the_field(params: dict, field: str) -> None:
    with pytest.raises(ScenarioError) as info:
        Scenario.build(**params)
    assert info.value.field == field
    assert f"'{field}'" in str(info.value)


@pytest.mark.parametrize(("raw", "field"), [
    ({"colour": "red"}, "colour"),
    ({"topology": {"nodes_per_region": {"eu": 1}, "hops": 2}}, "topology.hops"),
    ({"topology": {"nodes_per_region": {"eu": 0}}}, "topology.nodes_per_region.eu"),
    ({"topology": {"nodes_per_region": {"eu": 1}, "latency_ms": {"eu": {"us": 5}}}}, "topology.latency_ms.eu.us"),
    ({"limits": []}, "limits"),
    ({"limits": [{"pattern": "*", "rate": -1, "burst": 1}]}, "limits.rate"),
    ({"load": {"rate_rps": -1}}, "load.rate_rps"),
    ({"faults": [{"at_s": 99, "action": "heal"}]}, "faults[0].at_s"),
    ({"faults": [{"at_s": 1, "action": "kill", "target": "mars"}]}, "faults[0].target"),
    ({"faults": [{"at_s": 1, "action": "partition"}]}, "faults[0].groups"),
    ({"faults": [{"at_s": 1, "action": "heal", "target": "eu"}]}, "faults[0].target"),
])
def test_bad_dicts_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ScenarioError) as info:
        Scenario.from_dict(raw)
    assert info.value.field == field


def test_dict_round_trip_is_exact_and_json_friendly() -> None:
    s = Scenario.build(nodes_per_region=2, tenants=5, key_dist="zipf", region_weights="eu=2,us=1,ap=1",
                       partition_at_s=3, heal_at_s=6, kill_region_at_s=10, restart_region_at_s=20,
                       latency_at_s=1, latency_link="router,eu", results_dir="out")
    d = s.to_dict()
    assert Scenario.from_dict(d) == s
    assert json.loads(json.dumps(d)) == d
    assert Scenario.from_dict(json.loads(json.dumps(d))).to_dict() == d


def test_frozen() -> None:
    s = Scenario.build()
    with pytest.raises(AttributeError):
        s.duration_s = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.topology.nodes_per_region["eu"] = 9  # type: ignore[index]


names = st.sampled_from(["eu", "us", "ap", "sa"])


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    regions = draw(st.integers(1, 4))
    duration = draw(st.floats(1, 100))
    params = {
        "regions": regions, "nodes_per_region": draw(st.integers(1, 3)), "duration_s": duration,
        "rate": draw(st.floats(0.1, 1e6)), "burst": draw(st.floats(1, 1e6)), "tenants": draw(st.integers(1, 50)),
        "load_mode": draw(st.sampled_from(["open", "closed"])), "seed": draw(st.integers(-10, 10**9)),
        "gossip_interval_ms": draw(st.floats(1, 1000)), "cost": draw(st.integers(1, 10)),
    }
    if draw(st.booleans()):
        params["kill_region_at_s"] = draw(st.floats(0, duration))
    if draw(st.booleans()):
        params["latency_at_s"] = draw(st.floats(0, duration))
        params["latency_add_ms"] = draw(st.floats(0.5, 500))
    return Scenario.build(**params)


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_round_trip_property(s: Scenario) -> None:
    assert Scenario.from_dict(s.to_dict()) == s
    assert Scenario.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@settings(max_examples=30, deadline=None)
@given(scenarios())
def test_cluster_file_round_trips_through_the_node_parser(s: Scenario) -> None:
    text = s.cluster_toml(ports(s), router_port=9100, secret="s3cret-\"quoted\"\\", audit_dir="/tmp/audit")
    cfg = parse_cluster(tomllib.loads(text), source="t")
    assert [r.name for r in cfg.regions] == list(s.topology.regions)
    assert [n.id for n in cfg.nodes] == list(s.topology.node_ids)
    assert {n.id: n.port for n in cfg.nodes} == ports(s)
    assert cfg.gossip_interval_ms == s.topology.gossip_interval_ms
    assert [(x.pattern, x.rate, x.burst) for x in cfg.limits] == [(x.pattern, x.rate, x.burst) for x in s.limits]
    assert cfg.api_keys == s.api_keys()
    assert cfg.secret == b's3cret-"quoted"\\'
    assert cfg.router.port == 9100 and cfg.router.health_interval_ms == s.health_interval_ms
    assert cfg.router.latency_ms == {a: dict(row) for a, row in s.topology.latency_ms.items() if row}
    assert (cfg.skill.median_ms, cfg.skill.p99_ms) == (s.skill.median_ms, s.skill.p99_ms)
    assert cfg.mode == s.mode


def test_write_cluster_file(tmp_path) -> None:
    from edge_server.config import load_cluster

    s = Scenario.build(nodes_per_region=2)
    path = s.write_cluster_file(tmp_path / "c" / "cluster.toml", ports(s), router_port=9000, secret="12345678",
                                audit_dir="audit", node_hosts={"eu-2": "127.0.0.2"})
    cfg = load_cluster(path)
    assert cfg.audit_dir == tmp_path / "c" / "audit"
    assert cfg.node("eu-2").host == "127.0.0.2"
    with pytest.raises(ScenarioError, match="node_ports"):
        s.cluster_toml({"eu-1": 1}, router_port=1, secret="12345678", audit_dir="a")


def test_from_toml_flat_and_yaml_nested(tmp_path) -> None:
    flat = tmp_path / "drill.toml"
    flat.write_text('regions = 2\nrate = 50.0\nburst = 10\nkill_region_at_s = 4.0\n'
                    '[[faults]]\nat_s = 5\naction = "heal"\n')
    s = Scenario.from_file(flat)
    assert s.topology.regions == ("eu", "us") and s.limits[0].rate == 50.0
    assert [f.action for f in s.faults] == ["kill", "heal"]
    nested = tmp_path / "drill.yaml"
    nested.write_text(yaml.safe_dump(s.to_dict()))
    assert Scenario.from_file(nested) == s
    js = tmp_path / "drill.json"
    js.write_text(json.dumps(s.to_dict()))
    assert Scenario.from_file(js) == s


def test_file_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ScenarioError, match="an existing file"):
        Scenario.from_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rate = = 1")
    with pytest.raises(ScenarioError, match="valid TOML"):
        Scenario.from_file(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rate: 5\nspeed: 3\n")
    with pytest.raises(ScenarioError) as info:
        Scenario.from_file(unknown)
    assert info.value.field == "speed" and str(unknown) in str(info.value)
    wrong = tmp_path / "x.ini"
    wrong.write_text("")
    with pytest.raises(ScenarioError, match="toml"):
        Scenario.from_file(wrong)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ScenarioError, match="mapping"):
        Scenario.from_file(lst)


def test_direct_construction_validates() -> None:
    topo = Topology({"eu": 1, "us": 2}, {"eu": {"us": 10}})
    assert topo.latency_ms["us"]["eu"] == 10.0  # the reverse direction fills the gap
    with pytest.raises(ScenarioError, match=r"faults\[0\]\.target"):
        Scenario(topology=topo, faults=(FaultAction(1, "kill", target="ap"),))
    with pytest.raises(ScenarioError, match=r"load\.region_weights\.ap"):
        Scenario(topology=topo, load=LoadSpec(region_weights={"ap": 1}))
    with pytest.raises(ScenarioError, match=r"faults\.link"):
        FaultAction(1, "latency", link=("eu",), ms=5)
    assert Scenario(topology=topo).limit_for("anything") == LimitSpec()
    two = Scenario(limits=(LimitSpec("vip-*", 5, 5), LimitSpec("*", 1, 1)))
    assert two.limit_for("vip-1").rate == 5.0 and two.limit_for("x").rate == 1.0
