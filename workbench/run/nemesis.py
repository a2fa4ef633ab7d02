"""The nemesis: applies a scenario's fault timeline to a running cluster, on the run clock.

Process faults (kill, pause, resume, restart) go to :class:`~workbench.run.cluster.Cluster`; network
faults (partition, heal, latency, loss) to its :class:`~workbench.run.faults.proxy.ProxyMesh`.  Every fault
is recorded when it is *applied*, on the same monotonic clock as the client's requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from workbench.history import FaultRecord
from workbench.run.cluster import Cluster, ClusterError
from workbench.spec.scenario import FaultAction

__all__ = ["Nemesis"]

log = logging.getLogger("workbench.run.nemesis")


class Nemesis:
    def __init__(self, cluster: Cluster, t0: float, on_fault: Callable[[FaultRecord], None]) -> None:
        self.cluster = cluster
        self.t0 = t0  # run clock zero on time.monotonic()
        self.on_fault = on_fault
        self.applied: list[FaultRecord] = []

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
            if fault.duration_s > 0 and fault.action in ("latency", "loss", "partition"):
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
                    self._heal_links(fault)
            except ClusterError as exc:
                self._emit("error", fault.target, message=str(exc))

    async def apply(self, fault: FaultAction) -> FaultRecord:
        c = self.cluster
        action = fault.action
        if action == "kill":
            pids = [p.pid for p in c.resolve(fault.target)]
            c.kill(fault.target)
            return self._emit("kill", fault.target, pids=pids)
        if action == "pause":
            c.pause(fault.target)
            return self._emit("pause", fault.target)
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
        if action == "partition":
            mesh.partition([list(g) for g in fault.groups])
            if not any("router" in g for g in fault.groups):
                # The router stands for DNS / a global load balancer: a split between regions cuts
                # the regions from each other, not the clients from their regions.
                for (src, dst), proxy in mesh.proxies.items():
                    if "router" in (src, dst):
                        proxy.heal()
            return self._emit("partition", "|".join(",".join(g) for g in fault.groups),
                              groups=[list(g) for g in fault.groups])
        if action == "heal":
            mesh.heal()
            return self._emit("heal", "")
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

    def _links(self, fault: FaultAction) -> list[tuple[str, str]]:
        mesh = self.cluster.mesh
        assert mesh is not None
        if fault.link:
            return [(fault.link[0], fault.link[1])]
        return list(mesh.proxies)

    def _heal_links(self, fault: FaultAction) -> None:
        mesh = self.cluster.mesh
        assert mesh is not None
        if fault.action == "partition":
            mesh.heal()
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
    return "<->".join(fault.link) if fault.link else "all links"
