"""Shared helpers for the benchmarks: child processes that are always cleaned up, cluster files,
readiness, wrk, and the results file.

Every process started through :class:`Procs` is killed when the ``with`` block ends, when the
interpreter exits (``atexit``) and on SIGTERM/SIGINT/SIGHUP (turned into ``SystemExit`` so the
``finally`` blocks run): SIGTERM first, SIGKILL after a short grace period.  Nothing here waits
without a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable
SECRET = "benchmark-cluster-secret-0123456789"
WRK = "/usr/bin/wrk"
READY_TIMEOUT_S = 20.0
STOP_GRACE_S = 3.0

_LIVE: list[Procs] = []


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP/SIGINT into SystemExit so every ``finally`` and ``atexit`` runs."""
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _on_signal)


def _cleanup_all() -> None:
    for procs in list(_LIVE):
        procs.stop_all()


atexit.register(_cleanup_all)


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path
    cmd: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def _affinity(cpus: Iterable[int] | None):
    if cpus is None:
        return None
    wanted = set(cpus)

    def pin() -> None:
        os.sched_setaffinity(0, wanted)

    return pin


def _lifeline() -> dict[str, str]:
    """Ask edge processes to die with this one (even after kill -9) -- only when started from the main
    thread: the kernel ties the child to the thread that started it, and an executor thread ends
    (killing what it started) when its ``asyncio.run`` does."""
    if threading.current_thread() is threading.main_thread():
        return {"EDGE_DIE_WITH_PARENT": str(os.getpid())}
    return {}


class Procs:
    """Starts child processes and guarantees they are gone afterwards."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.children: list[Child] = []
        _LIVE.append(self)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self, name: str, cmd: Sequence[str], *, cpus: Iterable[int] | None = None, env: Mapping[str, str] | None = None
    ) -> Child:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")
        try:
            popen = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env={**os.environ, **_lifeline(), **(env or {})},
                preexec_fn=_affinity(cpus),
            )
        finally:
            log.close()
        child = Child(name, popen, log_path, list(cmd))
        self.children.append(child)
        return child

    def kill9(self, child: Child) -> None:
        if child.alive():
            child.popen.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(timeout=STOP_GRACE_S)

    def stop(self, child: Child) -> None:
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                child.popen.send_signal(signal.SIGTERM)
            try:
                child.popen.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.kill9(child)

    def stop_all(self) -> None:
        for child in self.children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            try:
                child.popen.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill9(child)
        self.children = [c for c in self.children if c.alive()]
        if not self.children and self in _LIVE:
            _LIVE.remove(self)


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
    """Poll ``url + path`` until 200; returns the seconds waited.  Raises with the child's log tail."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode}:\n{child.log_tail()}")
        try:
            status, _ = http_json(url + path, timeout=1.0)
            if status == 200:
                return time.monotonic() - started
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.02)
    tail = child.log_tail() if child is not None else ""
    raise TimeoutError(f"{url}{path} not ready after {timeout:.0f} s\n{tail}")


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
) -> tuple[Path, list[NodeInfo]]:
    """A cluster file in ``workdir`` with one node per region on free loopback ports."""
    nodes: list[NodeInfo] = []
    lines = [
        "[cluster]",
        f'secret = "{SECRET}"',
        f"gossip_interval_ms = {gossip_interval_ms}",
        'mode = "eventual"',
        'audit_dir = "audit"',
        f"max_keys = {max_keys}",
        f"key_idle_ttl_s = {key_idle_ttl_s}",
        "",
    ]
    for region in regions:
        lines += ["[[regions]]", f'name = "{region}"']
        for i in range(1, nodes_per_region + 1):
            info = NodeInfo(f"{region}-{i}", region, free_port())
            nodes.append(info)
            lines += ["[[regions.nodes]]", f'id = "{info.id}"', 'host = "127.0.0.1"', f"port = {info.port}"]
        lines.append("")
    for pattern, rate, burst in limits:
        lines += ["[[limits]]", f'pattern = "{pattern}"', f"rate = {float(rate)!r}", f"burst = {burst!r}", ""]
    lines += [
        "[api_keys]",
        '"key-bench" = "bench"',
        "",
        "[skill]",
        'name = "rating"',
        'kind = "simulated"',
        "median_ms = 1",
        "p99_ms = 2",
        "",
    ]
    path = Path(workdir) / "cluster.toml"
    path.write_text("\n".join(lines))
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
    shown = " ".join(shlex.quote(c) for c in cmd)
    if cpus is not None:
        shown = f"taskset -c {','.join(map(str, sorted(cpus)))} " + shown
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_affinity(cpus)
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
) -> Path:
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
    }
    path = RESULTS / f"{name}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
