"""The netns fault backend against the real kernel: namespaces, a bridge, blackhole rules.

Every namespace and link here is made by the code under test inside namespaces it creates; the tests
check that the namespace they run in is left exactly as it was and that no namespace is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.echo import echo_handler
from tests.support.signals import interruptible
from workbench.run.faults.netns import BRIDGE, LAB_ADDR, NetnsError, NetnsLab, lab_namespaces, unavailable_reason

_why = unavailable_reason()
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(_why is not None, reason=f"netns backend cannot run here: {_why}")]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=True).stdout


def _here() -> dict[str, str]:
    """This namespace's identity and network state (read only), to compare before and after."""
    return {"ns": os.readlink("/proc/thread-self/ns/net"), "links": _ip("-o", "link", "show"),
            "addrs": _ip("-o", "addr", "show"), "routes": _ip("route", "show"), "rules": _ip("rule", "show")}


def _ours() -> list[str]:
    return [n for n in lab_namespaces() if n.startswith(f"wbn{os.getpid()}x")]


async def test_lab_is_isolated_cuts_silently_and_is_deleted() -> None:
    before = _here()
    loop = asyncio.get_running_loop()
    with NetnsLab.create(["router", "a", "b"]) as lab:
        assert set(_ours()) == {lab.lab, *lab.namespaces.values()}
        # the lab's own checks passed; read two of them again here
        assert f"dev {BRIDGE}" in _ip("-n", lab.lab, "route", "get", lab.addr("b"))
        assert _ip("-n", lab.lab, "route", "show", "default").strip() == ""

        server = lab.socket_in("b")
        server.bind((lab.addr("b"), 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        assert _here()["ns"] == before["ns"]  # socket_in returned the thread to its namespace

        echoes: set[asyncio.Task[None]] = set()

        async def echo() -> None:
            while True:
                conn, _ = await loop.sock_accept(server)
                echoes.add(loop.create_task(_echo(loop, conn)))

        serving = asyncio.create_task(echo())
        client = lab.socket_in("a")
        client.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(client, (lab.addr("b"), port)), 5)
        await loop.sock_sendall(client, b"hi")
        assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"hi"

        assert await lab.cut([("a", "b")]) == 2
        await loop.sock_sendall(client, b"held")
        with pytest.raises(TimeoutError):  # a reset would raise ConnectionResetError instead
            await asyncio.wait_for(loop.sock_recv(client, 16), 1.0)
        late = lab.socket_in("a")
        late.setblocking(False)
        connecting = asyncio.create_task(loop.sock_connect(late, (lab.addr("b"), port)))
        await asyncio.sleep(0.5)
        assert not connecting.done(), "a connect across a cut completed or was refused"

        assert await lab.heal() == 2
        assert await asyncio.wait_for(loop.sock_recv(client, 16), 10) == b"held"  # TCP retransmitted it
        await asyncio.wait_for(connecting, 10)
        for task in (serving, *echoes):
            task.cancel()
        for sock in (client, late, server):
            sock.close()
    assert _ours() == []
    assert _here() == before


async def _echo(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    conn.setblocking(False)
    with conn:
        while data := await loop.sock_recv(conn, 65536):
            await loop.sock_sendall(conn, data)


def test_a_lab_that_fails_its_checks_is_deleted_and_a_dead_process_lab_is_swept() -> None:
    class Refused(NetnsLab):
        def check(self) -> None:
            super().check()
            raise NetnsError("refused on purpose")

    with pytest.raises(NetnsError, match="refused on purpose"):
        Refused.create(["a"])
    assert _ours() == []

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"wbn{dead.pid}x1-lab"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        with NetnsLab.create(["a"]):
            assert stale not in lab_namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
    assert _ours() == []


def test_lab_addresses_stay_inside() -> None:
    with NetnsLab.create(["router", "eu-1"]) as lab:
        assert lab.addr("router") != LAB_ADDR and lab.addr("router").startswith("10.213.0.")
        assert lab.exec_prefix("eu-1")[:3] == ["ip", "netns", "exec"]
        out = subprocess.run([*lab.exec_prefix("eu-1"), "ip", "route", "show", "default"], capture_output=True,
                             text=True, check=True).stdout
        assert out.strip() == ""


@pytest.mark.integration
async def test_netns_drill_with_a_partition_and_a_blackhole_leaves_nothing_behind(tmp_path: Path) -> None:
    from workbench.run.drill import run_drill
    from workbench.spec.scenario import Scenario

    before = _here()
    scenario = Scenario.build(name="t-netns", duration_s=10.0, route="check", load_rps=60.0, rate=200.0,
                              burst=200.0, faults_backend="netns", partition_at_s=2.0, partition_groups="eu|us,ap",
                              blackhole_region="us", blackhole_at_s=5.0, heal_at_s=7.5, seed=11)
    result = await run_drill(scenario, tmp_path / "run")
    rec = result.recording
    assert rec.complete
    assert [(f.action, f.target) for f in rec.faults] == [("partition", "eu|us,ap"), ("blackhole", "us"),
                                                          ("heal", "")]
    assert all(f.detail["backend"] == "netns" for f in rec.faults)
    # the nodes really listened on namespace addresses, not on loopback
    own = (tmp_path / "run" / "cluster" / "cluster-eu-1.toml").read_text()
    assert 'host = "10.213.0.' in own
    blackhole, heal = rec.faults[1], rec.faults[2]
    during = [r for r in rec.requests if blackhole.t_s <= r.start_s < heal.t_s]
    others = [r for r in during if r.home_region != "us"]
    assert others and all(r.status in (200, 429) for r in others), [(r.status, r.error) for r in others][:5]
    assert not [r for r in during if r.answered_region == "us"], "a blackholed node answered"
    assert any(r.answered_region == "us" for r in rec.requests if r.start_s >= heal.t_s)
    assert _ours() == []
    assert _here() == before


@pytest.mark.integration
async def test_a_netns_cluster_that_fails_to_start_deletes_its_namespaces(tmp_path: Path) -> None:
    from workbench.run.cluster import Cluster, ClusterError
    from workbench.spec.scenario import Scenario

    before = _here()
    scenario = Scenario.build(name="t-netns-fail", duration_s=5.0, regions=2, faults_backend="netns")
    with pytest.raises(ClusterError, match="not ready"):
        async with Cluster.launch(scenario, tmp_path / "cluster", ready_timeout_s=0.01):
            pass
    assert _ours() == []
    assert _here() == before


def _start_cli_drill(tmp_path: Path) -> subprocess.Popen[bytes]:
    repo = Path(__file__).resolve().parents[2]
    return subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "drill", "--quiet", "--faults-backend", "netns", "--duration-s", "30",
         "--route", "check", "--load-rps", "20", "--out", str(tmp_path / "run")],
        cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=interruptible)


def _wait_running(proc: subprocess.Popen[bytes], tmp_path: Path, timeout_s: float = 40.0) -> list[str]:
    """Until the drill's lab exists and its router has started; the lab's namespaces."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        names = [n for n in lab_namespaces() if n.startswith(f"wbn{proc.pid}x")]
        if names and (tmp_path / "run" / "cluster" / "router.log").exists():
            time.sleep(1.0)
            return names
        time.sleep(0.1)
    raise AssertionError("the drill did not start")


@pytest.mark.integration
def test_ctrl_c_of_a_netns_drill_deletes_its_namespaces(tmp_path: Path) -> None:
    before = _here()
    proc = _start_cli_drill(tmp_path)
    try:
        assert _wait_running(proc, tmp_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [n for n in lab_namespaces() if n.startswith(f"wbn{proc.pid}x")] == []
    assert _here() == before


@pytest.mark.integration
def test_the_lab_of_a_killed_drill_is_deleted_by_the_next_lab(tmp_path: Path) -> None:
    proc = _start_cli_drill(tmp_path)
    try:
        left = _wait_running(proc, tmp_path)
        proc.kill()  # kill -9: no cleanup of its own can run
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert set(left) <= set(lab_namespaces())  # what a kill -9 leaves ...
        with NetnsLab.create(["a"]):
            pass
        assert not set(left) & set(lab_namespaces())  # ... the next lab deletes
    finally:
        for name in left:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


async def test_a_proxied_link_lives_in_its_source_namespace_and_takes_the_kernel_cuts() -> None:
    from workbench.run.faults.proxy import FaultProxy

    loop = asyncio.get_running_loop()
    with NetnsLab.create(["a", "b"]) as lab:
        listening = lab.socket_in("b")
        listening.bind((lab.addr("b"), 0))
        listening.listen()
        listening.setblocking(False)
        server = await asyncio.start_server(echo_handler, sock=listening)
        proxy = FaultProxy("127.0.0.1", 0, lab.addr("b"), listening.getsockname()[1], "a->b",
                           make_socket=lambda: lab.socket_in("a"))
        await proxy.start()
        try:
            client = lab.socket_in("a")  # the proxy listens on a's own loopback, as a node's peers do
            client.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(client, ("127.0.0.1", proxy.port)), 5)
            await loop.sock_sendall(client, b"one")
            assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"one"

            proxy.set_latency(20)  # latency still comes from the proxy
            await loop.sock_sendall(client, b"two")
            assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"two"
            assert proxy.delayed_chunks > 0
            proxy.set_latency(0)

            await lab.cut([("a", "b")])  # the proxy's upstream leaves from a's namespace: the cut applies
            await loop.sock_sendall(client, b"three")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(loop.sock_recv(client, 16), 1.0)
            await lab.heal()
            assert await asyncio.wait_for(loop.sock_recv(client, 16), 10) == b"three"
            assert proxy.resets == 0
            client.close()
        finally:
            await proxy.stop()
            server.close()
            await server.wait_closed()
    assert _ours() == []


