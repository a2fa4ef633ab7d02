"""The nemesis: applies a scenario's fault timeline to a running cluster, on the run clock.

Process faults (kill, pause, resume, restart) go to :class:`~workbench.run.cluster.Cluster`; network
faults (partition, blackhole, heal, latency, loss) to its :class:`~workbench.run.faults.mesh.ProxyMesh`,
or, with the netns backend, partitions and blackholes to kernel rules in its
:class:`~workbench.run.faults.netns.NetnsLab` (the mesh still names the links and adds latency).  Every
fault is recorded when it is *applied* (after the cut is in place), on the same monotonic clock as the
client's requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from workbench.history import FaultRecord
from workbench.run.cluster import Cluster, ClusterError
from workbench.run.faults.mesh import Link, ProxyMesh
from workbench.run.faults.netns import NetnsError
from workbench.spec.parts import UNDONE
from workbench.spec.scenario import ROUTER, FaultAction

__all__ = ["Nemesis"]

log = logging.getLogger("workbench.run.nemesis")


class Nemesis:
    def __init__(self, cluster: Cluster, t0: float, on_fault: Callable[[FaultRecord], None]) -> None:
        self.cluster = cluster
        self.t0 = t0  # run clock zero on time.monotonic()
        self.on_fault = on_fault
        self.applied: list[FaultRecord] = []
        self._cuts: dict[int, set[Link]] = {}  # id of a partition / blackhole step -> the links it holds cut

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _emit(self, action: str, target: str, **detail: object) -> FaultRecord:
        record = FaultRecord(round(self._now(), 6), action, target, dict(detail))
        self.applied.append(record)
        self.on_fault(record)
        log.info("fault applied", extra={"action": action, "target": target, "t_s": record.t_s})
        return record

    async def run(self, faults: Iterable[FaultAction]) -> None:
        """Apply each fault at its time (and undo timed network faults); returns after the last one."""
        steps: list[tuple[float, str, FaultAction]] = []
        for fault in faults:
            steps.append((fault.at_s, "do", fault))
            if fault.duration_s > 0 and fault.action in UNDONE:
                steps.append((fault.at_s + fault.duration_s, "undo", fault))
        steps.sort(key=lambda s: s[0])
        for at_s, what, fault in steps:
            delay = at_s - self._now()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                if what == "do":
                    await self.apply(fault)
                else:
                    await self._undo(fault)
            except (ClusterError, NetnsError) as exc:
                self._emit("error", fault.target, message=str(exc))

    async def apply(self, fault: FaultAction) -> FaultRecord:
        c = self.cluster
        action = fault.action
        if action == "kill":
            pids = [p.pid for p in c.resolve(fault.target)]
            c.kill(fault.target)
            return self._emit("kill", fault.target, pids=pids)
        if action == "pause":
            procs = c.resolve(fault.target)  # a region: every node of it stops
            c.pause(fault.target)
            return self._emit("pause", fault.target, pids=[p.pid for p in procs], nodes=[p.name for p in procs])
        if action == "resume":
            c.resume(fault.target)
            return self._emit("resume", fault.target)
        if action == "restart":
            record = self._emit("restart", fault.target)
            await c.restart(fault.target, wait_ready=False)
            return record
        mesh = c.mesh
        if mesh is None:
            raise ClusterError(f"{action} needs the fault proxies (launch the cluster with proxies=True)")
        backend = "proxy" if c.netns is None else "netns"
        began = time.monotonic()

        def took() -> float:  # how long the cut took to put in place (a kernel change is a subprocess)
            return round((time.monotonic() - began) * 1e3, 3)

        if action == "partition":
            groups = [list(g) for g in fault.groups]
            # The router stands for DNS / a global load balancer: a split between regions cuts
            # the regions from each other, not the clients from their regions.
            keep = () if any(ROUTER in g for g in groups) else (ROUTER,)
            links = await self._cut(fault, mesh.cut_links(groups, keep), lambda: mesh.partition(groups, keep=keep))
            return self._emit("partition", "|".join(",".join(g) for g in fault.groups), groups=groups,
                              links=len(links), backend=backend, apply_ms=took())
        if action == "blackhole":
            try:
                nodes = sorted(mesh.members(fault.target))
            except KeyError as exc:
                raise ClusterError(str(exc.args[0])) from None
            links = await self._cut(fault, mesh.blackhole_links(fault.target), lambda: mesh.blackhole(fault.target))
            return self._emit("blackhole", fault.target, nodes=nodes, links=len(links), backend=backend,
                              apply_ms=took())
        if action == "heal":
            mesh.heal()
            if c.netns is not None:
                await c.netns.heal()
            self._cuts.clear()
            return self._emit("heal", "", backend=backend, apply_ms=took())
        links = self._links(fault)
        if action == "latency":
            for link in links:
                mesh.latency(link, fault.ms, fault.jitter_ms)
            return self._emit("latency", _label(fault), ms=fault.ms, jitter_ms=fault.jitter_ms)
        if action == "loss":
            for link in links:
                mesh.loss(link, fault.pct)
            return self._emit("loss", _label(fault), pct=fault.pct)
        raise ClusterError(f"unknown fault action {action!r}")

    async def _cut(self, fault: FaultAction, links: list[Link], by_proxy: Callable[[], object]) -> list[Link]:
        """Cut ``links``: kernel rules with the netns backend, else the proxies (``by_proxy``)."""
        if self.cluster.netns is not None:
            await self.cluster.netns.cut(links)
        else:
            by_proxy()
        self._cuts[id(fault)] = set(links)
        return links

    async def _uncut(self, fault: FaultAction, mesh: ProxyMesh) -> None:
        """End one partition / blackhole step: lift its links that no other step still holds cut."""
        mine = self._cuts.pop(id(fault), set())
        held = set().union(*self._cuts.values())
        if self.cluster.netns is not None:  # a kernel cut is per pair of addresses, both ways
            pairs = {frozenset(link) for link in held}
            await self.cluster.netns.uncut(sorted(lk for lk in mine if frozenset(lk) not in pairs))
            return
        for link in sorted(mine - held):
            mesh.proxies[link].heal()

    def _links(self, fault: FaultAction) -> list[tuple[str, str]]:
        mesh = self.cluster.mesh
        assert mesh is not None
        if fault.link:
            return [(fault.link[0], fault.link[1])]
        return list(mesh.proxies)

    async def _undo(self, fault: FaultAction) -> None:
        """End a fault that had a ``duration_s``."""
        mesh = self.cluster.mesh
        assert mesh is not None
        if fault.action in ("partition", "blackhole"):
            await self._uncut(fault, mesh)
        else:
            for link in self._links(fault):
                for a, b in mesh.select(link[0], link[1]):
                    proxy = mesh.proxies[(a, b)]
                    if fault.action == "latency":
                        proxy.set_latency(0.0, 0.0)
                    else:
                        proxy.set_loss(0.0)
        self._emit(f"end_{fault.action}", _label(fault))


def _label(fault: FaultAction) -> str:
    if fault.action == "blackhole":
        return fault.target
    return "<->".join(fault.link) if fault.link else "all links"
