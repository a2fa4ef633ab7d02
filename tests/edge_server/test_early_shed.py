"""Quick 503s from the raw bytes (edge_server.early_shed): what is answered there and what is left to
aiohttp, the gate's stalled-queue rule, and a real node and a real router process shedding on one
kept-alive connection with the same answer as the normal path.  No timing is asserted."""

from __future__ import annotations

import asyncio
import gc
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_router import REPO, cluster_doc, free_port, to_toml

from edge_server.admission import QUEUE_FULL, QUEUE_STALLED, Gate
from edge_server.early_shed import EarlyShed, shed_answer

pytestmark = pytest.mark.timeout(60)

REQUEST = (b"POST /v1/skills/rating/invoke HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 2\r\n\r\n{}")


def _early(gate: Gate) -> tuple[EarlyShed, list[str]]:
    routes: list[str] = []

    def route_of(path: bytes) -> str | None:
        return "invoke" if path.startswith(b"/v1/skills/") else None

    return EarlyShed(gate, route_of, lambda r: shed_answer("overloaded", "busy", r, {"X-Edge-Node": "n"}),
                     routes.append), routes


def test_a_whole_gated_request_is_answered_only_when_the_gate_would_refuse_it() -> None:
    gate = Gate(limit=1, queue_max=0, queue_timeout_s=0.005)
    early, routes = _early(gate)
    assert early(REQUEST) is None  # a slot is free: the normal path serves it
    assert gate.try_enter()
    answer = early(REQUEST)
    assert answer is not None and answer.startswith(b"HTTP/1.1 503 ")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"\r\nX-Edge-Shed: queue_full" in head and b"\r\nRetry-After: 1" in head and b"X-Edge-Node: n" in head
    assert f"Content-Length: {len(body)}".encode() in head and b'"code": "overloaded"' in body
    assert gate.shed[QUEUE_FULL] == 1 and gate.pressed == 1 and routes == ["invoke"] and early.taken == 1
    assert gate.inflight == 1  # a shed holds no slot


@pytest.mark.parametrize("data", [
    REQUEST[:-1],  # the body is not all there yet
    REQUEST + REQUEST,  # pipelined: answers must keep their order
    REQUEST.replace(b"Content-Length: 2", b"Transfer-Encoding: chunked"),
    REQUEST.replace(b"Host: x", b"Host: x\r\nExpect: 100-continue"),
    REQUEST.replace(b"Host: x", b"Host: x\r\nConnection: close"),
    REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"),
    REQUEST.replace(b"/v1/skills/rating/invoke", b"/metrics"),  # not a gated route
    REQUEST.replace(b"Content-Length: 2", b"Content-Length: two"),
    b"garbage without a request line",
])
def test_anything_but_one_plain_whole_request_is_left_to_aiohttp(data: bytes) -> None:
    gate = Gate(limit=1, queue_max=0, queue_timeout_s=0.005)
    assert gate.try_enter()
    early, routes = _early(gate)
    assert early(data) is None
    assert gate.shed[QUEUE_FULL] == 0 and not routes


async def test_a_queue_whose_waiters_time_out_is_stalled_but_keeps_one_probe() -> None:
    gate = Gate(limit=1, queue_max=100, queue_timeout_s=0.001)
    assert gate.try_enter()
    assert gate.refusal() is None  # a fresh queue takes waiters
    for _ in range(40):  # waiters that all time out: the share that got a slot falls
        assert await gate.enter() is not None
    assert gate.queue_ok < 0.5
    assert gate.refusal() is None  # an empty queue still takes one waiter: the probe
    probe = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    assert gate.queued == 1 and gate.refusal() == QUEUE_STALLED
    assert await gate.enter() == QUEUE_STALLED and gate.shed[QUEUE_STALLED] == 1
    before = gate.queue_ok
    gate.leave()  # the slot goes to the probe, whose success raises the share
    assert await probe is None and gate.queue_ok > before


async def test_an_empty_stalled_queue_lets_through_per_turn_the_free_slots_and_the_last_two_turns_completions() -> None:
    gate = Gate(limit=40, queue_max=100, queue_timeout_s=0.001)
    for _ in range(40):
        assert gate.try_enter()
    for _ in range(40):  # waiters that all time out: the queue is stalled, and empty
        assert await gate.enter() is not None
    assert gate.queue_ok < 0.5 and not gate.queued and gate.refusal() is None
    shed_before = gate.shed[QUEUE_STALLED]
    early, routes = _early(gate)
    early.stale_s = early.share_ttl_s = 3600.0  # every turn here counts, however slow the machine

    def turn() -> int:
        """Ten requests read in one loop turn: how many were let through (the rest are shed here)."""
        answers = [early(REQUEST) for _ in range(10)]
        assert all(a is None or b"X-Edge-Shed: queue_stalled" in a for a in answers)
        return sum(a is None for a in answers)

    assert turn() == 1  # no completion seen yet: one probe
    await asyncio.sleep(0)
    for _ in range(3):  # three requests finish and three new ones take their slots
        gate.leave()
        assert gate.try_enter()
    assert turn() == 3  # the completions of the last two turns: 3 + 0
    await asyncio.sleep(0)
    assert turn() == 3  # 0 + 3
    await asyncio.sleep(0)
    assert turn() == 1  # 0 + 0: one probe again
    assert early.let_through == 8 and early.taken == 32 and len(routes) == 32
    assert gate.shed[QUEUE_STALLED] - shed_before == 32 and gate.inflight == 40 and not gate.queued
    await asyncio.sleep(0)
    gate.leave()
    gate.leave()  # two slots free: every request of a turn sees them, only as many may take them
    assert turn() == 2 + 2  # free slots + completions of the last two turns (2 + 0)
    await asyncio.sleep(0)
    assert turn() == 2 + 2  # (the handlers of those let through have not run: still 2 free) + 0 + 2
    await asyncio.sleep(0)
    # No waiter's outcome for longer than share_ttl_s: the overload has passed, though no waiter came to
    # say so; the queue counts as moving again and nothing is budgeted.
    early.share_ttl_s = 0.0
    assert turn() == 10 and gate.queue_ok >= 0.5
    for _ in range(2):
        assert gate.try_enter()
    gate.queue_ok = 1.0  # a full gate whose queue moves again: every request may wait, none is shed here
    assert turn() == 10


def _post(port: int, path: str, times: int = 3) -> list[tuple[int, dict[str, str], bytes]]:
    """``times`` requests on one kept-alive connection (the early answers must keep it usable)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    for _ in range(times):
        conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json",
                                                        "Authorization": "Bearer key-acme"})
        resp = conn.getresponse()
        out.append((resp.status, dict(resp.getheaders()), resp.read()))
    conn.close()
    return out


def _chunked_then_plain(port: int) -> list[bytes]:
    """One chunked request, then two plain ones, on one connection: the three status lines."""
    plain = REQUEST.replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer key-acme")
    chunked = plain.replace(b"Content-Length: 2\r\n\r\n{}", b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    lines = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for data in (chunked, plain, plain):
            sock.sendall(data)
            lines.append(reader.readline())
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
    return lines


def _metrics(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    return conn.getresponse().read().decode()


def _wait_status(port: int, path: str, method: str, within_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + within_s
    while True:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "did not start"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request(method, path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.parametrize("front", ["node", "router"])
def test_a_full_gate_sheds_from_the_raw_bytes_on_a_kept_alive_connection(tmp_path: Path, front: str) -> None:
    gate = {"max_inflight": 1, "queue_max": 0, "lag_target_ms": 0}
    node_port, router_port = free_port(), free_port()
    doc = cluster_doc({"eu": [("eu-1", node_port)]}, server=gate if front == "node" else None,
                      skill={"median_ms": 6000, "p99_ms": 6000}, **(gate if front == "router" else {}))
    path = tmp_path / "cluster.toml"
    path.write_text(to_toml(doc))
    procs = [subprocess.Popen([sys.executable, "-m", "edge_server", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=REPO)
             for args in (["--cluster", str(path), "--node", "eu-1"],
                          ["router", "--cluster", str(path), "--port", str(router_port)])]
    port = node_port if front == "node" else router_port
    try:
        # (/readyz of a node with one slot says "overloaded" while it answers itself: /healthz)
        _wait_status(node_port, "/healthz" if front == "node" else "/readyz", "GET", 15, procs)
        _wait_status(router_port, "/healthz", "GET", 15, procs)
        held: list[int] = []
        slow = threading.Thread(target=lambda: held.append(_post(port, "/v1/skills/rating/invoke", 1)[0][0]))
        slow.start()  # it holds the one slot for the skill's 6 s, longer than the rest of the test needs
        deadline = time.monotonic() + 10
        while f"{'edge' if front == 'node' else 'router'}_inflight 1.0" not in _metrics(port):
            assert time.monotonic() < deadline, "the slow request never took the slot"
            time.sleep(0.02)
        answers = _post(port, "/v1/skills/rating/invoke")
        # a chunked request is shed by aiohttp's path; the plain ones after it on the same connection
        # come from the raw bytes again (the connection is free once that shed is answered)
        mixed = _chunked_then_plain(port)
        text = _metrics(port)
        slow.join(30)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(5)
    code = "overloaded" if front == "node" else "router_overloaded"
    for status, headers, body in answers:
        assert status == 503 and headers["Retry-After"] == "1" and headers["X-Edge-Shed"] == "queue_full"
        assert json.loads(body)["error"]["code"] == code  # the same body from either path
        if front == "node":
            assert headers["X-Edge-Node"] == "eu-1" and headers["X-Edge-Region"] == "eu"
    prefix = "edge" if front == "node" else "router"
    assert f'{prefix}_overload_shed_total{{reason="queue_full"}} ' in text
    shed = float(text.split(f'{prefix}_overload_shed_total{{reason="queue_full"}} ')[1].split()[0])
    assert shed >= 3
    raw = next(float(line.split()[1]) for line in text.splitlines() if line.startswith(f"{prefix}_shed_raw_total "))
    assert all(line.startswith(b"HTTP/1.1 503 ") for line in mixed)
    # All but the chunked one usually come from the raw bytes; a request that reaches the guard split
    # over two reads takes aiohttp's path instead (the same 503, only dearer), so only "most" is sure.
    assert shed >= 6 and raw >= 3
    assert raw <= shed - 1
    assert held == [200]


def _read_answer(reader: Any) -> tuple[int, bytes]:
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, reader.read(length)


@pytest.mark.integration
def test_a_raw_shed_never_overtakes_a_pipelined_request_aiohttp_still_serves(tmp_path: Path) -> None:
    """healthz and an invoke pipelined in one write, then a plain invoke once healthz is answered: the
    guard's connection is free again (healthz's handler returned) while aiohttp still serves the first
    invoke, so a 503 from the raw bytes would be read as the first invoke's answer."""
    gate = {"max_inflight": 1, "queue_max": 0, "lag_target_ms": 0}
    port = free_port()
    doc = cluster_doc({"eu": [("eu-1", port)]}, server=gate, skill={"median_ms": 400, "p99_ms": 400})
    path = tmp_path / "cluster.toml"
    path.write_text(to_toml(doc))
    proc = subprocess.Popen([sys.executable, "-m", "edge_server", "--cluster", str(path), "--node", "eu-1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    invoke = REQUEST.replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer key-acme")
    try:
        _wait_status(port, "/healthz", "GET", 15, [proc])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + invoke)
            assert _read_answer(reader)[0] == 200
            time.sleep(0.1)  # the first invoke holds the one slot for the skill's 400 ms
            sock.sendall(invoke)
            first, body = _read_answer(reader)
            second, _ = _read_answer(reader)
    finally:
        proc.kill()
        proc.wait(5)
    assert first == 200 and "result" in json.loads(body), (first, body)  # the first invoke's own answer
    assert second in (200, 503)


def test_the_gc_watch_counts_collections_and_their_pauses_in_the_overload_metrics() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from edge_server.gc_watch import GC_WATCH
    from edge_server.overload_metrics import OverloadCollector

    GC_WATCH.install()
    before = GC_WATCH.count[2]
    gc.collect()
    assert GC_WATCH.count[2] == before + 1 and GC_WATCH.total_s[2] > 0 and GC_WATCH.longest_s[2] > 0
    registry = CollectorRegistry()
    registry.register(OverloadCollector("edge", lambda: (None, None)))
    text = generate_latest(registry).decode()
    assert 'edge_gc_collections_total{generation="2"}' in text
    assert 'edge_gc_pause_longest_seconds{generation="2"}' in text
