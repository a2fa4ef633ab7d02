"""Shared helpers for the benchmarks: child processes that are always cleaned up, cluster files,
readiness, wrk, and the results file.

Processes come from the project's one harness (``workbench.run.processes``): every process started
through :class:`Procs` is killed when the ``with`` block ends, when the interpreter exits (``atexit``)
and on SIGTERM/SIGINT/SIGHUP (turned into ``SystemExit`` so the ``finally`` blocks run): SIGTERM first,
SIGKILL after a short grace period; started from the main thread, it also dies with a benchmark that
is killed with ``kill -9``.  Nothing here waits without a timeout.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks._targets import check_targets
from edge_server.config import (
    ClusterConfig,
    LimitRule,
    NodeSpec,
    RegionSpec,
    SkillConfig,
)
from edge_server.config_dump import write_cluster as write_cluster_config
from workbench.run.processes import (
    Child,
    ProcessGroup,
    free_port,
    pin_cpus,
    taskset_prefix,
)
from workbench.run.processes import install_exit_on_signals as install_signal_handlers
from workbench.run.processes import wait_http as _wait_http

__all__ = [
    "PYTHON",
    "REPO",
    "RESULTS",
    "SECRET",
    "Child",
    "Cluster",
    "NodeInfo",
    "Procs",
    "free_port",
    "http_json",
    "http_text",
    "install_signal_handlers",
    "machine",
    "metric_value",
    "random_keys_lua",
    "run_wrk",
    "table",
    "wait_ready",
    "workdir",
    "write_cluster",
    "write_results",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable
SECRET = "benchmark-cluster-secret-0123456789"
WRK = "/usr/bin/wrk"
READY_TIMEOUT_S = 20.0
STOP_GRACE_S = 3.0


class Procs(ProcessGroup):
    """Starts child processes (logs in ``workdir``, run from the repository) and guarantees they are gone
    afterwards."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, cwd=REPO, grace_s=STOP_GRACE_S)
        self.workdir = Path(workdir)

    def start(  # type: ignore[override]
        self, name: str, cmd: Sequence[str], *, cpus: Iterable[int] | None = None, env: Mapping[str, str] | None = None
    ) -> Child:
        return self.child(name, cmd, cpus=cpus, env=env).start()

    def kill9(self, child: Child) -> None:
        child.kill9(STOP_GRACE_S)

    def stop(self, child: Child) -> None:
        child.stop(STOP_GRACE_S)


# ------------------------------------------------------------------------------------ HTTP


def http_json(url: str, method: str = "GET", body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def wait_ready(url: str, child: Child | None = None, timeout: float = READY_TIMEOUT_S, path: str = "/readyz") -> float:
    """Poll ``url + path`` until 200; returns the seconds waited.  Raises (a RuntimeError if the child
    exited, a TimeoutError otherwise) with the child's log tail."""
    return _wait_http(url + path, timeout_s=timeout, child=child)


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` (Prometheus text) whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if labels:
            have = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
            if any(have.get(k, "").strip('"') != v for k, v in labels.items()):
                continue
        total += float(value)
    return total


# ------------------------------------------------------------------------------------ cluster


@dataclass
class NodeInfo:
    id: str
    region: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    path: Path
    nodes: list[NodeInfo]
    procs: Procs
    children: dict[str, Child] = field(default_factory=dict)

    def node(self, node_id: str) -> NodeInfo:
        return next(n for n in self.nodes if n.id == node_id)

    def start(self, node_id: str, cpus: Iterable[int] | None = None, wait: bool = True) -> Child:
        cmd = [
            PYTHON,
            "-m",
            "edge_server",
            "--cluster",
            str(self.path),
            "--node",
            node_id,
            "--log-level",
            "WARNING",
            "--drain-ms",
            "0",
        ]
        child = self.procs.start(node_id, cmd, cpus=cpus)
        self.children[node_id] = child
        if wait:
            wait_ready(self.node(node_id).url, child)
        return child

    def start_all(self, cpus: Mapping[str, Iterable[int]] | None = None) -> None:
        for n in self.nodes:
            self.start(n.id, cpus=(cpus or {}).get(n.id), wait=False)
        for n in self.nodes:
            wait_ready(n.url, self.children[n.id])

    def kill9(self, node_id: str) -> None:
        self.procs.kill9(self.children[node_id])


def write_cluster(
    workdir: Path,
    regions: Sequence[str],
    *,
    limits: Sequence[tuple[str, float, float]],
    gossip_interval_ms: int = 20,
    max_keys: int = 100_000,
    key_idle_ttl_s: int = 300,
    nodes_per_region: int = 1,
    skill: SkillConfig | None = None,
) -> tuple[Path, list[NodeInfo]]:
    """A cluster file in ``workdir`` with ``nodes_per_region`` nodes per region on free loopback ports
    (the skill: ``skill``, else a simulated one of median 1 ms, p99 2 ms)."""
    nodes = [NodeInfo(f"{region}-{i}", region, free_port()) for region in regions
             for i in range(1, nodes_per_region + 1)]
    path = Path(workdir) / "cluster.toml"
    config = ClusterConfig(
        source=str(path), secret=SECRET.encode(), gossip_interval_ms=float(gossip_interval_ms), mode="eventual",
        regions=tuple(RegionSpec(r, tuple(NodeSpec(n.id, r, "127.0.0.1", n.port) for n in nodes if n.region == r))
                      for r in regions),
        limits=tuple(LimitRule(pattern, float(rate), float(burst)) for pattern, rate, burst in limits),
        api_keys={"key-bench": "bench"},
        skill=skill or SkillConfig(name="rating", kind="simulated", median_ms=1, p99_ms=2),
        audit_dir=Path("audit"), max_keys=max_keys, key_idle_ttl_s=float(key_idle_ttl_s))
    write_cluster_config(path, config)
    return path, nodes


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))


# ------------------------------------------------------------------------------------ wrk


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: str
    command: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _ms(text: str) -> float:
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
    for unit in ("us", "ms", "s", "m"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def parse_wrk(out: str, command: str) -> WrkResult:
    rps = p50 = p75 = p90 = p99 = 0.0
    requests = non2xx = 0
    errors = ""
    for line in out.splitlines():
        s = line.strip()
        parts = s.split()
        if s.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif parts[:1] in (["50%"], ["75%"], ["90%"], ["99%"]) and len(parts) == 2:
            value = _ms(parts[1])
            if parts[0] == "50%":
                p50 = value
            elif parts[0] == "75%":
                p75 = value
            elif parts[0] == "90%":
                p90 = value
            else:
                p99 = value
        elif "requests in" in s:
            requests = int(parts[0])
        elif s.startswith("Non-2xx"):
            non2xx = int(parts[-1])
        elif s.startswith("Socket errors"):
            errors = s
    return WrkResult(rps, p50, p75, p90, p99, requests, non2xx, errors, command)


def random_keys_lua(keys: int) -> str:
    """A wrk script that POSTs ``/v1/limits/check`` with ``{"key": "k<random of keys>"}``: each request
    a key drawn at random, so a node's key table and audit trail see many keys, not one hot one.  The
    seed mixes the clock's seconds and microseconds, so wrk's threads (one Lua state each) differ."""
    return f"""-- POST /v1/limits/check with {{"key": "k<random of {keys:,}>"}}
init = function(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end
request = function()
  local body = '{{"key":"k' .. math.random({keys}) .. '"}}'
  return wrk.format("POST", "/v1/limits/check", {{["Content-Type"] = "application/json"}}, body)
end
"""


def run_wrk(
    url: str,
    *,
    threads: int,
    connections: int,
    duration_s: int,
    script: Path | None = None,
    cpus: Iterable[int] | None = None,
) -> WrkResult:
    cmd = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "5s"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    # The script lives in the run's temporary folder: results show its name, not the machine's path.
    words = [script.name if script is not None and c == str(script) else c for c in cmd]
    shown = taskset_prefix(cpus) + " ".join(shlex.quote(c) for c in words)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=pin_cpus(cpus)
    )
    try:
        out, _ = proc.communicate(timeout=duration_s + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {out}")
    return parse_wrk(out, shown)


# ------------------------------------------------------------------------------------ results


def machine() -> dict[str, Any]:
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio"
    try:
        model = next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), ""
        )
    except OSError:
        model = ""
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loop": loop,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def command_line() -> str:
    rel = os.path.relpath(sys.argv[0], REPO)
    return " ".join([".venv/bin/python", rel, *sys.argv[1:]])


def write_results(
    name: str,
    figures: Mapping[str, Any],
    *,
    quick: bool,
    extra: Mapping[str, Any] | None = None,
    started: float | None = None,
    targets: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """The results file: figures plus the command, date and machine; ``targets`` (built with
    ``benchmarks._targets.target``) are reported there, met or missed, and never change the exit code."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "quick": quick,
        "machine": machine(),
        **({"elapsed_s": round(time.time() - started, 1)} if started else {}),
        "figures": figures,
        **(extra or {}),
        **({"targets": check_targets([dict(t) for t in targets])} if targets is not None else {}),
    }
    path = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    path.write_text(scrub_paths(json.dumps(doc, indent=2, sort_keys=False)) + "\n")
    return path


_TEMP_DIR = re.compile(re.escape(tempfile.gettempdir().rstrip("/")) + r"/[^/\s\"]+")


def scrub_paths(text: str) -> str:
    """A results file names no path of the machine it ran on: each temporary work folder (the wrk
    scripts' and data directories' parent) becomes ``<workdir>``, the checkout ``<repo>``."""
    return _TEMP_DIR.sub("<workdir>", text.replace(str(REPO), "<repo>"))



def cpu_seconds(procs: Iterable[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` so far (a process that is gone counts 0)."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total

def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
