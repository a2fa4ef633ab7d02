"""Region outages that give no RST: the proxy's blackhole, a blackholed region in a real drill, a paused
multi-node region, and the parameters' bad input."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workbench.history import FaultRecord
from workbench.run.cluster import Cluster
from workbench.run.faults.mesh import ProxyMesh
from workbench.run.faults.proxy import FaultProxy
from workbench.run.nemesis import Nemesis
from workbench.spec.scenario import FaultAction, Scenario

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]


async def test_blackholed_link_stalls_without_rst_and_flows_after_heal(echo_port: int) -> None:
    async with FaultProxy("127.0.0.1", 0, "127.0.0.1", echo_port, "bh", seed=1) as proxy:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 2)
        writer.write(b"one")
        assert await asyncio.wait_for(reader.readexactly(3), 2) == b"one"

        proxy.partition("blackhole")
        writer.write(b"two")
        await writer.drain()  # the write itself succeeds: nothing tells the sender
        # No RST and no FIN: the read neither fails nor ends, it waits (a reset would raise here).
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(3), 0.5)
        assert not reader.at_eof()
        assert proxy.resets == 0

        proxy.heal()
        assert await asyncio.wait_for(reader.readexactly(3), 2) == b"two"  # held bytes, in order
        writer.write(b"three")
        assert await asyncio.wait_for(reader.readexactly(5), 2) == b"three"
        writer.close()


async def test_connect_into_a_blackholed_region_is_neither_refused_nor_answered(echo_port: int) -> None:
    names = ["router", "eu-1", "us-1", "us-2"]
    links = {(a, b): ("127.0.0.1", echo_port) for a in names for b in names if a != b and b != "router"}
    async with ProxyMesh(links, region_of={"router": "router"}, seed=2) as mesh:
        event = mesh.blackhole("us")
        assert event.action == "blackhole" and event.params["target"] == "us"
        cut = set(event.links)
        # every link to and from the region's nodes, the router's and the one inside the region included
        assert {("router", "us-1"), ("router", "us-2"), ("eu-1", "us-2"), ("us-1", "eu-1"),
                ("us-1", "us-2")} <= cut
        assert ("router", "eu-1") not in cut

        pending = [asyncio.create_task(asyncio.open_connection("127.0.0.1", mesh.port(*lk)))
                   for lk in (("router", "us-1"), ("eu-1", "us-2"))]
        await asyncio.sleep(0.5)
        for task in pending:
            assert not task.done(), "a connect into a blackhole completed or was refused"
        # the rest of the mesh still works
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", mesh.port("router", "eu-1")), 2)
        w.write(b"ok")
        assert await asyncio.wait_for(r.readexactly(2), 2) == b"ok"
        w.close()

        mesh.heal()
        for task in pending:  # the waiting connects complete at their next SYN retransmission
            r, w = await asyncio.wait_for(task, 10)
            w.write(b"back")
            assert await asyncio.wait_for(r.readexactly(4), 2) == b"back"
            w.close()
        assert all(p.resets == 0 for p in mesh.proxies.values())


@pytest.mark.integration
async def test_blackhole_drill_records_the_outage_and_other_regions_keep_being_served(tmp_path: Path) -> None:
    from workbench.run.drill import run_drill

    scenario = Scenario.build(name="t-blackhole", duration_s=10.0, route="check", load_rps=60.0,
                              rate=200.0, burst=200.0, blackhole_region="us", blackhole_at_s=3.0,
                              heal_at_s=6.0, seed=5)
    result = await run_drill(scenario, tmp_path / "run")
    rec = result.recording
    assert rec.complete
    faults = [(f.action, f.target) for f in rec.faults]
    assert faults == [("blackhole", "us"), ("heal", "")]
    blackhole, heal = rec.faults
    assert 3.0 <= blackhole.t_s < heal.t_s and heal.t_s >= 6.0
    assert blackhole.detail["nodes"] == ["us-1"] and blackhole.detail["links"] == 5

    during = [r for r in rec.requests if blackhole.t_s <= r.start_s < heal.t_s]
    others = [r for r in during if r.home_region != "us"]
    assert others, "no request of another region in the outage window"
    failed = [(r.home_region, r.status, r.error) for r in others if r.status not in (200, 429)]
    assert not failed, f"other regions' requests failed during the blackhole: {failed[:5]}"
    assert not [r for r in during if r.answered_region == "us"], "a blackholed node answered"
    # after the heal the region serves again
    assert any(r.answered_region == "us" and r.status == 200 for r in rec.requests if r.start_s >= heal.t_s)
    # Gossip across the cut did not wait for its pushes stuck in the blackhole to time out: the first
    # probe answered after the heal abandoned them (edge_server.gossip), on both sides of the cut.
    gossip = {(m.node, m.labels["direction"], m.labels["outcome"]): m.value
              for m in sorted(rec.metrics, key=lambda m: m.t_s) if m.name == "edge_gossip_messages_total"}
    nodes = ("us-1", "eu-1", "ap-1")
    assert all(gossip.get((node, "probe", "unreachable"), 0) >= 1 for node in nodes), gossip  # probed while cut
    assert sum(gossip.get((node, "probe", "ok"), 0) for node in nodes) >= 1, gossip  # answered after the heal
    assert sum(gossip.get((node, "sent", "lost"), 0) for node in nodes) >= 1, gossip


@pytest.mark.integration
async def test_region_pause_and_blackhole_take_every_node_of_a_multi_node_region(tmp_path: Path) -> None:
    scenario = Scenario.build(name="t-region", duration_s=5.0, regions=2, nodes_per_region=2, seed=7)
    records: list[FaultRecord] = []
    async with Cluster.launch(scenario, tmp_path / "cluster") as cluster:
        nemesis = Nemesis(cluster, time.monotonic(), records.append)
        eu = [cluster.nodes["eu-1"], cluster.nodes["eu-2"]]
        await nemesis.apply(FaultAction(0.0, "pause", target="eu"))
        await asyncio.sleep(0.1)
        assert [psutil.Process(p.pid).status() for p in eu] == [psutil.STATUS_STOPPED] * 2
        assert psutil.Process(cluster.nodes["us-1"].pid).status() != psutil.STATUS_STOPPED
        await nemesis.apply(FaultAction(0.0, "resume", target="eu"))
        await asyncio.sleep(0.1)
        assert all(psutil.Process(p.pid).status() != psutil.STATUS_STOPPED for p in eu)

        await nemesis.apply(FaultAction(0.0, "blackhole", target="eu"))
        assert cluster.mesh is not None
        state = {lk: p.stats()["partition"] for lk, p in cluster.mesh.proxies.items()}
        assert state[("router", "eu-2")] == state[("eu-1", "eu-2")] == state[("us-1", "eu-1")] == "blackhole"
        assert state[("router", "us-1")] is None and state[("us-1", "us-2")] is None
        await nemesis.apply(FaultAction(0.0, "heal"))
        assert all(p.stats()["partition"] is None for p in cluster.mesh.proxies.values())
        # a blackhole with a duration ends by itself, lifting only links no other step holds cut
        await nemesis.run([FaultAction(0.0, "partition", groups=(("us",),)),
                           FaultAction(0.0, "blackhole", target="eu-2", duration_s=0.2)])
        state = {lk: p.stats()["partition"] for lk, p in cluster.mesh.proxies.items()}
        assert state[("router", "eu-2")] is None and state[("eu-1", "eu-2")] is None
        assert state[("eu-1", "us-1")] == state[("eu-2", "us-1")] == "blackhole"  # the partition still holds these
        assert state[("router", "us-1")] is None  # a split between regions spares the router

    assert [(r.action, r.target) for r in records] == [("pause", "eu"), ("resume", "eu"), ("blackhole", "eu"),
                                                       ("heal", ""), ("partition", "us"), ("blackhole", "eu-2"),
                                                       ("end_blackhole", "eu-2")]
    assert records[0].detail["nodes"] == ["eu-1", "eu-2"] and len(records[0].detail["pids"]) == 2
    assert records[2].detail["nodes"] == ["eu-1", "eu-2"]


def _cli(*args: str, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([*(user or []), sys.executable, "-m", "workbench.cli", "drill", "--quiet", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


@pytest.mark.parametrize(("args", "named"), [
    (["--blackhole-at-s", "3", "--blackhole-region", "mars"], "blackhole_region"),
    (["--blackhole-at-s", "3", "--blackhole-region", "router"], "blackhole_region"),
    (["--duration-s", "10", "--blackhole-at-s", "12"], "blackhole_at_s"),
    (["--faults-backend", "tc"], "faults_backend"),
])
def test_bad_blackhole_parameters_exit_2_with_one_line_naming_the_parameter(args: list[str], named: str) -> None:
    done = _cli(*args)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and f"'{named}'" in line, line


def test_netns_backend_without_root_exits_2_naming_faults_backend() -> None:
    user: list[str] = []
    if os.geteuid() == 0:  # run the CLI as nobody: the same check a user without root meets
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and no setpriv to drop privileges")
        user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    done = _cli("--faults-backend", "netns", "--duration-s", "5", user=user)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and "'faults_backend'" in line and "root" in line, line
