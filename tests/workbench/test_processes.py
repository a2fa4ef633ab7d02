"""The one process harness (workbench/run/processes.py) on real processes: readiness, signals, reaping,
and the lifeline that kills children with a launcher that is itself killed with ``kill -9``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from workbench.run.processes import (
    LIFELINE_ENV,
    Child,
    NotReady,
    ProcessError,
    ProcessGroup,
    free_port,
    lifeline_env,
    taskset_prefix,
    wait_http,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SERVER = textwrap.dedent("""
    import http.server, sys
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ready" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    print("listening on", srv.server_port, flush=True)
    srv.serve_forever()
""")


def _status(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"


def _becomes(pid: int, want: bool, status: str, within_s: float = 5.0) -> bool:
    """Whether ``pid``'s status is (``want``) / is not ``status`` within ``within_s`` (a signal lands async)."""
    deadline = time.monotonic() + within_s
    while (_status(pid) == status) != want:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_ready_on_http_and_on_a_line_then_pause_resume_kill_and_reap(tmp_path: Path) -> None:
    port = free_port()
    with ProcessGroup(tmp_path) as group:
        child = group.start("srv", [sys.executable, "-c", SERVER, str(port)])
        match = child.wait_line(r"listening on (\d+)", timeout_s=15)
        assert int(match.group(1)) == port
        assert child.wait_http(f"http://127.0.0.1:{port}/ready", timeout_s=15) >= 0
        with pytest.raises(NotReady, match=r"srv: .*/missing not ready after 0.3 s"):
            child.wait_http(f"http://127.0.0.1:{port}/missing", timeout_s=0.3)
        child.pause()
        assert child.state == "paused" and _becomes(child.pid, True, psutil.STATUS_STOPPED)
        child.resume()
        assert _becomes(child.pid, False, psutil.STATUS_STOPPED)
        sample = child.sample(1.5)
        assert sample is not None and sample.name == "srv" and sample.rss_mb > 1
        pid = child.pid
        child.kill9()
        assert not child.alive() and child.returncode == -signal.SIGKILL and _status(pid) == "gone"
        assert [s for _, s in child.history] == ["start", "paused", "running", "killed"]
        child.start()  # a restart appends to the same log; wait_line reads this run's output only
        assert child.runs == 2 and child.wait_line("listening on", timeout_s=15)
        assert child.log_path.read_text().count("listening on") == 2
    assert not child.alive()


def test_a_child_that_exits_fails_the_wait_with_its_log(tmp_path: Path) -> None:
    child = Child("dies", [sys.executable, "-c", "import sys; print('bad config: port'); sys.exit(2)"],
                  tmp_path / "dies.log").start()
    with pytest.raises(ProcessError, match=r"(?s)dies exited with status 2 .*bad config: port"):
        child.wait_http(f"http://127.0.0.1:{free_port()}/", timeout_s=15)
    with pytest.raises(ProcessError, match="dies exited with status 2"):
        child.wait_line("never printed", timeout_s=15)
    with pytest.raises(NotReady):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout_s=0.2)
    with pytest.raises(ProcessError, match=r"ghost: cannot start '/nonexistent/wrk'"):
        Child("ghost", ["/nonexistent/wrk"], tmp_path / "ghost.log").start()


def test_stop_is_sigterm_then_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); " \
               "time.sleep(60)"
    with ProcessGroup(tmp_path, grace_s=0.5) as group:
        child = group.start("stubborn", [sys.executable, "-c", stubborn])
        child.wait_line("up", timeout_s=15)
        started = time.monotonic()
        group.stop_all()
        assert time.monotonic() - started < 5
        assert child.returncode == -signal.SIGKILL
    polite = Child("polite", [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                   tmp_path / "polite.log").start()
    polite.wait_line("up", timeout_s=15)
    polite.pause()  # a paused child still gets the SIGTERM (SIGCONT first)
    assert polite.stop(grace_s=5) == -signal.SIGTERM


def test_lifeline_only_from_the_main_thread_and_pinning_shown(tmp_path: Path) -> None:
    assert lifeline_env() == {LIFELINE_ENV: str(os.getpid())}
    seen: list[dict[str, str]] = []
    worker = threading.Thread(target=lambda: seen.append(lifeline_env()))
    worker.start()
    worker.join()
    assert seen == [{}]
    # From a worker thread the child gets no lifeline, not even one inherited from our own parent
    # (it names the wrong process: an edge node would exit at once).
    show = [sys.executable, "-c", f"import os; print('lifeline=' + os.environ.get({LIFELINE_ENV!r}, 'none'))"]
    inherited = {**os.environ, LIFELINE_ENV: "1"}
    children = [Child(f"t{i}", show, tmp_path / f"t{i}.log", env=inherited) for i in range(2)]
    worker = threading.Thread(target=children[0].start)
    worker.start()
    worker.join()
    children[1].start()
    assert children[0].wait_line("lifeline=", timeout_s=15).string == "lifeline=none"
    assert children[1].wait_line("lifeline=", timeout_s=15).string == f"lifeline={os.getpid()}"
    for c in children:
        c.reap()
    assert taskset_prefix([1, 0]) == "taskset -c 0,1 " and taskset_prefix(None) == ""


LAUNCHER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from workbench.run.processes import Child
    folder = Path(sys.argv[1])
    # an edge node reads EDGE_DIE_WITH_PARENT itself; a foreign program gets the kernel lifeline before exec
    node = Child("node", [sys.executable, "-c", "from edge_server.lifeline import die_with_parent; "
                 "import time; assert die_with_parent(); print('armed', flush=True); time.sleep(60)"],
                 folder / "node.log").start()
    sleeper = Child("sleep", ["sleep", "60"], folder / "sleep.log", kernel_lifeline=True).start()
    node.wait_line("armed", timeout_s=20)
    print(json.dumps([node.pid, sleeper.pid]), flush=True)
    time.sleep(60)
""")


def test_children_die_with_a_launcher_killed_with_kill_9(tmp_path: Path) -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    pids: list[int] = []
    try:
        line = launcher.stdout.readline() if launcher.stdout else ""
        assert line, "the launcher printed no pids"
        pids = json.loads(line)
        assert all(_status(p) not in ("gone", psutil.STATUS_ZOMBIE) for p in pids)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_status(p) not in ("gone", psutil.STATUS_ZOMBIE) for p in pids):
            time.sleep(0.05)
        assert [p for p in pids if _status(p) not in ("gone", psutil.STATUS_ZOMBIE)] == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_free_ports_lie_below_the_kernels_ephemeral_range_and_are_never_handed_out_twice() -> None:
    """A port from bind(0) could be taken by the next bind(0) (a fault proxy) before the child binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= p < low for p in ports)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ephemeral = [socket.create_connection(("127.0.0.1", taken.getsockname()[1])) for _ in range(50)]
        try:
            assert not {s.getsockname()[1] for s in ephemeral} & set(ports)
        finally:
            for s in ephemeral:
                s.close()


def test_cpu_samples_of_a_busy_child_stay_within_a_core_however_often_they_are_taken(tmp_path: Path) -> None:
    # psutil's primed cpu_percent read at once divided a 10 ms clock tick by microseconds (24,295 %).
    with ProcessGroup(tmp_path) as group:
        child = group.start("spin", [sys.executable, "-c", "while True: pass"])
        figures = []
        ends = time.monotonic() + 0.4
        while time.monotonic() < ends:  # back to back, bounded in time
            sample = child.sample(0.0)
            assert sample is not None
            figures.append(sample.cpu_pct)
        time.sleep(0.3)
        last = child.sample(0.0)
        assert last is not None
    # One busy thread is one core; a figure over CPU_MIN_INTERVAL_S may be one 10 ms clock tick off.
    assert len(figures) > 100 and max(figures) <= 125, max(figures)
    assert 20 < last.cpu_pct <= 125, last.cpu_pct  # (less than a core on a crowded machine)
