"""Real edge nodes as child processes on loopback, for tests (no mocks).

The harness writes a cluster file into a folder (with the nodes' own writer,
``edge_server.config.dump_cluster``), starts ``python -m edge_server`` once per node through the
project's process harness (``workbench.run.processes``: stdout/stderr drained into files, so a
chatty node never blocks on a full pipe; the node dies with the test run even after a kill -9),
waits for ``GET /readyz`` with a timeout that names the node, and always kills what it started::

    cluster = ClusterProcs(tmp_path, regions=["eu", "us", "ap"], rate=100, burst=100)
    with cluster:                       # start() on enter, stop() on exit, also on failure
        r = request(cluster.url("eu-1"), "POST", "/v1/limits/check", json={"key": "k"})
        cluster.kill9("eu-1")
        cluster.restart("eu-1")

Node ids are ``<region>-<n>`` (``eu-1``, ``eu-2`` ...).  Ports are free ephemeral loopback ports
found by binding port 0.  ``absent`` lists nodes that are written into the cluster file but never
started (an unreachable peer).  Everything here is synchronous; HTTP goes through :func:`request`,
a tiny ``http.client`` wrapper that can send any bytes, method and headers.
"""

from __future__ import annotations

import http.client
import json as jsonlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_server.config import (
    AuditConfig,
    ClusterConfig,
    LimitRule,
    NodeSpec,
    RegionSpec,
    ServerConfig,
    SkillConfig,
)
from edge_server.config_dump import dump_cluster
from workbench.run.processes import Child, ProcessError, ProcessGroup, child_env, free_port

__all__ = [
    "API_KEY",
    "SECRET",
    "TENANT",
    "ClusterProcs",
    "NodeProc",
    "Response",
    "free_port",
    "metric_value",
    "read_audit_file",
    "request",
    "run_node_to_exit",
    "wait_until",
]

REPO = Path(__file__).resolve().parents[2]
SECRET = "test-cluster-secret-0123456789"
API_KEY = "key-acme"
TENANT = "acme"
READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------------------- HTTP


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The ``error`` object of a JSON error body (asserts the shape)."""
        doc = self.json()
        assert isinstance(doc, dict) and set(doc) == {"error"}, doc
        err = doc["error"]
        assert set(err) == {"code", "message", "field"}, err
        assert isinstance(err["code"], str) and err["code"], err
        assert isinstance(err["message"], str) and err["message"], err
        return err


def request(base_url: str, method: str, path: str, *, json: Any = None, body: bytes | None = None,
            headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> Response:
    """One HTTP request on a fresh connection.  ``json`` sets the body and Content-Type."""
    m = re.match(r"http://([^:/]+):(\d+)$", base_url)
    assert m, base_url
    hdrs = dict(headers or {})
    if json is not None:
        body = jsonlib.dumps(json).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def wait_until(predicate, *, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in ``text`` (0.0 when absent)."""
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    return 0.0


def read_audit_file(path: Path) -> list[dict[str, Any]]:
    """Every complete event line of an audit file on disk."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [jsonlib.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


# ---------------------------------------------------------------------------------- processes


def _node_cmd(cluster_file: Path, node_id: str) -> list[str]:
    return [sys.executable, "-m", "edge_server", "--cluster", str(cluster_file), "--node", node_id,
            "--drain-ms", "0"]


def _env() -> dict[str, str]:
    return child_env(drop=("EDGE_CLUSTER_SECRET",),
                     PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_node_to_exit(cluster_file: Path, node_id: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
    """Run a node that is expected to exit by itself (bad file, port taken); text output."""
    return subprocess.run(_node_cmd(cluster_file, node_id), capture_output=True, text=True, timeout=timeout,
                          env=_env(), cwd=REPO, stdin=subprocess.DEVNULL)


@dataclass
class NodeProc:
    """One node of the cluster file and, once started, its :class:`Child` (one log pair per run)."""

    id: str
    region: str
    port: int
    host: str = "127.0.0.1"
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.child.popen if self.child is not None else None

    @property
    def runs(self) -> int:
        """How many times it was started."""
        return self.child.runs if self.child is not None else 0

    @property
    def logs(self) -> list[Path]:
        """This run's stdout and stderr files."""
        if self.child is None or self.child.stderr_path is None:
            return []
        return [self.child.log_path, self.child.stderr_path]

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive()


class ClusterProcs:
    """A cluster file plus one process per started node; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        regions: Sequence[str] = ("eu", "us", "ap"),
        *,
        nodes_per_region: int = 1,
        rate: float = 100.0,
        burst: float = 100,
        limits: Iterable[tuple[str, float, float]] = (),
        gossip_interval_ms: float = 20,
        absent: Iterable[str] = (),
        api_keys: Mapping[str, str] | None = None,
        skill: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
        audit: Mapping[str, Any] | None = None,
        secret: str = SECRET,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.secret = secret
        self.gossip_interval_ms = gossip_interval_ms
        self.nodes: dict[str, NodeProc] = {}
        for region in regions:
            for i in range(1, nodes_per_region + 1):
                node_id = f"{region}-{i}"
                self.nodes[node_id] = NodeProc(node_id, region, free_port())
        self.absent = set(absent)
        unknown = self.absent - set(self.nodes)
        assert not unknown, f"absent nodes not in the cluster: {unknown}"
        # Specific patterns first: the first match wins; "*" with rate/burst catches the rest.
        self.limits = [*limits, ("*", rate, burst)]
        self.api_keys = dict(api_keys if api_keys is not None else {API_KEY: TENANT})
        self.skill = {"name": "rating", "kind": "simulated", "median_ms": 1, "p99_ms": 2, **(skill or {})}
        self.server = dict(server or {})
        self.audit = dict(audit or {})  # [audit] settings; a node started without its holder needs some
        self.cluster_file = self.dir / "cluster.toml"
        self.audit_dir = self.dir / "audit"
        self.group = ProcessGroup(self.dir, env=_env(), cwd=REPO, grace_s=STOP_TIMEOUT_S)
        self.write()

    # ------------------------------------------------------------------ the file

    def config(self) -> ClusterConfig:
        """What the nodes will read: the cluster file's content as the nodes' own config."""
        regions = tuple(
            RegionSpec(region, tuple(NodeSpec(n.id, region, n.host, n.port) for n in self.nodes.values()
                                     if n.region == region))
            for region in dict.fromkeys(n.region for n in self.nodes.values()))
        return ClusterConfig(
            source=str(self.cluster_file), secret=self.secret.encode(),
            gossip_interval_ms=float(self.gossip_interval_ms), mode="eventual", regions=regions,
            limits=tuple(LimitRule(pattern, float(rate), float(burst)) for pattern, rate, burst in self.limits),
            api_keys=dict(self.api_keys), skill=SkillConfig(**self.skill), audit_dir=Path("audit"),
            server=ServerConfig(**self.server), audit=AuditConfig(**self.audit))

    def toml(self) -> str:
        return dump_cluster(self.config())

    def write(self) -> Path:
        self.cluster_file.write_text(self.toml(), encoding="utf-8")
        return self.cluster_file

    # ------------------------------------------------------------------ processes

    def url(self, node_id: str) -> str:
        return self.nodes[node_id].url

    @property
    def started_ids(self) -> list[str]:
        """Ids of the nodes this harness starts (all but ``absent``)."""
        return [i for i in self.nodes if i not in self.absent]

    def audit_path(self, node_id: str) -> Path:
        return self.audit_dir / f"{node_id}.jsonl"

    def start(self, node_ids: Iterable[str] | None = None, *, wait: bool = True) -> ClusterProcs:
        """Start the given nodes (default: every node not ``absent``), then wait until each is ready."""
        ids = list(node_ids) if node_ids is not None else self.started_ids
        try:
            for node_id in ids:
                self._spawn(self.nodes[node_id])
            if wait:
                for node_id in ids:
                    self.wait_ready(node_id)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, node: NodeProc) -> None:
        assert not node.alive, f"{node.id} is already running"
        if node.child is None:
            node.child = self.group.child(node.id, _node_cmd(self.cluster_file, node.id))
        run = node.runs + 1
        # Output goes straight to files, one pair per run: nothing can block on a full pipe.
        node.child.log_path = self.dir / f"{node.id}.run{run}.out"
        node.child.stderr_path = self.dir / f"{node.id}.run{run}.err"
        self.group.add(node.child).start()

    def _child(self, node_id: str) -> Child | None:
        return self.nodes[node_id].child

    def log_tail(self, node_id: str, lines: int = 20) -> str:
        child = self._child(node_id)
        return child.log_tail(lines) if child is not None else ""

    def wait_ready(self, node_id: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait for ``GET /readyz`` 200; fail naming the node (and its last log lines) otherwise."""
        node = self.nodes[node_id]
        if node.child is None:
            raise AssertionError(f"node {node_id} was never started")
        try:
            node.child.wait_http(node.url + "/readyz", timeout_s=timeout)
        except ProcessError as exc:
            raise AssertionError(f"node {node_id}: {exc}") from None

    def kill9(self, node_id: str) -> None:
        """SIGKILL the node and reap it."""
        child = self._child(node_id)
        if child is not None and child.alive():
            child.kill9(STOP_TIMEOUT_S)

    def terminate(self, node_id: str) -> int | None:
        """SIGTERM (clean stop), SIGKILL if it does not exit in time; returns the exit status."""
        child = self._child(node_id)
        return child.stop(STOP_TIMEOUT_S) if child is not None else None

    def restart(self, node_id: str, *, wait: bool = True) -> None:
        """Start the node again with the same id (kill it first if it still runs)."""
        self.kill9(node_id)
        self._spawn(self.nodes[node_id])
        if wait:
            try:
                self.wait_ready(node_id)
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Stop every process this harness started: SIGTERM, then SIGKILL after a grace period."""
        self.group.stop_all()

    def __enter__(self) -> ClusterProcs:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ conveniences

    def state(self, node_id: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
        path = "/v1/state" + (("?keys=" + ",".join(keys)) if keys is not None else "")
        r = request(self.url(node_id), "GET", path)
        assert r.status == 200, (node_id, r.status, r.body)
        return r.json()

    def audit_events(self, node_id: str, page: int = 1000, max_pages: int = 1000) -> list[dict[str, Any]]:
        """Every audit event of a node through ``GET /v1/audit``, paging ``page`` at a time."""
        events: list[dict[str, Any]] = []
        after = 0
        for _ in range(max_pages):
            r = request(self.url(node_id), "GET", f"/v1/audit?after={after}&limit={page}")
            assert r.status == 200, (node_id, r.status, r.body)
            doc = r.json()
            if not doc["events"]:
                return events
            events += doc["events"]
            assert doc["next"] > after, doc
            after = doc["next"]
        raise AssertionError(f"{node_id}: audit has more than {page * max_pages} events")

    def metrics(self, node_id: str) -> str:
        r = request(self.url(node_id), "GET", "/metrics")
        assert r.status == 200
        return r.body.decode()
