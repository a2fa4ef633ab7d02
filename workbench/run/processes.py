"""The one child-process harness: start, wait until ready, drain logs, signal, kill -9, reap.

The workbench cluster, the benchmarks and the tests all start edge nodes, routers, load tools and
baselines as real OS processes, and all need the same guarantees: output goes to a log file (the kernel
drains it, so a chatty child never blocks on a full pipe), readiness has a deadline and an error that
names the child and shows its last log lines, and nothing outlives its owner -- not after an exception,
a Ctrl-C, nor a ``kill -9`` of the owner (the ``EDGE_DIE_WITH_PARENT`` lifeline, see
``edge_server.lifeline``).

:class:`Child` is one process (it can be started again: a restart keeps its name and log);
:class:`ProcessGroup` owns several and stops them all (SIGTERM, then SIGKILL after a grace period) at
the end of a ``with`` block and at interpreter exit.  Everything is synchronous except the ``*_async``
readiness waits and :meth:`ProcessGroup.stop_all_async`, for callers on an event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from edge_server.lifeline import ENV as LIFELINE_ENV
from workbench.history.records import ProcessSample

__all__ = [
    "LIFELINE_ENV",
    "Child",
    "NotReady",
    "ProcessError",
    "ProcessGroup",
    "child_env",
    "free_port",
    "install_exit_on_signals",
    "lifeline_env",
    "pin_cpus",
    "taskset_prefix",
    "wait_http",
]

STOP_GRACE_S = 3.0  # SIGTERM -> SIGKILL
POLL_S = 0.02
CPU_MIN_INTERVAL_S = 0.1  # a cpu figure over less wall time is mostly clock ticks (10 ms each: 10 % here)


class ProcessError(RuntimeError):
    """A child exited, or never got ready, when it should have been serving."""


class NotReady(ProcessError, TimeoutError):
    """A child is alive but did not get ready before its deadline."""


# ------------------------------------------------------------------------------------ helpers


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for ``bind(0)`` and outgoing connects (Linux's default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()
_port_lock = threading.Lock()
_port_rng = random.Random(os.getpid() ^ time.monotonic_ns())


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now and that nothing else this process starts will take.

    The port lies below the kernel's ephemeral range: a port from ``bind(0)``, closed and handed to a child,
    could be taken by the next ``bind(0)`` of a fault proxy or by an outgoing connection before the child
    binds it, and then the wrong server answers the child's readiness check. No port is handed out twice
    by one process; each is checked bindable (with ``SO_REUSEADDR``, as servers bind) before it is given.
    """
    high = _ephemeral_low() - 1
    low = max(1024, high - 12_000)
    with _port_lock:
        for _ in range(2_000):
            port = _port_rng.randint(low, high)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    raise ProcessError(f"no free port on {host} in {low}-{high} after 2,000 tries")


def _carries(body: bytes, fields: Mapping[str, Any]) -> bool:
    """Whether the JSON object ``body`` has every one of ``fields`` with its value."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and all(doc.get(k) == v for k, v in fields.items())


def lifeline_env() -> dict[str, str]:
    """``EDGE_DIE_WITH_PARENT=<our pid>``, but only on the main thread.

    The kernel ties PR_SET_PDEATHSIG to the *thread* that started the child: a child started from an
    executor thread would be killed when that thread ends (an ``asyncio.run`` in a worker, a restart
    from ``run_in_executor``), long before its owner goes.
    """
    if threading.current_thread() is threading.main_thread():
        return {LIFELINE_ENV: str(os.getpid())}
    return {}


def child_env(base: Mapping[str, str] | None = None, *, drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """A child's environment: ``base`` (default ``os.environ``) without ``drop``, plus ``extra``.

    Python children get ``PYTHONUNBUFFERED=1`` so their log lines reach the file as they are written.
    """
    env = dict(os.environ if base is None else base)
    for name in drop:
        env.pop(name, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


def pin_cpus(cpus: Iterable[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child to ``cpus`` (``os.sched_setaffinity``), or None for no pinning."""
    if cpus is None:
        return None
    wanted = set(cpus)

    def pin() -> None:
        os.sched_setaffinity(0, wanted)

    return pin


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl() if os.uname().sysname == "Linux" else None  # resolved here, not in the forked child


def _preexec(cpus: Iterable[int] | None, kernel_lifeline: bool) -> Callable[[], None] | None:
    """The child's set-up between fork and exec: CPU pinning, and for programs that do not read
    ``EDGE_DIE_WITH_PARENT`` (wrk, redis-server, a ``python -c`` snippet) PR_SET_PDEATHSIG itself."""
    pin = pin_cpus(cpus)
    parent = os.getpid()
    lifeline = kernel_lifeline and _PRCTL is not None and threading.current_thread() is threading.main_thread()
    if pin is None and not lifeline:
        return None

    def setup() -> None:
        if pin is not None:
            pin()
        if lifeline and _PRCTL is not None:
            _PRCTL(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the call: do not outlive it
                os._exit(1)

    return setup


def taskset_prefix(cpus: Iterable[int] | None) -> str:
    """How a pinned command is shown in results files (``taskset -c 1 ``), the same as a shell would run it."""
    return "" if cpus is None else f"taskset -c {','.join(map(str, sorted(cpus)))} "


def _on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_exit_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)) -> None:
    """Turn ``signals`` into ``SystemExit(128 + n)`` so every ``finally`` and ``atexit`` runs (main thread only)."""
    for sig in signals:
        signal.signal(sig, _on_signal)


def _http_status(url: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_http(url: str, *, timeout_s: float, child: Child | None = None, status: int = 200) -> float:
    """Poll ``url`` until it answers ``status``; the seconds it took.

    With ``child``, fail at once if it exits, and name it (with its last log lines) on a timeout.
    """
    started = time.monotonic()
    deadline = started + timeout_s
    name = child.name if child is not None else url
    while True:
        if child is not None:
            child._check_alive(f"{url} answered")
        with contextlib.suppress(OSError):
            if _http_status(url, timeout=min(1.0, max(0.05, deadline - time.monotonic()))) == status:
                return time.monotonic() - started
        if time.monotonic() >= deadline:
            tail = f"; last log lines:\n{child.log_tail()}" if child is not None else ""
            raise NotReady(f"{name}: {url} not ready after {timeout_s:g} s{tail}")
        time.sleep(POLL_S)


# ------------------------------------------------------------------------------------ one child


@dataclass
class Child:
    """One child process: how to start it, and its current run.

    ``env`` is the whole environment (default: ours); the lifeline is added at each start when
    ``die_with_parent`` and the starting thread is the main one (with ``kernel_lifeline`` it is armed in the
    child before exec too, for programs that do not read the variable).  stdout and stderr go to ``log_path``
    (appended, so a restart's output follows the previous run's) unless ``stderr_path`` splits them.
    """

    name: str
    argv: list[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    cpus: frozenset[int] | None = None
    new_session: bool = False  # own session: a Ctrl-C in the terminal does not reach it, only our cleanup
    die_with_parent: bool = True
    kernel_lifeline: bool = False  # also arm PR_SET_PDEATHSIG before exec (a program that is not an edge node)
    stderr_path: Path | None = None
    popen: subprocess.Popen | None = None
    state: str = "new"  # new, running, paused, killed, stopped
    started_at: float = 0.0
    runs: int = 0
    history: list[tuple[float, str]] = field(default_factory=list)
    _ps: psutil.Process | None = field(default=None, repr=False)
    _cpu_mark: tuple[float, float] = field(default=(0.0, 0.0), repr=False)  # (monotonic time, cpu s) measured from
    _cpu_pct: float = field(default=0.0, repr=False)  # the last cpu figure
    _log_offset: int = field(default=0, repr=False)

    # ------------------------------------------------------------------ lifecycle

    def start(self, env: Mapping[str, str] | None = None) -> Child:
        """Start a new run (the previous one must be gone); ``env`` replaces :attr:`env` for this run."""
        if self.alive():
            raise ProcessError(f"{self.name} is already running (pid {self.pid})")
        base = dict(env if env is not None else (self.env if self.env is not None else os.environ))
        base.pop(LIFELINE_ENV, None)  # an inherited one names our parent: the child would exit at once
        if self.die_with_parent:
            base.update(lifeline_env())
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(self.log_path, "ab"))
            self._log_offset = out.tell()  # this run's output starts here (wait_line reads from it)
            err: Any = subprocess.STDOUT
            if self.stderr_path is not None:
                err = files.enter_context(open(self.stderr_path, "ab"))
            try:
                self.popen = subprocess.Popen(
                    list(self.argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=base, cwd=self.cwd,
                    start_new_session=self.new_session,
                    preexec_fn=_preexec(self.cpus, self.die_with_parent and self.kernel_lifeline))
            except OSError as exc:  # no such program, not executable, bad cwd
                raise ProcessError(f"{self.name}: cannot start {self.argv[0]!r}: {exc}") from None
        self.runs += 1
        self.state = "running"
        self.started_at = time.monotonic()
        self.history.append((self.started_at, "start"))
        self._ps = None
        self._cpu_mark = (self.started_at, 0.0)  # a new process has used no cpu yet
        self._cpu_pct = 0.0
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def command(self) -> str:
        """The command line as a shell would run it (with its pinning), for results files."""
        return taskset_prefix(self.cpus) + " ".join(shlex.quote(a) for a in self.argv)

    def signal(self, sig: int, state: str | None = None) -> None:
        """Send ``sig`` if the process still runs; record ``state`` (paused, killed ...) either way."""
        if self.alive() and self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)
        if state is not None:
            self.state = state
            self.history.append((time.monotonic(), state))

    def pause(self) -> None:
        self.signal(signal.SIGSTOP, "paused")

    def resume(self) -> None:
        self.signal(signal.SIGCONT, "running")

    def kill9(self, wait_s: float | None = STOP_GRACE_S) -> None:
        """SIGKILL now; with ``wait_s``, reap it too (None: return at once, e.g. on an event loop)."""
        self.signal(signal.SIGKILL, "killed")
        if wait_s is not None:
            self.wait(wait_s)

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the run to end; its exit status, or None if it still runs."""
        if self.popen is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.popen.wait(timeout)
        return None

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """A clean stop: SIGTERM (after SIGCONT, a paused child cannot act on it), SIGKILL after ``grace_s``."""
        if self.popen is None:
            return None
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM, "stopped")
            if self.wait(grace_s) is None:
                self.reap()
        return self.popen.returncode

    def reap(self, timeout: float = 2.0) -> None:
        """SIGKILL if still there, and wait, so no zombie or orphan is left behind."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)
                os.kill(self.popen.pid, signal.SIGKILL)
        self.wait(timeout)

    # ------------------------------------------------------------------ readiness

    def _check_alive(self, what: str) -> None:
        if not self.alive():
            code = self.popen.returncode if self.popen is not None else None
            raise ProcessError(f"{self.name} exited with status {code} before {what}; last log lines:\n"
                               f"{self.log_tail()}")

    def wait_http(self, url: str, *, timeout_s: float, status: int = 200) -> float:
        """Poll ``url`` until it answers ``status``; the seconds it took.  Fails naming the child."""
        return wait_http(url, timeout_s=timeout_s, child=self, status=status)

    async def wait_http_async(self, url: str, *, timeout_s: float, status: int = 200,
                              session: Any = None, body_has: Mapping[str, Any] | None = None) -> float:
        """:meth:`wait_http` on an event loop (an ``aiohttp.ClientSession`` may be passed to reuse).

        ``body_has``: fields the JSON answer must carry too (a node's own id), so that no other server on
        the port can pass for the child.
        """
        import aiohttp

        started = time.monotonic()
        own = session is None
        if own:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        try:
            while True:
                self._check_alive(f"{url} answered")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with session.get(url) as resp:
                        if resp.status == status and (not body_has or _carries(await resp.read(), body_has)):
                            return time.monotonic() - started
                if time.monotonic() - started >= timeout_s:
                    raise NotReady(f"{self.name}: {url} not ready after {timeout_s:g} s; last log lines:\n"
                                   f"{self.log_tail()}")
                await asyncio.sleep(POLL_S * 2.5)
        finally:
            if own:
                await session.close()

    def wait_line(self, pattern: str | re.Pattern[str], *, timeout_s: float) -> re.Match[str]:
        """Wait until a line of this run's output matches ``pattern`` (``re.search``); the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        offset = self._log_offset
        deadline = time.monotonic() + timeout_s
        while True:
            alive = self.alive()
            for line in self._read_from(offset).splitlines():
                m = regex.search(line)
                if m:
                    return m
            if not alive:
                self._check_alive(f"printing a line matching {regex.pattern!r}")
            if time.monotonic() >= deadline:
                raise NotReady(f"{self.name}: no line matching {regex.pattern!r} after {timeout_s:g} s; "
                               f"last log lines:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def _read_from(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ logs and samples

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` of the output (of both files when stderr is split)."""
        out = []
        for path in (self.log_path, self.stderr_path):
            if path is None:
                continue
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(("--- " + path.name + "\n" if self.stderr_path is not None else "") + "\n".join(text))
        return "\n".join(out)

    def psutil_process(self) -> psutil.Process | None:
        """The psutil view of the current run (cached per run), or None when it is gone."""
        if not self.alive() or self.popen is None:
            return None
        try:
            if self._ps is None or self._ps.pid != self.popen.pid:
                self._ps = psutil.Process(self.popen.pid)
            return self._ps
        except psutil.Error:
            return None

    def sample(self, t_s: float) -> ProcessSample | None:
        """CPU (% of one core since the previous sample, or since the start for the first one) and RSS of
        the current run, or None when it is gone.

        Measured from the process's own cpu seconds over our monotonic clock, not psutil's
        ``cpu_percent``: primed and read at once, that one divided a 10 ms clock tick by microseconds and
        reported a node's first sample as 24,295 % (which made one step's mean 735 % in an overload run).
        A sample within ``CPU_MIN_INTERVAL_S`` of the one measured last repeats its figure (one tick over
        a few milliseconds is no measurement either)."""
        ps = self.psutil_process()
        if ps is None:
            return None
        try:
            times = ps.cpu_times()
            rss = ps.memory_info().rss
        except psutil.Error:
            return None
        now, used = time.monotonic(), times.user + times.system
        since, used_before = self._cpu_mark
        if now - since >= CPU_MIN_INTERVAL_S:  # else: too short to measure; the last figure stands
            self._cpu_pct = 100.0 * max(0.0, used - used_before) / (now - since)
            self._cpu_mark = (now, used)
        return ProcessSample(t_s=t_s, name=self.name, cpu_pct=self._cpu_pct, rss_mb=rss / 2**20)


# ------------------------------------------------------------------------------------ a group

_LIVE: list[ProcessGroup] = []


def _stop_live_groups() -> None:
    for group in list(_LIVE):
        group.stop_all()


atexit.register(_stop_live_groups)


class ProcessGroup:
    """Children that are all gone after the ``with`` block (or :meth:`stop_all`, or interpreter exit)."""

    def __init__(self, log_dir: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, new_session: bool = False,
                 grace_s: float = STOP_GRACE_S) -> None:
        self.log_dir = Path(log_dir)
        self.env = dict(env) if env is not None else None
        self.cwd = Path(cwd) if cwd is not None else None
        self.new_session = new_session
        self.grace_s = grace_s
        self.children: list[Child] = []
        _LIVE.append(self)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def add(self, child: Child) -> Child:
        """Own ``child`` (started or not): it is stopped with the group."""
        if child not in self.children:
            self.children.append(child)
        if self not in _LIVE:
            _LIVE.append(self)
        return child

    def child(self, name: str, argv: Sequence[str], *, cpus: Iterable[int] | None = None,
              env: Mapping[str, str] | None = None, log_path: Path | None = None,
              stderr_path: Path | None = None, die_with_parent: bool = True,
              kernel_lifeline: bool = False) -> Child:
        """A new child of this group (not started yet); ``env`` adds to the group's environment."""
        base = dict(self.env if self.env is not None else os.environ)
        base.update(env or {})
        return self.add(Child(name, list(argv), log_path or self.log_dir / f"{name}.log", env=base, cwd=self.cwd,
                              cpus=frozenset(cpus) if cpus is not None else None, new_session=self.new_session,
                              die_with_parent=die_with_parent, kernel_lifeline=kernel_lifeline,
                              stderr_path=stderr_path))

    def start(self, name: str, argv: Sequence[str], **kw: Any) -> Child:
        """:meth:`child`, started."""
        return self.child(name, argv, **kw).start()

    def _term_all(self) -> list[Child]:
        running = [c for c in self.children if c.alive()]
        for c in running:
            c.signal(signal.SIGCONT)
            c.signal(signal.SIGTERM, "stopped")
        return running

    def _finish(self) -> None:
        for c in self.children:
            c.reap(1.0)
        self.children = [c for c in self.children if c.alive()]
        if not self.children and self in _LIVE:
            _LIVE.remove(self)

    def stop_all(self) -> None:
        """SIGTERM every running child, SIGKILL what is left after the grace period, reap all."""
        running = self._term_all()
        deadline = time.monotonic() + self.grace_s
        for c in running:
            c.wait(max(0.05, deadline - time.monotonic()))
        self._finish()

    async def stop_all_async(self) -> None:
        """:meth:`stop_all` without blocking the event loop while the children exit."""
        running = self._term_all()
        deadline = time.monotonic() + self.grace_s
        while any(c.alive() for c in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._finish)
