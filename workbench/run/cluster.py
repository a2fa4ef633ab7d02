"""Launch a whole cluster as real OS processes on loopback, and own them until the end.

``async with Cluster.launch(scenario) as cluster:`` starts every edge node and the router on free
loopback ports, routes every node-to-node and router-to-node link through a fault proxy (so faults
need no privileges), waits for readiness, and reaps every process on exit -- also on an error,
a cancellation or Ctrl-C.  Each node gets its own cluster file in which its peers' addresses are
the proxies of its outgoing links; the router gets one in which the nodes are its proxies.

With ``faults_backend = "netns"`` each process runs in a network namespace of its own and the
workbench's event-loop thread in the lab namespace (:mod:`workbench.run.faults.netns`) for as long
as the cluster runs; partitions and blackholes are then kernel rules, latency and loss still proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from workbench.history import ProcessSample
from workbench.run.faults.mesh import ProxyMesh
from workbench.run.faults.netns import NetnsError, NetnsLab
from workbench.run.processes import Child, NotReady, ProcessError, ProcessGroup, child_env, free_port
from workbench.spec.scenario import Scenario

__all__ = ["Cluster", "ClusterError", "ManagedProcess", "free_port"]

ROUTER = "router"


class ClusterError(RuntimeError):
    """The cluster could not be started or a control named something that does not exist."""


@dataclass
class ManagedProcess(Child):
    """One node or the router: a :class:`~workbench.run.processes.Child` with its region and port."""

    region: str = "-"
    port: int = 0
    host: str = "127.0.0.1"  # where it listens (its namespace's address with the netns backend)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Cluster:
    """A running cluster; create it with :meth:`launch`."""

    def __init__(self, scenario: Scenario, run_dir: Path, *, proxies: bool = True,
                 ready_timeout_s: float = 20.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.use_proxies = proxies
        self.ready_timeout_s = ready_timeout_s
        self.clock = clock
        self.secret = secrets.token_hex(16)
        topo = scenario.topology
        self.nodes: dict[str, ManagedProcess] = {}
        self.router: ManagedProcess | None = None
        self.mesh: ProxyMesh | None = None
        self.netns: NetnsLab | None = None  # the namespace lab, with faults_backend = "netns"
        self.node_ports = {nid: free_port() for nid in topo.node_ids}
        self.router_port = free_port()
        self.events: list[tuple[float, str, str]] = []  # (monotonic time, action, target)
        self._session: aiohttp.ClientSession | None = None
        # Started from the main thread, nodes and the router die with this process even after a kill -9
        # (the harness adds the lifeline); their own session keeps a terminal's Ctrl-C to our cleanup.
        self._env = child_env(drop=("EDGE_CLUSTER_SECRET",))
        self._group = ProcessGroup(run_dir, env=self._env, new_session=True, grace_s=2.0)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(cls, scenario: Scenario, run_dir: str | os.PathLike[str] | None = None, *,
                     proxies: bool = True, ready_timeout_s: float = 20.0) -> AsyncIterator[Cluster]:
        """Start everything, yield the running cluster, and always reap it."""
        folder = (Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="edge-cluster-"))).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        cluster = cls(scenario, folder, proxies=proxies, ready_timeout_s=ready_timeout_s)
        try:
            if scenario.faults_backend == "netns":
                try:
                    cluster.netns = await asyncio.to_thread(NetnsLab.create, [ROUTER, *scenario.topology.node_ids])
                except NetnsError as exc:
                    raise ClusterError(str(exc)) from None
                cluster.netns.enter()
            await cluster._start()
            yield cluster
        finally:
            try:
                await asyncio.shield(cluster._shutdown())
            finally:
                if cluster.netns is not None:
                    cluster.netns.close()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        topo = self.scenario.topology
        if self.use_proxies:
            links: dict[tuple[str, str], tuple[str, int]] = {}
            for src in [*topo.node_ids, ROUTER]:
                for dst in topo.node_ids:
                    if src != dst:
                        links[(src, dst)] = (self._host(dst), self.node_ports[dst])
            region_of = {nid: topo.region_of(nid) for nid in topo.node_ids} | {ROUTER: ROUTER}
            self.mesh = ProxyMesh(links, region_of=region_of, seed=self.scenario.seed, clock=self.clock,
                                  make_socket=self.netns.socket_in if self.netns is not None else None)
            await self.mesh.start()
        audit_dir = self.run_dir / "audit"
        for nid in topo.node_ids:
            path = self._write_cluster_file(nid, audit_dir)
            self.nodes[nid] = self._process(
                nid, topo.region_of(nid), self.node_ports[nid],
                [*self._prefix(nid), sys.executable, "-m", "edge_server", "--cluster", str(path), "--node", nid])
        router_file = self._write_cluster_file(ROUTER, audit_dir)
        self.router = self._process(ROUTER, "-", self.router_port,
                                    [*self._prefix(ROUTER), sys.executable, "-m", "edge_server", "router", "--cluster",
                                     str(router_file), "--port", str(self.router_port), "--host", self._host(ROUTER)])
        for proc in self.nodes.values():
            proc.start(self._env)
        await self._wait_ready(list(self.nodes.values()), "/readyz")
        self.router.start(self._env)
        await self._wait_ready([self.router], "/healthz")
        await self._wait_router_sees_all()

    def _process(self, name: str, region: str, port: int, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.run_dir / f"{name}.log", env=self._env, new_session=True,
                              region=region, port=port, host=self._host(name))
        self._group.add(proc)
        return proc

    def _host(self, name: str) -> str:
        """The address ``name`` listens on: loopback, or its namespace's address."""
        return "127.0.0.1" if self.netns is None else self.netns.addr(name)

    def _prefix(self, name: str) -> list[str]:
        """What runs a command inside ``name``'s namespace (nothing without the netns backend)."""
        return [] if self.netns is None else self.netns.exec_prefix(name)

    def _write_cluster_file(self, viewer: str, audit_dir: Path) -> Path:
        """The cluster file as ``viewer`` sees it: every other node behind the viewer's proxy to it."""
        ports = dict(self.node_ports)
        hosts = {nid: self._host(nid) for nid in ports}
        if self.mesh is not None:
            for nid in ports:
                if nid != viewer:
                    ports[nid] = self.mesh.port(viewer, nid)
                    hosts[nid] = "127.0.0.1"  # the proxy, in the viewer's own namespace
        return self.scenario.write_cluster_file(self.run_dir / f"cluster-{viewer}.toml", ports,
                                                router_port=self.router_port, secret=self.secret,
                                                audit_dir=audit_dir, node_hosts=hosts)

    async def _wait_ready(self, procs: list[ManagedProcess], path: str) -> None:
        """Until every one of ``procs`` answers ``path`` with 200; the first that exits fails it at once."""
        assert self._session is not None
        tasks = {asyncio.ensure_future(p.wait_http_async(
            p.url + path, timeout_s=self.ready_timeout_s, session=self._session,
            body_has=None if p.name == ROUTER else {"node": p.name})): p for p in procs}
        try:
            done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if t.exception() is not None]
            if not failed:
                return
            exited = [t.exception() for t in failed if not isinstance(t.exception(), NotReady)]
            if exited:
                first = exited[0]
                raise (ClusterError(str(first)) if isinstance(first, ProcessError) else first)
            # One timed out: all share the deadline, so every one not ready yet is named.
            stuck = {tasks[t].name: tasks[t] for t in tasks if not (t.done() and t.exception() is None)}
            tails = "\n".join(f"--- {n}:\n{p.log_tail(5)}" for n, p in sorted(stuck.items()))
            raise ClusterError(f"not ready after {self.ready_timeout_s:g} s: {', '.join(sorted(stuck))}\n{tails}")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _wait_router_sees_all(self) -> None:
        """Until the router's checks have found a healthy node in every region, traffic would be skewed."""
        deadline = time.monotonic() + self.ready_timeout_s
        assert self._session is not None and self.router is not None
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, ValueError):
                async with self._session.get(self.router.url + "/v1/router/state") as resp:
                    doc = await resp.json()
                    nodes = doc.get("nodes", [])
                    if isinstance(nodes, dict):
                        nodes = list(nodes.values())
                    healthy = {n.get("region") for n in nodes if n.get("healthy")}
                    if nodes and healthy >= {n.get("region") for n in nodes}:
                        return
            await asyncio.sleep(0.05)
        raise ClusterError(f"the router did not see a healthy node in every region within {self.ready_timeout_s:g} s;"
                           f" see {self.router.log_path if self.router else 'the router log'}")

    async def _shutdown(self) -> None:
        await self._group.stop_all_async()
        if self.mesh is not None:
            with contextlib.suppress(Exception):
                await self.mesh.stop()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ controls

    def resolve(self, target: str) -> list[ManagedProcess]:
        """A region name, a node id or ``"router"`` -> the processes it stands for."""
        if target == ROUTER and self.router is not None:
            return [self.router]
        if target in self.nodes:
            return [self.nodes[target]]
        members = [p for p in self.nodes.values() if p.region == target]
        if not members:
            known = ", ".join([*self.scenario.topology.regions, *self.nodes, ROUTER])
            raise ClusterError(f"no region, node or router named {target!r}; known: {known}")
        return members

    def _record(self, action: str, target: str) -> float:
        t = self.clock()
        self.events.append((t, action, target))
        return t

    def kill(self, target: str) -> float:
        """SIGKILL every process of ``target``; returns the time it happened.

        The time is taken right after the signal and nothing waits here: this runs on the event loop
        that also drives the fault proxies and the load (the dead process is reaped on restart or exit).
        """
        procs = self.resolve(target)
        for proc in procs:
            proc.signal(signal.SIGKILL, "killed")
        return self._record("kill", target)

    def pause(self, target: str) -> float:
        for proc in self.resolve(target):
            proc.pause()
        return self._record("pause", target)

    def resume(self, target: str) -> float:
        for proc in self.resolve(target):
            proc.resume()
        return self._record("resume", target)

    async def restart(self, target: str, wait_ready: bool = True) -> float:
        """Start again (same id, same port, same audit trail) whatever of ``target`` is not running."""
        procs = self.resolve(target)
        for proc in procs:
            if proc.alive():
                proc.signal(signal.SIGKILL, "killed")
            await asyncio.to_thread(proc.reap, 1.0)
            proc.start(self._env)
        t = self._record("restart", target)
        if wait_ready:
            await self._wait_ready(procs, "/healthz" if target == ROUTER else "/readyz")
        return t

    async def stop(self, target: str) -> float:
        """A clean stop of ``target``: SIGTERM (the node drains and exits), SIGKILL only after 3 s."""
        procs = self.resolve(target)
        await asyncio.gather(*(asyncio.to_thread(proc.stop, 3.0) for proc in procs))
        return self._record("stop", target)

    # ------------------------------------------------------------------ observation

    @property
    def router_url(self) -> str:
        assert self.router is not None
        return self.router.url

    def node_url(self, node_id: str) -> str:
        """The node's real address (not through a proxy): what the recorder scrapes."""
        return self.nodes[node_id].url

    def states(self) -> dict[str, str]:
        """Process state per node: running, paused, killed, stopped (a crash shows as 'exited')."""
        out = {}
        for name, proc in self.nodes.items():
            out[name] = "exited" if proc.state == "running" and not proc.alive() else proc.state
        return out

    def sample_processes(self, t_s: float) -> list[ProcessSample]:
        procs = [*self.nodes.values(), *([self.router] if self.router else [])]
        return [s for s in (p.sample(t_s) for p in procs) if s is not None]
