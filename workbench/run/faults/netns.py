"""The real-network fault backend: a network namespace per process, cuts made by the kernel.

Layout (everything lives in namespaces this module creates; nothing is added to the namespace the
workbench started in)::

    lab namespace:  bridge wbbr0 10.213.0.1/24, IPv4 forwarding on, no default route;
                    the workbench itself (load client, recorder) runs here while a drill runs
    one namespace per process (the router 10.213.0.2, nodes 10.213.0.10 ...): eth0 with a /32
                    address, a veth to the bridge, every other address reached *through* the lab

Because every packet between two processes is forwarded by the lab, a cut is a policy rule in the
lab (``ip rule add from A to B iif wbbr0 blackhole``): the kernel drops forwarded packets silently,
so a connect gets no answer and an established stream stalls with no RST, and TCP retransmits
resume it after the rule is deleted.  (A blackhole route in the *sender's* own namespace would not
do: a local sender gets EINVAL at once, which is a refused connection, not an outage.)  The
workbench's own traffic from the lab (scrapes, health of the run) is local, not forwarded, so the
observer keeps seeing every node; the load client reaches only the router, which no cut names.

Latency and loss still come from the fault proxies: a proxy of ``src``'s outgoing links creates its
sockets inside ``src``'s namespace (:meth:`NetnsLab.socket_in`), so its upstream packets take the
same forwarded path and the same cuts.

Needs root, the ``ip`` command and ``setns``; :func:`unavailable_reason` says in one line what is
missing.  :meth:`NetnsLab.close` deletes every namespace (their veths and the bridge go with them),
also after a failure; a lab left behind by a process that died is deleted by the next lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence

__all__ = ["BRIDGE", "LAB_ADDR", "SUBNET", "NetnsError", "NetnsLab", "lab_namespaces", "unavailable_reason"]

SUBNET = "10.213.0.0/24"  # exists only inside the lab's namespaces
LAB_ADDR = "10.213.0.1"
BRIDGE = "wbbr0"
_FIRST_HOST = 2  # the first process (the router, in a cluster) gets 10.213.0.2
_MAX_PROCS = 250
_PREFIX = "wbn"  # namespace names: wbn<pid>x<n>-lab, wbn<pid>x<n>-<i>
_NAME = re.compile(rf"^{_PREFIX}(\d+)x(\d+)-")
_CLONE_NEWNET = 0x40000000
_counter = itertools.count(1)
_libc: ctypes.CDLL | None = None


class NetnsError(RuntimeError):
    """The namespace lab could not be built, checked or controlled."""


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ip(*args: str, check: bool = True, timeout: float = 10.0) -> str:
    """Run ``ip ARGS``; every call that changes something names a namespace of ours (``-n NS``)."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"ip {' '.join(args)}: {exc}") from None
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def lab_namespaces() -> list[str]:
    """Names of every namespace a lab of this module made (any process's), from ``ip netns list``."""
    try:
        out = _ip("netns", "list", check=False)
    except NetnsError:
        return []
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if _NAME.match(n)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_stale() -> None:
    """Delete labs whose creating process is gone (killed before it could clean up)."""
    for name in lab_namespaces():
        m = _NAME.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _ip("netns", "delete", name, check=False)


_reason: str | bool | None = False  # False: not probed yet


def unavailable_reason() -> str | None:
    """None if this host can run the netns backend, else one line saying what is missing."""
    global _reason
    if _reason is not False:
        return _reason  # type: ignore[return-value]
    _reason = _probe()
    return _reason


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"needs root (running as uid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "needs the 'ip' command (iproute2)"
    try:
        ctypes.CDLL(None, use_errno=True).setns  # noqa: B018
    except (OSError, AttributeError):
        return "needs setns(2) in the C library"
    name = f"{_PREFIX}{os.getpid()}x0-probe"
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "rule", "add", "from", "10.213.0.2", "to", "10.213.0.3", "blackhole")
    except NetnsError as exc:
        return f"cannot create a network namespace with a blackhole rule ({exc})"
    finally:
        _ip("netns", "delete", name, check=False)
    return None


class NetnsLab:
    """A lab namespace with a bridge and one namespace per named process.

    Build it with :meth:`create` (it checks its own routes before returning), use :meth:`addr`,
    :meth:`exec_prefix` and :meth:`socket_in` to place processes and sockets, :meth:`enter` to move
    the calling thread into the lab, :meth:`cut` / :meth:`heal` to break links, and always
    :meth:`close`.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if len(names) > _MAX_PROCS:
            raise NetnsError(f"the netns backend places at most {_MAX_PROCS} processes in {SUBNET}, got {len(names)}")
        if len(set(names)) != len(names):
            raise NetnsError("process names must be distinct")
        self.prefix = f"{_PREFIX}{os.getpid()}x{next(_counter)}"
        self.lab = f"{self.prefix}-lab"
        self.names = tuple(names)
        self.namespaces = {name: f"{self.prefix}-{i}" for i, name in enumerate(self.names)}
        self.addrs = {name: f"10.213.0.{_FIRST_HOST + i}" for i, name in enumerate(self.names)}
        self._created: list[str] = []
        self._fds: dict[str, int] = {}
        self._home: int | None = None  # the calling thread's namespace while it is in the lab
        self._rules: set[tuple[str, str]] = set()  # (from addr, to addr) pairs dropped now

    def __repr__(self) -> str:
        return f"<NetnsLab {self.lab} processes={len(self.names)} cuts={len(self._rules)}>"

    # ------------------------------------------------------------------ build, check, tear down

    @classmethod
    def create(cls, names: Sequence[str]) -> NetnsLab:
        """Build and check the lab; on any failure everything already made is deleted again."""
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(f"faults_backend 'netns' {reason}")
        _delete_stale()
        lab = cls(names)
        try:
            lab._build()
            lab.check()
        except BaseException:
            lab.close()
            raise
        return lab

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def _build(self) -> None:
        lab = self.lab
        self._add_ns(lab)
        _ip("-n", lab, "link", "set", "lo", "up")
        _ip("-n", lab, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", lab, "addr", "add", f"{LAB_ADDR}/24", "dev", BRIDGE)
        _ip("-n", lab, "link", "set", BRIDGE, "up")
        # Forwarding and redirects are per namespace: this changes the lab only.
        self._sysctl(lab, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                     f"net.ipv4.conf.{BRIDGE}.send_redirects=0")
        for i, name in enumerate(self.names):
            ns, addr, veth = self.namespaces[name], self.addrs[name], f"v{i}"
            self._add_ns(ns)
            # Both ends are made inside our namespaces: the veth in the lab, its peer moved into ns.
            _ip("-n", lab, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", lab, "link", "set", veth, "master", BRIDGE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/32", "dev", "eth0")
            _ip("-n", ns, "route", "add", LAB_ADDR, "dev", "eth0", "scope", "link", "src", addr)
            _ip("-n", ns, "route", "add", SUBNET, "via", LAB_ADDR, "dev", "eth0", "src", addr)
        for name in [lab, *self.namespaces.values()]:
            self._fds[name] = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)

    @staticmethod
    def _sysctl(ns: str, *settings: str) -> None:
        try:
            done = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings],
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetnsError(f"sysctl in {ns}: {exc}") from None
        if done.returncode != 0:
            raise NetnsError(f"sysctl in {ns}: {(done.stderr or done.stdout).strip()}")

    def check(self) -> None:
        """Refuse to run unless traffic can only stay inside the lab: no default route anywhere, and
        every process address reached over our bridge (from the lab) or through the lab (from a process)."""
        for ns in [self.lab, *self.namespaces.values()]:
            default = _ip("-n", ns, "route", "show", "default").strip()
            if default:
                raise NetnsError(f"namespace {ns} has a default route ({default}); refusing to send")
        for name, addr in self.addrs.items():
            route = _ip("-n", self.lab, "route", "get", addr)
            if f"dev {BRIDGE}" not in route:
                raise NetnsError(f"in the lab, {addr} ({name}) is not routed over {BRIDGE}: {route.strip()}")
        for name, ns in self.namespaces.items():
            for other, addr in self.addrs.items():
                if other != name:
                    route = _ip("-n", ns, "route", "get", addr)
                    if f"via {LAB_ADDR} dev eth0" not in route:
                        raise NetnsError(f"in {name}'s namespace, {addr} does not go through the lab: {route.strip()}")
        links = _ip("-n", self.lab, "-o", "link", "show")
        for line in links.splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            if dev not in ("lo", BRIDGE) and not re.fullmatch(r"v\d+", dev):
                raise NetnsError(f"unexpected interface {dev!r} in the lab")

    def close(self) -> None:
        """Leave the lab (if this thread is in it) and delete every namespace made; never raises."""
        with contextlib.suppress(OSError):
            self.leave()
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        for name in reversed(self._created):
            with contextlib.suppress(NetnsError):
                _ip("netns", "delete", name, check=False)
        self._created.clear()
        self._rules.clear()

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ placing processes and sockets

    def addr(self, name: str) -> str:
        return self.addrs[name]

    def exec_prefix(self, name: str) -> list[str]:
        """Prefix of a command line that runs it inside ``name``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[name]]

    def enter(self) -> None:
        """Move the calling thread (the event loop's) into the lab; sockets it makes from now on are there.

        Threads and processes it starts later inherit the lab; :meth:`leave` (or :meth:`close`) returns it.
        """
        if self._home is not None:
            return
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self._fds[self.lab])
        except BaseException:
            os.close(home)
            raise
        self._home = home

    def leave(self) -> None:
        if self._home is None:
            return
        try:
            _setns(self._home)
        finally:
            os.close(self._home)
            self._home = None

    def socket_in(self, name: str) -> socket.socket:
        """A new TCP/IPv4 socket inside ``name``'s namespace (a socket keeps its namespace for life)."""
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self._fds[self.namespaces[name]])
            try:
                return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                _setns(here)
        finally:
            os.close(here)

    # ------------------------------------------------------------------ cuts

    @property
    def cuts(self) -> frozenset[tuple[str, str]]:
        """The (from, to) address pairs whose forwarded packets are dropped now."""
        return frozenset(self._rules)

    async def cut(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Drop every packet between each pair of process names, both ways; returns rules added."""
        rules = set()
        for a, b in pairs:
            rules.add((self.addrs[a], self.addrs[b]))
            rules.add((self.addrs[b], self.addrs[a]))
        new = sorted(rules - self._rules)
        await self._batch([f"rule add {_rule(src, dst)}" for src, dst in new])
        self._rules.update(new)
        return len(new)

    async def uncut(self, pairs: Iterable[tuple[str, str]]) -> int:
        """Lift the cuts between each pair (both ways); returns rules deleted."""
        rules = set()
        for a, b in pairs:
            rules.add((self.addrs[a], self.addrs[b]))
            rules.add((self.addrs[b], self.addrs[a]))
        old = sorted(rules & self._rules)
        await self._batch([f"rule del {_rule(src, dst)}" for src, dst in old])
        self._rules.difference_update(old)
        return len(old)

    async def heal(self) -> int:
        """Delete every cut; returns how many rules went."""
        old = sorted(self._rules)
        await self._batch([f"rule del {_rule(src, dst)}" for src, dst in old])
        self._rules.clear()
        return len(old)

    async def _batch(self, commands: list[str]) -> None:
        """Run ``ip -n LAB -batch -`` with ``commands``: one process for the whole change."""
        if not commands:
            return
        proc = await asyncio.create_subprocess_exec(
            "ip", "-n", self.lab, "-batch", "-", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(("\n".join(commands) + "\n").encode()), 10)
        if proc.returncode != 0:
            raise NetnsError(f"ip -n {self.lab} -batch: {(err or out).decode(errors='replace').strip()}")


def _rule(src: str, dst: str) -> str:
    return f"from {src} to {dst} iif {BRIDGE} blackhole"
