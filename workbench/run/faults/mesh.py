"""A mesh of fault proxies, one per directed link between named processes (nodes and the router).

The controls speak in node and region names (partition groups, a region to blackhole, a link between
two regions) and each returns the :class:`FaultEvent` it recorded, stamped on the caller's clock.
"""

from __future__ import annotations

import asyncio
import functools
import random
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from workbench.run.faults.proxy import FaultProxy

__all__ = ["FaultEvent", "Link", "ProxyMesh"]


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One applied fault, stamped on the same monotonic clock as the load generator's records."""

    t: float  # time.monotonic() when applied
    action: str  # partition | heal | latency | loss
    links: tuple[tuple[str, str], ...]  # the (src, dst) links it touched
    params: Mapping[str, Any] = field(default_factory=dict)


Link = tuple[str, str]


class ProxyMesh:
    """One :class:`FaultProxy` per directed link ``(src, dst)``: traffic from ``src`` to ``dst``'s port.

    ``links`` maps each link to the real ``(host, port)`` of ``dst``; ``src`` then dials
    :meth:`port` ``(src, dst)`` instead. Names are node ids; ``region_of`` maps a node to its region
    (default: the part before the last ``-``, so ``eu-1`` is in ``eu``), which lets partitions and
    latencies name regions. Every control returns the :class:`FaultEvent` it appended to
    :attr:`events`. ``make_socket(src)``, when given, creates every socket of ``src``'s outgoing
    proxies (listening and upstream), e.g. inside ``src``'s network namespace.
    """

    def __init__(
        self,
        links: Mapping[Link, tuple[str, int]],
        *,
        listen_host: str = "127.0.0.1",
        region_of: Mapping[str, str] | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        make_socket: Callable[[str], socket.socket] | None = None,
    ) -> None:
        rng = random.Random(seed)
        self.proxies: dict[Link, FaultProxy] = {
            link: FaultProxy(listen_host, 0, host, port, f"{link[0]}->{link[1]}", seed=rng.getrandbits(32),
                             make_socket=None if make_socket is None else functools.partial(make_socket, link[0]))
            for link, (host, port) in links.items()
        }
        self._region_of = dict(region_of or {})
        self._clock = clock
        self.events: list[FaultEvent] = []

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.proxies.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.proxies.values()))

    async def __aenter__(self) -> ProxyMesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def port(self, src: str, dst: str) -> int:
        return self.proxies[(src, dst)].port

    def region(self, name: str) -> str:
        return self._region_of.get(name) or name.rsplit("-", 1)[0]

    def _nodes(self) -> set[str]:
        return {n for link in self.proxies for n in link}

    def members(self, name: str) -> set[str]:
        """The nodes a node or region name stands for (KeyError naming it if none)."""
        return self._expand(name)

    def _expand(self, name: str) -> set[str]:
        """A node name stands for itself; a region name for every node in it."""
        nodes = self._nodes()
        if name in nodes:
            return {name}
        members = {n for n in nodes if self.region(n) == name}
        if not members:
            raise KeyError(f"no node or region named {name!r} in the mesh")
        return members

    def select(self, src: str, dst: str, symmetric: bool = True) -> list[Link]:
        """Links from ``src`` to ``dst`` (node or region names), and back when ``symmetric``."""
        a, b = self._expand(src), self._expand(dst)
        pairs = [lk for lk in self.proxies if lk[0] in a and lk[1] in b]
        if symmetric:
            pairs += [lk for lk in self.proxies if lk[0] in b and lk[1] in a and lk not in pairs]
        if not pairs:
            raise KeyError(f"no link between {src!r} and {dst!r}")
        return pairs

    def _event(self, action: str, links: Iterable[Link], **params: Any) -> FaultEvent:
        ev = FaultEvent(self._clock(), action, tuple(links), params)
        self.events.append(ev)
        return ev

    def cut_links(self, groups: Iterable[Iterable[str]], keep: Iterable[str] = ()) -> list[Link]:
        """The links a partition into ``groups`` cuts (names are nodes or regions).

        Nodes named in no group form one more group together, so ``[["eu"]]`` isolates ``eu``.  Links
        with an end in ``keep`` (names never placed in a group, e.g. ``"router"``) are not cut.
        """
        owner: dict[str, int] = {}
        for i, group in enumerate(groups):
            for name in group:
                for node in self._expand(name):
                    if owner.setdefault(node, i) != i:
                        raise ValueError(f"{node!r} is in two partition groups")
        spared = {n for name in keep for n in self._expand(name)} - set(owner)
        return [lk for lk in self.proxies
                if owner.get(lk[0], -1) != owner.get(lk[1], -1) and not spared & set(lk)]

    def partition(self, groups: Iterable[Iterable[str]], mode: str = "blackhole",
                  keep: Iterable[str] = ()) -> FaultEvent:
        """Cut every link between different groups (see :meth:`cut_links`)."""
        groups = [list(g) for g in groups]
        cut = self.cut_links(groups, keep)
        for lk in cut:
            self.proxies[lk].partition(mode)
        owner = {node: i for i, g in enumerate(groups) for name in g for node in self._expand(name)}
        return self._event("partition", cut, mode=mode, groups=[sorted(g) for g in _groups(owner)])

    def blackhole_links(self, name: str) -> list[Link]:
        """Every link to or from the nodes of ``name`` (a node or region), the router's included."""
        members = self._expand(name)
        return [lk for lk in self.proxies if lk[0] in members or lk[1] in members]

    def blackhole(self, name: str) -> FaultEvent:
        """Drop everything to and from ``name``'s nodes silently (no RST, connects left waiting)."""
        cut = self.blackhole_links(name)
        for lk in cut:
            self.proxies[lk].partition("blackhole")
        return self._event("blackhole", cut, target=name)

    def heal(self) -> FaultEvent:
        """Lift every partition (latency and loss stay)."""
        for p in self.proxies.values():
            p.heal()
        return self._event("heal", self.proxies)

    def latency(self, link: Link, ms: float, jitter_ms: float = 0.0, symmetric: bool = True) -> FaultEvent:
        """Delay chunks on a link or every link between two regions (both ways when ``symmetric``)."""
        chosen = self.select(*link, symmetric=symmetric)
        for lk in chosen:
            self.proxies[lk].set_latency(ms, jitter_ms)
        return self._event("latency", chosen, ms=ms, jitter_ms=jitter_ms)

    def loss(self, link: Link, pct: float, symmetric: bool = True) -> FaultEvent:
        """Set loss odds on a link or every link between two regions."""
        chosen = self.select(*link, symmetric=symmetric)
        for lk in chosen:
            self.proxies[lk].set_loss(pct)
        return self._event("loss", chosen, pct=pct)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {f"{s}->{d}": p.stats() for (s, d), p in self.proxies.items()}


def _groups(owner: Mapping[str, int]) -> list[set[str]]:
    out: dict[int, set[str]] = {}
    for node, i in owner.items():
        out.setdefault(i, set()).add(node)
    return [out[i] for i in sorted(out)]
