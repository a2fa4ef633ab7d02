"""The cluster file: one TOML document describes every node, limit, API key and the skill.

Everything is parsed here, once, into frozen dataclasses with defaults in one place.  A bad file
raises :class:`ConfigError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_server.strict.settings import StrictSettings, StrictSettingsError
from edge_server.token_bucket import Limit

__all__ = [
    "AuditConfig",
    "ClusterConfig",
    "ConfigError",
    "LimitRule",
    "NodeSpec",
    "RegionSpec",
    "RouterConfig",
    "ServerConfig",
    "SkillConfig",
    "StrictConfig",
    "load_cluster",
    "parse_cluster",
]

SECRET_ENV = "EDGE_CLUSTER_SECRET"
MODES = ("eventual", "strict")
SKILL_KINDS = ("simulated", "upstream")


class ConfigError(ValueError):
    """A cluster file is missing a key, has a wrong type or an impossible value."""

    def __init__(self, source: str, key: str, expected: str, got: Any = None) -> None:
        self.source, self.key, self.expected = source, key, expected
        shown = "" if got is None else f", got {got!r}"
        super().__init__(f"{source}: key '{key}': expected {expected}{shown}")


@dataclass(frozen=True, slots=True)
class NodeSpec:
    id: str  # unique across the cluster; names the node's G-Counter entry and audit file
    region: str
    host: str  # address the node listens on and peers dial
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RegionSpec:
    name: str
    nodes: tuple[NodeSpec, ...]


@dataclass(frozen=True, slots=True)
class LimitRule:
    pattern: str  # fnmatch glob over the limiter key (a tenant, or anything /v1/limits/check gets)
    rate: float  # tokens per second, global across the cluster
    burst: float  # bucket size, global across the cluster

    def matches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self.pattern)


@dataclass(frozen=True, slots=True)
class SkillConfig:
    name: str = "rating"  # the {skill} of /v1/skills/{skill}/invoke
    kind: str = "simulated"  # "simulated" or "upstream"
    median_ms: float = 50.0  # simulated: lognormal latency with this median ...
    p99_ms: float = 200.0  # ... and this 99th percentile (0 and 0 = instant)
    error_rate: float = 0.0  # simulated: fraction of calls that fail with 502
    cpu_us: float = 0.0  # simulated: CPU burned per call, microseconds
    # simulated: pad the JSON answer with an LLM-like generated text to about this many bytes (0: the
    # bare rating, ~100 B); 2048 looks like a short chat completion
    answer_bytes: int = 0
    url: str = ""  # upstream: where to POST the body
    timeout_ms: float = 5000.0  # upstream: give up after this long (502)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    max_body_bytes: int = 64 * 1024  # larger bodies get 413
    max_key_bytes: int = 256  # longer limiter keys get 400
    max_cost: int = 1_000_000  # larger costs get 400
    max_inflight: int = 10_000  # above this, requests get 503 and /readyz says overloaded
    audit_fsync: bool = False  # False: survive kill -9 (write before reply); True: survive power loss
    # Admission (see docs/router.md, "Load shedding"): /v1 requests past max_inflight wait in a FIFO
    # queue of at most queue_max for at most queue_timeout_ms, then get a quick 503 with Retry-After.
    queue_max: int = 1000
    queue_timeout_ms: float = 5.0
    # Adaptive limit (docs/router.md, "Load shedding"): while the event loop lags by more than
    # lag_target_ms for lag_interval_ms, the in-flight limit drops (never below min_inflight, never
    # above max_inflight); 0 turns it off.  Higher than the router's, so the router sheds first.
    lag_target_ms: float = 150.0
    lag_interval_ms: float = 100.0
    min_inflight: int = 32
    # Slow clients: complete request headers within header_timeout_ms of connecting (or of their
    # first byte on a kept-alive connection), else the connection is closed and counted; past
    # max_connections the longest-idle connection is closed to make room.
    header_timeout_ms: float = 5000.0
    max_connections: int = 10_000
    # A plain POST /v1/limits/check is served from the raw bytes, without aiohttp's request path (same
    # decision, answer and metrics; anything unusual still goes to aiohttp): edge_server/fast_check.py.
    fast_check: bool = True


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """The audit trail on disk (``[audit]``; see docs/audit.md)."""

    segment_bytes: int = 16 * 1024 * 1024  # seal the open segment at this size; a restart replays at most ~this
    retention_s: float = 30 * 86_400.0  # sealed segments whose newest event is older leave the node (0: keep)
    retention_bytes: int = 0  # sealed segments beyond this total leave the node, oldest first (0: no cap)
    compress_level: int = 6  # gzip level of sealed segments (1 fastest .. 9 smallest)
    replicate: bool = True  # ship every event to one node of the next region (audit/replicas/ there)
    replicate_interval_ms: float = 100.0  # how often new events are shipped (at once while a backlog lasts)
    # A node that starts with no trail of its own asks the holders of its replica whether they hold
    # events of it: rebuild from them, or start fresh when they all answer "none".  A holder that does
    # not answer is waited for at most holders_wait_s; then holders_unanswered decides: "refuse" (exit
    # 3: never serve from zero while a copy may exist) or "start_fresh" (serve: availability first).
    holders_wait_s: float = 30.0
    holders_unanswered: str = "refuse"


HOLDERS_UNANSWERED = ("refuse", "start_fresh")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 0
    health_interval_ms: float = 100.0  # active /readyz checks of every node
    health_timeout_ms: float = 250.0
    health_suspect_ms: float = 50.0  # a check unanswered this long demotes its node until an answer (0: off)
    connect_timeout_ms: float = 250.0
    request_timeout_ms: float = 10_000.0
    eject_ms: float = 1000.0  # a passively ejected node stays out at least this long
    rise: int = 2  # consecutive good checks before an ejected node gets traffic again
    latency_ms: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # region -> region
    # Evidence and failover (docs/router.md): a node is taken out for refused/reset connections at
    # once, for timeouts only after `fall` timed-out checks or `timeout_eject_count` timed-out tries
    # in a row on a node that had answered before.
    fall: int = 2
    timeout_eject_count: int = 2
    check_try_timeout_ms: float = 150.0  # per-try timeout of /v1/limits/check; then the next region
    # An invoke try with no 100 Continue from its node after this long is hedged on the next region (the
    # commit protocol, edge_server/commit.py: the node decides only once it gets the body, which the
    # router sends to one try only).  Well above a healthy node's time to its 100 Continue under load,
    # far below a client's timeout.
    invoke_header_timeout_ms: float = 200.0
    # True: no commit protocol; an invoke in flight is hedged after invoke_try_timeout_ms (may run twice)
    retry_inflight_invoke: bool = False
    invoke_try_timeout_ms: float = 5000.0  # used only with retry_inflight_invoke = true
    # Never a self-inflicted outage: at most this share of the nodes is out of rotation at once ...
    max_ejected_share: float = 0.5
    # ... and with fewer than this share in rotation, nodes without failure evidence get traffic too.
    panic_threshold: float = 0.5
    retry_budget_ratio: float = 0.2  # retries allowed per forwarded request (over 10 s) ...
    retry_budget_min_per_s: float = 20.0  # ... plus this many per second
    # Load shedding: /v1 requests past max_inflight queue (FIFO, at most queue_max, at most
    # queue_timeout_ms), then get a quick 503 router_overloaded with Retry-After.
    max_inflight: int = 8192
    queue_max: int = 1024
    queue_timeout_ms: float = 5.0
    lag_target_ms: float = 100.0  # adaptive limit, as for the nodes (0: off)
    lag_interval_ms: float = 100.0
    min_inflight: int = 32
    connections_per_node: int = 8192  # forwarding pool bound per node
    header_timeout_ms: float = 5000.0  # slow clients, as for the nodes
    max_connections: int = 16_384


@dataclass(frozen=True, slots=True)
class StrictConfig:
    """The ``[strict]`` table: strict mode's settings (``docs/strict-mode.md``); read in strict mode only."""

    alpha: float = 0.2  # share of each node's weight pinned: minted with no lease, kept when cut off
    lease_ms: float = 500.0  # L: a floating lease lasts this long from its request's send time
    rho: float = 1e-3  # bound on any clock's drift rate against real time
    transfer_window_ms: float = 0.0  # a transfer is credited only this soon after its want (0: 4 rounds)
    renew_ms: float = 0.0  # leases are renewed this often (0: lease / 4)
    voter_dead_ms: float = 0.0  # a voter silent this long is voted out (0: 2 leases)

    def settings(self, gossip_interval_ms: float) -> StrictSettings:
        """The core's settings; raises ``StrictSettingsError`` naming the key."""
        return StrictSettings(alpha=self.alpha, lease_ms=self.lease_ms, rho=self.rho,
                              gossip_interval_ms=gossip_interval_ms, transfer_window_ms=self.transfer_window_ms,
                              renew_ms=self.renew_ms, voter_dead_ms=self.voter_dead_ms)


STRICT_MIN_REGIONS = 3  # one voter per region; a majority must survive the loss of one region


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    source: str  # the file it came from, for error messages
    secret: bytes
    gossip_interval_ms: float
    mode: str
    regions: tuple[RegionSpec, ...]
    limits: tuple[LimitRule, ...]
    api_keys: Mapping[str, str]  # API key -> tenant
    skill: SkillConfig
    audit_dir: Path
    max_keys: int = 100_000
    key_idle_ttl_s: float = 300.0
    peer_timeout_ms: float = 0.0  # 0: five gossip intervals, at least 250 ms
    server: ServerConfig = field(default_factory=ServerConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    strict: StrictConfig = field(default_factory=StrictConfig)  # used in mode "strict" only

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        return tuple(n for r in self.regions for n in r.nodes)

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ConfigError(self.source, "regions.nodes.id", f"a node named {node_id!r}; known: "
                          + ", ".join(n.id for n in self.nodes))

    def limit_for(self, key: str) -> Limit | None:
        for rule in self.limits:
            if rule.matches(key):
                return Limit(rule.rate, rule.burst)
        return None


def load_cluster(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and validate a cluster file."""
    p = Path(path)
    source = str(p)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, "(file)", "an existing file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(syntax)", f"valid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, "(file)", f"a readable UTF-8 file ({exc})") from None
    return parse_cluster(raw, source=source, base_dir=p.parent)


class _Reader:
    """Typed access to one table of the TOML document, with errors that name the key."""

    def __init__(self, source: str, table: Mapping[str, Any], prefix: str, known: set[str]) -> None:
        self.source, self.table, self.prefix = source, table, prefix
        if not isinstance(table, Mapping):
            raise ConfigError(source, prefix.rstrip(".") or "(top level)", "a table", table)
        for key in table:
            if key not in known:
                raise ConfigError(source, prefix + key, "one of " + ", ".join(sorted(known)) + " (unknown key)")

    def _get(self, key: str, default: Any, required: bool) -> Any:
        if key not in self.table:
            if required:
                raise ConfigError(self.source, self.prefix + key, "a value (missing)")
            return default
        return self.table[key]

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(key, default, required)
        if not isinstance(value, str) or not value:
            raise ConfigError(self.source, self.prefix + key, "a non-empty string", value)
        return value

    def num(self, key: str, default: float | None = None, *, required: bool = False,
            minimum: float = 0.0, positive: bool = False) -> float:
        value = self._get(key, default, required)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(self.source, self.prefix + key, "a number", value)
        if positive and not value > 0:
            raise ConfigError(self.source, self.prefix + key, "a number > 0", value)
        if value < minimum:
            raise ConfigError(self.source, self.prefix + key, f"a number >= {minimum:g}", value)
        return float(value)

    def int(self, key: str, default: int | None = None, *, required: bool = False,
            minimum: int = 0, maximum: int | None = None) -> int:
        value = self._get(key, default, required)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.source, self.prefix + key, "an integer", value)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(self.source, self.prefix + key, f"an integer {bound}", value)
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default, False)
        if not isinstance(value, bool):
            raise ConfigError(self.source, self.prefix + key, "true or false", value)
        return value

    def list(self, key: str, *, required: bool = True) -> list:
        value = self._get(key, [], required)
        if not isinstance(value, list) or (required and not value):
            raise ConfigError(self.source, self.prefix + key, "a non-empty array of tables", value)
        return value

    def table_(self, key: str) -> Mapping[str, Any]:
        value = self._get(key, {}, False)
        if not isinstance(value, Mapping):
            raise ConfigError(self.source, self.prefix + key, "a table", value)
        return value


_TOP = {"cluster", "regions", "limits", "api_keys", "skill", "server", "router", "audit", "strict"}
_CLUSTER = {"secret", "gossip_interval_ms", "mode", "audit_dir", "max_keys", "key_idle_ttl_s", "peer_timeout_ms"}


def parse_cluster(raw: Mapping[str, Any], *, source: str = "<cluster>", base_dir: Path | None = None) -> ClusterConfig:
    """Validate a parsed cluster document (see README, "The cluster file")."""
    top = _Reader(source, raw, "", _TOP)
    cl = _Reader(source, top.table_("cluster"), "cluster.", _CLUSTER)
    secret = os.environ.get(SECRET_ENV) or cl._get("secret", None, False)
    if not isinstance(secret, str) or len(secret) < 8:
        raise ConfigError(source, "cluster.secret", f"a string of 8+ characters (or ${SECRET_ENV})",
                          None if secret is None else "<hidden>")
    mode = cl.str("mode", "eventual")
    if mode not in MODES:
        raise ConfigError(source, "cluster.mode", "one of " + ", ".join(MODES), mode)
    audit_dir = Path(cl.str("audit_dir", "audit"))
    if not audit_dir.is_absolute() and base_dir is not None:
        audit_dir = base_dir / audit_dir

    regions = _parse_regions(source, top.list("regions"))
    limits = []
    for i, item in enumerate(top.list("limits")):
        r = _Reader(source, item, f"limits[{i}].", {"pattern", "rate", "burst"})
        limits.append(LimitRule(r.str("pattern", required=True), r.num("rate", required=True, positive=True),
                                r.num("burst", required=True, minimum=1.0)))
    api_keys_raw = top.table_("api_keys")
    api_keys: dict[str, str] = {}
    for key, tenant in api_keys_raw.items():
        if not isinstance(tenant, str) or not tenant:
            raise ConfigError(source, f"api_keys.{key}", "a tenant name (string)", tenant)
        api_keys[key] = tenant

    sk = _Reader(source, top.table_("skill"), "skill.",
                 {"name", "kind", "median_ms", "p99_ms", "error_rate", "cpu_us", "answer_bytes", "url", "timeout_ms"})
    d = SkillConfig()
    skill = SkillConfig(
        name=sk.str("name", d.name), kind=sk.str("kind", d.kind),
        median_ms=sk.num("median_ms", d.median_ms), p99_ms=sk.num("p99_ms", d.p99_ms),
        error_rate=sk.num("error_rate", d.error_rate), cpu_us=sk.num("cpu_us", d.cpu_us),
        answer_bytes=sk.int("answer_bytes", d.answer_bytes, maximum=1_000_000),
        url=sk._get("url", d.url, False), timeout_ms=sk.num("timeout_ms", d.timeout_ms, positive=True),
    )
    if not isinstance(skill.url, str):
        raise ConfigError(source, "skill.url", "a string (an http:// or https:// URL)", skill.url)
    if skill.kind not in SKILL_KINDS:
        raise ConfigError(source, "skill.kind", "one of " + ", ".join(SKILL_KINDS), skill.kind)
    if skill.error_rate > 1:
        raise ConfigError(source, "skill.error_rate", "a fraction between 0 and 1", skill.error_rate)
    if skill.p99_ms < skill.median_ms:
        raise ConfigError(source, "skill.p99_ms", f"a number >= skill.median_ms ({skill.median_ms:g})", skill.p99_ms)
    if skill.kind == "upstream" and not (isinstance(skill.url, str) and skill.url.startswith(("http://", "https://"))):
        raise ConfigError(source, "skill.url", "an http:// or https:// URL for kind = 'upstream'", skill.url)

    sv = _Reader(source, top.table_("server"), "server.",
                 {"max_body_bytes", "max_key_bytes", "max_cost", "max_inflight", "audit_fsync", "queue_max",
                  "queue_timeout_ms", "header_timeout_ms", "max_connections", "fast_check", *_ADAPTIVE})
    ds = ServerConfig()
    server = ServerConfig(
        max_body_bytes=sv.int("max_body_bytes", ds.max_body_bytes, minimum=64),
        max_key_bytes=sv.int("max_key_bytes", ds.max_key_bytes, minimum=1),
        max_cost=sv.int("max_cost", ds.max_cost, minimum=1),
        max_inflight=sv.int("max_inflight", ds.max_inflight, minimum=1),
        audit_fsync=sv.bool("audit_fsync", ds.audit_fsync),
        queue_max=sv.int("queue_max", ds.queue_max),
        queue_timeout_ms=sv.num("queue_timeout_ms", ds.queue_timeout_ms),
        header_timeout_ms=sv.num("header_timeout_ms", ds.header_timeout_ms, positive=True),
        max_connections=sv.int("max_connections", ds.max_connections, minimum=1),
        fast_check=sv.bool("fast_check", ds.fast_check),
        **_adaptive(sv, ds),
    )
    router = _parse_router(source, top.table_("router"), {r.name for r in regions})
    au = _Reader(source, top.table_("audit"), "audit.", {f.name for f in fields(AuditConfig)})
    da = AuditConfig()
    audit = AuditConfig(
        segment_bytes=au.int("segment_bytes", da.segment_bytes, minimum=4096),
        retention_s=au.num("retention_s", da.retention_s),
        retention_bytes=au.int("retention_bytes", da.retention_bytes),
        compress_level=au.int("compress_level", da.compress_level, minimum=1, maximum=9),
        replicate=au.bool("replicate", da.replicate),
        replicate_interval_ms=au.num("replicate_interval_ms", da.replicate_interval_ms, positive=True),
        holders_wait_s=au.num("holders_wait_s", da.holders_wait_s),
        holders_unanswered=au.str("holders_unanswered", da.holders_unanswered),
    )
    if audit.holders_unanswered not in HOLDERS_UNANSWERED:
        raise ConfigError(source, "audit.holders_unanswered", "one of " + ", ".join(HOLDERS_UNANSWERED),
                          audit.holders_unanswered)
    gossip_interval_ms = cl.num("gossip_interval_ms", 20.0, positive=True)
    strict = _parse_strict(source, top.table_("strict"), mode, gossip_interval_ms, regions)
    return ClusterConfig(
        source=source,
        secret=secret.encode(),
        gossip_interval_ms=gossip_interval_ms,
        mode=mode,
        regions=regions,
        limits=tuple(limits),
        api_keys=api_keys,
        skill=skill,
        audit_dir=audit_dir,
        max_keys=cl.int("max_keys", 100_000, minimum=1),
        key_idle_ttl_s=cl.num("key_idle_ttl_s", 300.0, positive=True),
        peer_timeout_ms=cl.num("peer_timeout_ms", 0.0),
        server=server,
        router=router,
        audit=audit,
        strict=strict,
    )


def _parse_strict(source: str, raw: Mapping[str, Any], mode: str, gossip_interval_ms: float,
                  regions: tuple[RegionSpec, ...]) -> StrictConfig:
    """The ``[strict]`` table; in strict mode also the core's own checks and the quorum of regions."""
    st = _Reader(source, raw, "strict.", {f.name for f in fields(StrictConfig)})
    d = StrictConfig()
    strict = StrictConfig(**{f.name: st.num(f.name, getattr(d, f.name)) for f in fields(StrictConfig)})
    if mode != "strict":
        return strict
    try:
        strict.settings(gossip_interval_ms)
    except StrictSettingsError as exc:
        raise ConfigError(source, f"strict.{exc.key}", exc.expected, exc.got) from None
    if len(regions) < STRICT_MIN_REGIONS:
        raise ConfigError(source, "regions", f"at least {STRICT_MIN_REGIONS} regions in strict mode (one voter "
                          "each: a quorum of regions must survive the loss of one)", len(regions))
    return strict


def _parse_regions(source: str, items: list) -> tuple[RegionSpec, ...]:
    regions: list[RegionSpec] = []
    seen_ids: set[str] = set()
    seen_addr: set[tuple[str, int]] = set()
    for i, item in enumerate(items):
        r = _Reader(source, item, f"regions[{i}].", {"name", "nodes"})
        name = r.str("name", required=True)
        if any(x.name == name for x in regions):
            raise ConfigError(source, f"regions[{i}].name", "a region name used once", name)
        nodes = []
        for j, node in enumerate(r.list("nodes")):
            n = _Reader(source, node, f"regions[{i}].nodes[{j}].", {"id", "host", "port"})
            spec = NodeSpec(n.str("id", required=True), name, n.str("host", "127.0.0.1"),
                            n.int("port", required=True, minimum=1, maximum=65535))
            if spec.id in seen_ids:
                raise ConfigError(source, f"regions[{i}].nodes[{j}].id", "a node id used once", spec.id)
            if (spec.host, spec.port) in seen_addr:
                raise ConfigError(source, f"regions[{i}].nodes[{j}].port", "an address used once", spec.port)
            seen_ids.add(spec.id)
            seen_addr.add((spec.host, spec.port))
            nodes.append(spec)
        regions.append(RegionSpec(name, tuple(nodes)))
    return tuple(regions)


def _parse_router(source: str, table: Mapping[str, Any], region_names: set[str]) -> RouterConfig:
    r = _Reader(source, table, "router.", {"host", "port", "health_interval_ms", "health_timeout_ms",
                                           "health_suspect_ms", "connect_timeout_ms", "request_timeout_ms", "eject_ms",
                                           "rise", "latency_ms", *_ROUTER_OVERLOAD})
    d = RouterConfig()
    latency: dict[str, dict[str, float]] = {}
    for src, row in r.table_("latency_ms").items():
        if src not in region_names:
            raise ConfigError(source, f"router.latency_ms.{src}", "a region of the cluster", src)
        if not isinstance(row, Mapping):
            raise ConfigError(source, f"router.latency_ms.{src}", "a table of region = milliseconds", row)
        latency[src] = {}
        for dst, ms in row.items():
            if dst not in region_names:
                raise ConfigError(source, f"router.latency_ms.{src}.{dst}", "a region of the cluster", dst)
            if isinstance(ms, bool) or not isinstance(ms, int | float) or ms < 0:
                raise ConfigError(source, f"router.latency_ms.{src}.{dst}", "a number >= 0", ms)
            latency[src][dst] = float(ms)
    return RouterConfig(
        host=r.str("host", d.host),
        port=r.int("port", d.port, maximum=65535),
        health_interval_ms=r.num("health_interval_ms", d.health_interval_ms, positive=True),
        health_timeout_ms=r.num("health_timeout_ms", d.health_timeout_ms, positive=True),
        health_suspect_ms=r.num("health_suspect_ms", d.health_suspect_ms),
        connect_timeout_ms=r.num("connect_timeout_ms", d.connect_timeout_ms, positive=True),
        request_timeout_ms=r.num("request_timeout_ms", d.request_timeout_ms, positive=True),
        eject_ms=r.num("eject_ms", d.eject_ms),
        rise=r.int("rise", d.rise, minimum=1),
        latency_ms=latency,
        fall=r.int("fall", d.fall, minimum=1),
        timeout_eject_count=r.int("timeout_eject_count", d.timeout_eject_count, minimum=1),
        check_try_timeout_ms=r.num("check_try_timeout_ms", d.check_try_timeout_ms, positive=True),
        invoke_header_timeout_ms=r.num("invoke_header_timeout_ms", d.invoke_header_timeout_ms, positive=True),
        retry_inflight_invoke=r.bool("retry_inflight_invoke", d.retry_inflight_invoke),
        invoke_try_timeout_ms=r.num("invoke_try_timeout_ms", d.invoke_try_timeout_ms, positive=True),
        max_ejected_share=_share(r, "max_ejected_share", d.max_ejected_share),
        panic_threshold=_share(r, "panic_threshold", d.panic_threshold),
        retry_budget_ratio=r.num("retry_budget_ratio", d.retry_budget_ratio),
        retry_budget_min_per_s=r.num("retry_budget_min_per_s", d.retry_budget_min_per_s),
        max_inflight=r.int("max_inflight", d.max_inflight, minimum=1),
        queue_max=r.int("queue_max", d.queue_max),
        queue_timeout_ms=r.num("queue_timeout_ms", d.queue_timeout_ms),
        connections_per_node=r.int("connections_per_node", d.connections_per_node, minimum=1),
        header_timeout_ms=r.num("header_timeout_ms", d.header_timeout_ms, positive=True),
        max_connections=r.int("max_connections", d.max_connections, minimum=1),
        **_adaptive(r, d),
    )


_ADAPTIVE = ("lag_target_ms", "lag_interval_ms", "min_inflight")  # [server] and [router] alike
_ROUTER_OVERLOAD = ("fall", "timeout_eject_count", "check_try_timeout_ms", "invoke_header_timeout_ms",
                    "retry_inflight_invoke", "invoke_try_timeout_ms", "max_ejected_share", "panic_threshold",
                    "retry_budget_ratio", "retry_budget_min_per_s", "max_inflight", "queue_max", "queue_timeout_ms",
                    "connections_per_node", "header_timeout_ms", "max_connections", *_ADAPTIVE)


def _adaptive(r: _Reader, d: ServerConfig | RouterConfig) -> dict[str, Any]:
    """The adaptive-limit keys of ``[server]`` or ``[router]``.  A min_inflight set above max_inflight is
    an error; the default one is lowered to a smaller max_inflight."""
    most = r.int("max_inflight", d.max_inflight, minimum=1)
    floor = r.int("min_inflight", d.min_inflight, minimum=1) if "min_inflight" in r.table else min(d.min_inflight, most)
    if floor > most:
        raise ConfigError(r.source, r.prefix + "min_inflight", f"an integer between 1 and max_inflight ({most})",
                          floor)
    return {"lag_target_ms": r.num("lag_target_ms", d.lag_target_ms),
            "lag_interval_ms": r.num("lag_interval_ms", d.lag_interval_ms, positive=True), "min_inflight": floor}


def _share(r: _Reader, key: str, default: float) -> float:
    """A fraction of the nodes, 0..1 (0 disables the rule, 1 allows every node)."""
    value = r.num(key, default)
    if value > 1:
        raise ConfigError(r.source, r.prefix + key, "a fraction between 0 and 1", value)
    return value
