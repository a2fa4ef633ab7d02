"""The cluster file (no processes): every refusal names the file, the key and what was expected."""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edge_server.config import (
    SECRET_ENV,
    ClusterConfig,
    ConfigError,
    RouterConfig,
    ServerConfig,
    SkillConfig,
    load_cluster,
    parse_cluster,
)
from edge_server.config_dump import dump_cluster, write_cluster

REPO = Path(__file__).resolve().parents[2]
SOURCE = "/etc/edge/cluster.toml"


def base() -> dict[str, Any]:
    return {
        "cluster": {"secret": "file-secret-123", "gossip_interval_ms": 20, "mode": "eventual", "audit_dir": "audit",
                    "max_keys": 1000, "key_idle_ttl_s": 60, "peer_timeout_ms": 0},
        "regions": [
            {"name": "eu", "nodes": [{"id": "eu-1", "host": "127.0.0.1", "port": 8101}]},
            {"name": "us", "nodes": [{"id": "us-1", "host": "127.0.0.1", "port": 8102}]},
        ],
        "limits": [{"pattern": "*", "rate": 100.0, "burst": 100}],
        "api_keys": {"key-acme": "acme"},
        "skill": {"name": "rating", "kind": "simulated", "median_ms": 5, "p99_ms": 20},
        "server": {"max_body_bytes": 65536, "max_key_bytes": 256, "max_cost": 1000, "max_inflight": 100,
                   "audit_fsync": False},
        "router": {"port": 8100, "latency_ms": {"eu": {"us": 80}}},
    }


@pytest.fixture(autouse=True)
def _no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets (or, with ``...``, deletes) ``a.b[0].c`` in the document."""

    def apply(doc: dict[str, Any]) -> None:
        parts: list[str | int] = []
        for part in path.split("."):
            name, *idx = part.replace("]", "").split("[")
            parts.append(name)
            parts += [int(i) for i in idx]
        target: Any = doc
        for p in parts[:-1]:
            target = target[p]
        if value is ...:
            del target[parts[-1]]
        else:
            target[parts[-1]] = value

    return apply


CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown-top-level", _set("extras", {}), "extras"),
    ("cluster-not-table", _set("cluster", 5), "cluster"),
    ("cluster-unknown-key", _set("cluster.gosip_interval_ms", 5), "cluster.gosip_interval_ms"),
    ("secret-missing", _set("cluster.secret", ...), "cluster.secret"),
    ("secret-short", _set("cluster.secret", "short"), "cluster.secret"),
    ("secret-not-string", _set("cluster.secret", 12345678), "cluster.secret"),
    ("mode-unknown", _set("cluster.mode", "strict-ish"), "cluster.mode"),
    ("mode-not-string", _set("cluster.mode", 1), "cluster.mode"),
    ("audit-dir-empty", _set("cluster.audit_dir", ""), "cluster.audit_dir"),
    ("audit-dir-not-string", _set("cluster.audit_dir", ["a"]), "cluster.audit_dir"),
    ("gossip-interval-zero", _set("cluster.gossip_interval_ms", 0), "cluster.gossip_interval_ms"),
    ("gossip-interval-string", _set("cluster.gossip_interval_ms", "20"), "cluster.gossip_interval_ms"),
    ("gossip-interval-bool", _set("cluster.gossip_interval_ms", True), "cluster.gossip_interval_ms"),
    ("max-keys-zero", _set("cluster.max_keys", 0), "cluster.max_keys"),
    ("max-keys-float", _set("cluster.max_keys", 10.5), "cluster.max_keys"),
    ("idle-ttl-zero", _set("cluster.key_idle_ttl_s", 0), "cluster.key_idle_ttl_s"),
    ("peer-timeout-negative", _set("cluster.peer_timeout_ms", -1), "cluster.peer_timeout_ms"),
    ("regions-missing", _set("regions", ...), "regions"),
    ("regions-empty", _set("regions", []), "regions"),
    ("regions-not-array", _set("regions", {"name": "eu"}), "regions"),
    ("region-not-table", _set("regions[0]", "eu"), "regions[0]"),
    ("region-unknown-key", _set("regions[0].nodez", []), "regions[0].nodez"),
    ("region-name-missing", _set("regions[0].name", ...), "regions[0].name"),
    ("region-name-twice", _set("regions[1].name", "eu"), "regions[1].name"),
    ("region-nodes-missing", _set("regions[0].nodes", ...), "regions[0].nodes"),
    ("region-nodes-empty", _set("regions[0].nodes", []), "regions[0].nodes"),
    ("node-unknown-key", _set("regions[0].nodes[0].weight", 1), "regions[0].nodes[0].weight"),
    ("node-id-missing", _set("regions[0].nodes[0].id", ...), "regions[0].nodes[0].id"),
    ("node-id-not-string", _set("regions[0].nodes[0].id", 1), "regions[0].nodes[0].id"),
    ("node-id-twice", _set("regions[1].nodes[0].id", "eu-1"), "regions[1].nodes[0].id"),
    ("node-host-not-string", _set("regions[0].nodes[0].host", 127), "regions[0].nodes[0].host"),
    ("node-port-missing", _set("regions[0].nodes[0].port", ...), "regions[0].nodes[0].port"),
    ("node-port-string", _set("regions[0].nodes[0].port", "8101"), "regions[0].nodes[0].port"),
    ("node-port-zero", _set("regions[0].nodes[0].port", 0), "regions[0].nodes[0].port"),
    ("node-port-too-big", _set("regions[0].nodes[0].port", 65536), "regions[0].nodes[0].port"),
    ("node-port-bool", _set("regions[0].nodes[0].port", True), "regions[0].nodes[0].port"),
    ("node-address-twice", _set("regions[1].nodes[0].port", 8101), "regions[1].nodes[0].port"),
    ("limits-missing", _set("limits", ...), "limits"),
    ("limits-empty", _set("limits", []), "limits"),
    ("limit-not-table", _set("limits[0]", 5), "limits[0]"),
    ("limit-unknown-key", _set("limits[0].window", 1), "limits[0].window"),
    ("limit-pattern-missing", _set("limits[0].pattern", ...), "limits[0].pattern"),
    ("limit-rate-missing", _set("limits[0].rate", ...), "limits[0].rate"),
    ("limit-rate-zero", _set("limits[0].rate", 0), "limits[0].rate"),
    ("limit-rate-string", _set("limits[0].rate", "fast"), "limits[0].rate"),
    ("limit-burst-below-one", _set("limits[0].burst", 0.5), "limits[0].burst"),
    ("limit-burst-missing", _set("limits[0].burst", ...), "limits[0].burst"),
    ("api-keys-not-table", _set("api_keys", ["key-acme"]), "api_keys"),
    ("api-key-tenant-not-string", _set("api_keys.key-acme", 7), "api_keys.key-acme"),
    ("api-key-tenant-empty", _set("api_keys.key-acme", ""), "api_keys.key-acme"),
    ("skill-not-table", _set("skill", "rating"), "skill"),
    ("skill-unknown-key", _set("skill.model", "x"), "skill.model"),
    ("skill-kind-unknown", _set("skill.kind", "magic"), "skill.kind"),
    ("skill-median-string", _set("skill.median_ms", "5"), "skill.median_ms"),
    ("skill-error-rate-over-one", _set("skill.error_rate", 1.5), "skill.error_rate"),
    ("skill-error-rate-negative", _set("skill.error_rate", -0.1), "skill.error_rate"),
    ("skill-p99-below-median", _set("skill.p99_ms", 1), "skill.p99_ms"),
    ("skill-timeout-zero", _set("skill.timeout_ms", 0), "skill.timeout_ms"),
    ("skill-url-not-string", _set("skill.url", 5), "skill.url"),
    ("server-unknown-key", _set("server.max_bodies", 1), "server.max_bodies"),
    ("server-body-too-small", _set("server.max_body_bytes", 10), "server.max_body_bytes"),
    ("server-key-bytes-zero", _set("server.max_key_bytes", 0), "server.max_key_bytes"),
    ("server-max-cost-string", _set("server.max_cost", "many"), "server.max_cost"),
    ("server-inflight-zero", _set("server.max_inflight", 0), "server.max_inflight"),
    ("server-fsync-not-bool", _set("server.audit_fsync", "yes"), "server.audit_fsync"),
    ("server-fast-check-not-bool", _set("server.fast_check", 1), "server.fast_check"),
    ("router-unknown-key", _set("router.hosts", "x"), "router.hosts"),
    ("router-port-too-big", _set("router.port", 70000), "router.port"),
    ("router-rise-zero", _set("router.rise", 0), "router.rise"),
    ("router-health-interval-zero", _set("router.health_interval_ms", 0), "router.health_interval_ms"),
    ("router-latency-not-table", _set("router.latency_ms", 5), "router.latency_ms"),
    ("router-latency-unknown-src", _set("router.latency_ms.mars", {"eu": 1}), "router.latency_ms.mars"),
    ("router-latency-row-not-table", _set("router.latency_ms.eu", 80), "router.latency_ms.eu"),
    ("router-latency-unknown-dst", _set("router.latency_ms.eu.mars", 1), "router.latency_ms.eu.mars"),
    ("router-latency-negative", _set("router.latency_ms.eu.us", -1), "router.latency_ms.eu.us"),
    ("router-latency-string", _set("router.latency_ms.eu.us", "80"), "router.latency_ms.eu.us"),
]


@pytest.mark.parametrize(("name", "mutate", "key"), CASES, ids=[c[0] for c in CASES])
def test_parse_error_names_file_and_key(name: str, mutate: Callable[[dict[str, Any]], None], key: str) -> None:
    doc = copy.deepcopy(base())
    mutate(doc)
    with pytest.raises(ConfigError) as info:
        parse_cluster(doc, source=SOURCE)
    err = info.value
    assert err.source == SOURCE and err.key == key, (err.key, str(err))
    assert str(err).startswith(f"{SOURCE}: key '{key}': expected "), str(err)
    assert err.expected
    assert isinstance(err, ValueError)


def test_base_document_is_valid() -> None:
    config = parse_cluster(base(), source=SOURCE, base_dir=Path("/srv/edge"))
    assert [n.id for n in config.nodes] == ["eu-1", "us-1"]
    assert config.node("us-1").url == "http://127.0.0.1:8102"
    assert config.audit_dir == Path("/srv/edge/audit")
    assert config.secret == b"file-secret-123"
    assert config.limit_for("anything").burst == 100


def test_upstream_skill_needs_an_http_url() -> None:
    doc = base()
    doc["skill"] = {"kind": "upstream"}
    with pytest.raises(ConfigError) as info:
        parse_cluster(doc, source=SOURCE)
    assert info.value.key == "skill.url"
    doc["skill"] = {"kind": "upstream", "url": "ftp://x"}
    with pytest.raises(ConfigError, match=r"skill\.url"):
        parse_cluster(doc, source=SOURCE)
    doc["skill"] = {"kind": "upstream", "url": "http://127.0.0.1:9/rate"}
    assert parse_cluster(doc, source=SOURCE).skill.url == "http://127.0.0.1:9/rate"


def test_document_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        parse_cluster([], source=SOURCE)  # type: ignore[arg-type]
    assert info.value.key == "(top level)" and str(info.value).startswith(SOURCE)


def test_unknown_node_id_names_the_file_and_the_known_nodes() -> None:
    config = parse_cluster(base(), source=SOURCE)
    with pytest.raises(ConfigError) as info:
        config.node("mars-1")
    assert info.value.key == "regions.nodes.id"
    assert SOURCE in str(info.value) and "mars-1" in str(info.value) and "eu-1, us-1" in str(info.value)


def test_secret_from_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "env-secret-abcdef")
    assert parse_cluster(base(), source=SOURCE).secret == b"env-secret-abcdef"
    doc = base()
    del doc["cluster"]["secret"]
    assert parse_cluster(doc, source=SOURCE).secret == b"env-secret-abcdef"


def test_short_secret_from_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ConfigError) as info:
        parse_cluster(base(), source=SOURCE)
    assert info.value.key == "cluster.secret" and SECRET_ENV in str(info.value)
    assert "'short'" not in str(info.value)  # the value is never echoed


def test_secret_value_never_appears_in_errors() -> None:
    doc = base()
    doc["cluster"]["secret"] = "sh0rt"
    with pytest.raises(ConfigError) as info:
        parse_cluster(doc, source=SOURCE)
    assert "sh0rt" not in str(info.value)


# ------------------------------------------------------------------------ load_cluster (files)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert info.value.key == "(file)" and str(info.value).startswith(str(path))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_cluster(tmp_path)
    assert info.value.key == "(file)" and str(tmp_path) in str(info.value)


def test_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[cluster\nsecret = 1\n")
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert info.value.key == "(syntax)" and str(info.value).startswith(str(path)) and "line 1" in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[cluster]\nsecret = "caf\xe9-secret"\n')
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert info.value.key == "(file)" and str(path) in str(info.value)


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(EXAMPLE.read_text().replace("port = 8102", 'port = "8102"'))
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    assert str(info.value).startswith(f"{path}: key 'regions[1].nodes[0].port': expected an integer")


def test_audit_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "cluster.toml"
    path.parent.mkdir()
    path.write_text(EXAMPLE.read_text())
    assert load_cluster(path).audit_dir == tmp_path / "conf" / "audit"


EXAMPLE = REPO / "examples" / "cluster.toml"


def test_example_cluster_file_parses() -> None:
    config = load_cluster(EXAMPLE)
    assert config.source == str(EXAMPLE)
    assert [r.name for r in config.regions] == ["eu", "us", "ap"]
    assert [n.id for n in config.nodes] == ["eu-1", "us-1", "ap-1"]
    assert config.mode == "eventual" and config.gossip_interval_ms == 20
    assert config.limit_for("acme") is not None
    assert config.api_keys["key-acme"] == "acme"
    assert config.skill.kind == "simulated"
    assert config.router.latency_ms["eu"]["us"] == 80
    assert config.audit_dir == EXAMPLE.parent / "audit"
    # Every key the example uses is known to the parser (it parsed), and it is valid TOML as-is.
    assert tomllib.loads(EXAMPLE.read_text())["cluster"]["secret"]


# ------------------------------------------------------------------------ the writer (dump_cluster)

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
_NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.é\"\\ \t\x7f\U0001f600", min_size=1, max_size=8)
_FLOAT = st.one_of(st.floats(min_value=0, max_value=1), st.floats(min_value=1, max_value=1e9),
                   st.floats(min_value=0, allow_nan=False), st.integers(0, 10**6))


def _value_for(f: dataclasses.Field) -> st.SearchStrategy[Any]:
    """A plausible value for one setting, from its type alone (the parser refuses the implausible)."""
    if f.type == "bool":
        return st.booleans()
    if f.type == "int":
        return st.integers(0, 2**63 - 1) | st.integers(0, 100_000)
    if f.type == "float":
        return _FLOAT
    if f.type == "str":
        return _TEXT
    return st.nothing()


def _table(cls: type, skip: tuple[str, ...] = ()) -> st.SearchStrategy[dict[str, Any]]:
    """Some of ``cls``'s settings (each one drawn or left out), as a TOML table."""
    names = [f for f in dataclasses.fields(cls) if f.name not in skip and f.type in ("bool", "int", "float", "str")]
    return st.fixed_dictionaries({}, optional={f.name: _value_for(f) for f in names})


@st.composite
def cluster_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A cluster document with every kind of value the parser knows; some values may be refused."""
    region_names = draw(st.lists(_NAME, min_size=1, max_size=3, unique=True))
    node_ids = draw(st.lists(_NAME, min_size=len(region_names), max_size=len(region_names) + 3, unique=True))
    ports = draw(st.lists(st.integers(1, 65535), min_size=len(node_ids), max_size=len(node_ids), unique=True))
    hosts = draw(st.sampled_from(["127.0.0.1", "::1", "node.example", "10.0.0.1"]))
    regions = [{"name": r, "nodes": []} for r in region_names]
    for i, (nid, port) in enumerate(zip(node_ids, ports, strict=True)):
        node = {"id": nid, "port": port} | draw(st.sampled_from([{}, {"host": hosts}]))
        regions[i % len(regions)]["nodes"].append(node)
    cluster = {"secret": draw(st.text(st.characters(exclude_categories=("Cs",)), min_size=8, max_size=40))}
    cluster |= draw(st.fixed_dictionaries({}, optional={
        "gossip_interval_ms": _FLOAT, "mode": st.just("eventual"), "audit_dir": st.sampled_from(
            ["audit", "/srv/edge/audit", "a b/ç", "./x/../y"]), "max_keys": st.integers(1, 10**9),
        "key_idle_ttl_s": _FLOAT, "peer_timeout_ms": _FLOAT}))
    rate = st.floats(min_value=1e-9, allow_nan=False) | st.integers(1, 10**6)
    burst = st.floats(min_value=1, allow_nan=False) | st.integers(1, 10**6)
    limits = draw(st.lists(st.fixed_dictionaries({"pattern": _TEXT, "rate": rate, "burst": burst}),
                           min_size=1, max_size=3))
    doc: dict[str, Any] = {"cluster": cluster, "regions": regions, "limits": limits}
    if draw(st.booleans()):
        doc["api_keys"] = draw(st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=10),
                                               _TEXT, max_size=3))
    skill = draw(_table(SkillConfig, skip=("url", "median_ms", "p99_ms")))
    median = draw(_FLOAT)
    skill |= {"median_ms": median, "p99_ms": median + draw(_FLOAT)} if draw(st.booleans()) else {}
    if skill.get("kind") is not None:
        skill["kind"] = draw(st.sampled_from(["simulated", "upstream"]))
        urls = ["http://127.0.0.1:9/rate", "https://skill.example/x?y=1"]
        skill["url"] = draw(st.sampled_from(urls if skill["kind"] == "upstream" else ["", *urls]))
    doc["skill"] = skill
    doc["server"] = draw(_table(ServerConfig))
    router = draw(_table(RouterConfig, skip=("host",)))
    router["host"] = hosts
    if draw(st.booleans()):
        router["latency_ms"] = {a: {b: draw(_FLOAT) for b in region_names if draw(st.booleans())}
                                for a in region_names if draw(st.booleans())}
    doc["router"] = router
    return doc


def _valid(doc: dict[str, Any]) -> ClusterConfig:
    """Parse ``doc``, dropping each refused setting (the error names it) until the rest is valid."""
    for _ in range(60):
        try:
            return parse_cluster(doc, source=SOURCE)
        except ConfigError as exc:
            table, _, key = exc.key.partition(".")
            if not key or "." in key or "[" in exc.key or key not in doc.get(table, {}):
                assume(False)  # refused as a whole (rare): hypothesis draws another document
            del doc[table][key]
    raise AssertionError("too many refused settings")


@settings(max_examples=300, deadline=None)
@given(cluster_documents())
def test_dump_is_the_exact_inverse_of_the_parser(doc: dict[str, Any]) -> None:
    config = _valid(doc)
    text = dump_cluster(config)
    again = parse_cluster(tomllib.loads(text), source=SOURCE)
    assert again == config, text
    assert dump_cluster(again) == text  # one config, one file


def test_dump_leaves_out_defaults_and_writes_what_differs(tmp_path: Path) -> None:
    config = parse_cluster(base(), source=SOURCE)
    text = dump_cluster(config)
    assert "max_inflight = 100\n" in text and "[router]\nport = 8100\n" in text
    assert "audit_fsync" not in text and "health_interval_ms" not in text  # defaults: the parser's own
    bumped = dataclasses.replace(config, router=dataclasses.replace(config.router, health_interval_ms=50))
    assert "health_interval_ms = 50.0" in dump_cluster(bumped)
    path = write_cluster(tmp_path / "deep" / "cluster.toml", config)
    assert load_cluster(path) == dataclasses.replace(config, source=str(path), audit_dir=path.parent / "audit")


def test_dump_refuses_a_secret_that_is_not_text() -> None:
    config = dataclasses.replace(parse_cluster(base(), source=SOURCE), secret=b"\xff\xfe-not-utf8")
    with pytest.raises(ConfigError) as info:
        dump_cluster(config)
    assert info.value.key == "cluster.secret" and "not-utf8" not in str(info.value)
