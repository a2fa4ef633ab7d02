"""The raw-bytes check (edge_server.fast_check) answers exactly as aiohttp's handler does.

The same conversations -- granted and denied checks, costs, request ids, errors, a request split over
two writes, pipelined requests, keep-alive reuse, ``Connection: close``, HTTP/1.0 -- go to a node with
``server.fast_check`` on and to one with it off; every answer must match (status, header names in
order, header values but the per-request ones, JSON body), and so must the request metrics, the
decisions and the audit trail.  The framing helper that keeps answers in order is checked on its own.
No timing is asserted."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from procs import ClusterProcs, metric_value, request, wait_until

from edge_server.fast_check import frame

pytestmark = pytest.mark.timeout(60)

H = b"Host: x\r\nContent-Type: application/json\r\n"


def check(body: bytes, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST /v1/limits/check " + version + b"\r\n" + H + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


GRANT = check(b'{"key":"fc-a"}')


# ------------------------------------------------------------------------------------ framing

@pytest.mark.parametrize(("buf", "at"), [
    (GRANT, len(GRANT)),
    (GRANT + GRANT, 2 * len(GRANT)),
    (GRANT + GRANT[:10], len(GRANT)),  # the rest of the second request is still in aiohttp's parser
    (GRANT[:-1], 0),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 34),
    (GRANT.replace(b"Content-Length: 14", b"Transfer-Encoding: chunked"), -1),
    (GRANT.replace(b"Content-Length: 14", b"Content-Length: x"), -1),
    (GRANT.replace(b"\r\nHost: x", b"\r\nContent-Length: 14"), -1),  # two lengths
    (b"GET / HTTP/1.1\nHost: x\n\n", -1),  # bare line feeds: aiohttp's framing may differ from ours
])
def test_frame_finds_the_end_of_the_last_whole_request(buf: bytes, at: int) -> None:
    assert frame(buf) == at


# ------------------------------------------------------------------------------- two real nodes

def _read_answer(reader) -> tuple[int, list[tuple[str, str]], bytes] | None:
    line = reader.readline()
    if not line:
        return None
    status = int(line.split()[1])
    headers = []
    length = 0
    while (h := reader.readline()) not in (b"\r\n", b""):
        name, _, value = h.decode("latin-1").partition(":")
        headers.append((name, value.strip()))
        if name.lower() == "content-length":
            length = int(value)
    return status, headers, reader.read(length)


def _talk(port: int, writes: list[bytes], answers: int, pause_s: float = 0.05, warm: bool = False) -> list:
    """Send ``writes`` on one connection (``pause_s`` between them), read ``answers`` answers, then
    whether the server closed the connection.  ``warm``: one check answered first (the first request of
    a connection often reaches aiohttp's path: its handler is not waiting yet), not in the result."""
    out: list = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        if warm:
            sock.sendall(GRANT)
            assert _read_answer(reader) is not None
            time.sleep(0.05)  # aiohttp's handler is back to waiting for a request: the next one is plain bytes
        for i, data in enumerate(writes):
            if i:
                time.sleep(pause_s)
            sock.sendall(data)
        for _ in range(answers):
            out.append(_read_answer(reader))
        sock.settimeout(0.5)
        try:
            out.append(("closed", reader.read(1) == b""))
        except TimeoutError:
            out.append(("closed", False))
    return out


def _seq(n: int) -> list[bytes]:
    """Checks that take and are refused tokens of one key: fc-*'s burst is 5, its refill negligible."""
    return [check(b'{"key":"fc-seq-%d","cost":2}' % n)] * 4


def _ids(n: int) -> list[bytes]:
    """Three plain checks with the request ids my-<n>-0..2: their answers must come back in that order."""
    return [check(b'{"key":"fc-o"}', b"X-Request-Id: my-%d-%d\r\n" % (n, i)) for i in range(3)]


# Each conversation: the writes on one connection and how many answers come back.
CONVERSATIONS: list[tuple[str, list[bytes], int]] = [
    ("keep-alive mix", [
        GRANT,
        check(b'{"key":"fc-b","cost":3}'),
        check(b'{"key":"fc-b","cost":3}'),  # denied: 2 left of 5
        check(b'{"key":"fc-c","cost":1.0,"extra":[1]}', b"X-Request-Id: my-id-1\r\n"),
        check(b'{"cost":1}'),  # missing key
        check(b'{"key":"fc-d"'),  # bad JSON
        check(b'{"key":7}'),
        check(b'{"key":"fc-d","cost":0}'),
        check(b'{"key":"fc-d","cost":99}'),  # over the burst
        check(b'[1]'),
        check(b'{"key":"fc-d"}', b"X-Custom: 1\r\n"),  # an unusual header: aiohttp's path, same answer
        check(b'{"key":"fc-e"}').replace(b"/v1/limits/check", b"/v1/limits/check?x=1"),
        check(b'{"key":"fc-e"}').replace(b"application/json", b"text/plain"),
        GRANT,  # the connection is reused after all of those
    ], 14),
    ("denials", _seq(1), 4),
    ("split over two writes", [GRANT[:40], GRANT[40:], GRANT], 2),
    ("split in the body", [GRANT[:-3], GRANT[-3:]], 1),
    ("pipelined", [GRANT + check(b'{"key":5}') + check(b'{"key":"fc-p","cost":2}') + _ids(1)[0]], 4),
    ("pipelined after a pending grant", [_ids(2)[0], _ids(3)[1] + _ids(4)[2]], 3),
    ("connection close", [check(b'{"key":"fc-cl"}', b"Connection: close\r\n"), GRANT], 1),
    ("two hosts", [check(b'{"key":"fc-2h"}', b"Host: y\r\n"), GRANT], 2),
    ("authorization", [check(b'{"key":"fc-au"}', b"Authorization: Bearer key-acme\r\n"), GRANT], 2),
    ("deadline passed", [check(b'{"key":"fc-dp"}', b"X-Edge-Deadline-Ms: 1000\r\n"), GRANT], 2),
    ("request id with a tab", [check(b'{"key":"fc-t"}', b"X-Request-Id: my-a\tb\r\n"), GRANT], 2),
    ("http 1.0", [check(b'{"key":"fc-10"}', version=b"HTTP/1.0")], 1),
    ("deadline and keep-alive", [check(b'{"key":"fc-dl"}', b"X-Edge-Deadline-Ms: %d\r\nConnection: keep-alive\r\n"
                                       % (int(time.time() * 1000) + 3_600_000))] * 2, 2),
]

VARIABLE_HEADERS = {"Date", "Content-Length", "X-Request-Id", "Retry-After-Ms", "RateLimit-Reset", "X-Edge-Node"}


def _shape(answer) -> object:
    """An answer without its per-request values (request ids, dates, waits that move with the clock)."""
    if not isinstance(answer, tuple) or answer[0] == "closed":
        return answer
    status, headers, body = answer
    try:
        doc = json.loads(body)
    except ValueError:  # aiohttp's own 400 for what its parser refuses (plain text)
        return status, [(k, "<v>" if k in VARIABLE_HEADERS else v) for k, v in headers], body
    if "request_id" in doc:
        doc["request_id"] = doc["request_id"] if doc["request_id"].startswith("my-") else "<id>"
    if doc.get("retry_after_ms"):
        doc["retry_after_ms"] = "<positive>"
    return status, [(k, "<v>" if k in VARIABLE_HEADERS else v) for k, v in headers], doc


def _counts(cluster: ClusterProcs) -> dict[str, float]:
    text = request(cluster.url("eu-1"), "GET", "/metrics").body.decode()
    state = request(cluster.url("eu-1"), "GET", "/v1/state").json()
    route = {"route": "/v1/limits/check"}
    out = {f"requests {s}": metric_value(text, "edge_requests_total", status=str(s), **route)
           for s in (200, 400, 415, 503)}
    out["deadline sheds"] = metric_value(text, "edge_overload_shed_total", reason="deadline")
    out["latency count"] = metric_value(text, "edge_request_seconds_count", **route)
    out["allowed"] = metric_value(text, "edge_decisions_total", decision="allowed")
    out["denied"] = metric_value(text, "edge_decisions_total", decision="denied")
    out["tokens"] = metric_value(text, "edge_tokens_granted_total")
    out["audit events"] = state["audit_last_seq"]
    out["audit cost"] = state["audit_total_cost"]
    out["raw"] = metric_value(text, "edge_checks_raw_total")
    return out


@pytest.mark.integration
def test_the_fast_path_answers_exactly_as_aiohttp_does(tmp_path: Path) -> None:
    answers: dict[bool, dict[str, list]] = {}
    counts: dict[bool, dict[str, float]] = {}
    for fast in (True, False):
        with ClusterProcs(tmp_path / f"fast-{fast}", regions=["eu"], rate=1000, burst=1000,
                          limits=[("fc-*", 0.0001, 5)], server={"fast_check": fast}) as cluster:
            port = cluster.nodes["eu-1"].port
            _talk(port, [GRANT], 1)  # warm-up: starts the adaptive limit (the first gated request's job)
            answers[fast] = {name: [_shape(a) for a in _talk(port, writes, n)] for name, writes, n in CONVERSATIONS}
            counts[fast] = _counts(cluster)
    for name, _writes, _n in CONVERSATIONS:
        for a, b in zip(answers[True][name], answers[False][name], strict=True):
            assert a == b, name
    assert answers[True]["keep-alive mix"][0][0] == 200 and answers[True]["denials"][2][0] == 200
    assert json.loads(json.dumps(answers[True]["denials"][2][2]))["allowed"] is False
    assert answers[True]["connection close"][-1] == ("closed", True)
    assert [a[2]["request_id"] for a in answers[True]["pipelined after a pending grant"][:3]] == [
        "my-2-0", "my-3-1", "my-4-2"]
    raw = counts[True].pop("raw")
    assert counts[False].pop("raw") == 0
    assert counts[True] == counts[False]
    assert raw >= 5  # plain checks on a connection aiohttp is not serving come from the raw bytes


@pytest.mark.integration
def test_strict_mode_checks_take_the_fast_path_with_the_same_decision_call(tmp_path: Path) -> None:
    """Strict mode: the grants depend on where rights are, so the two paths are compared on one node --
    a check with an unusual header (aiohttp's path) beside plain ones (the raw bytes) -- and the counts
    must add up: every answer counted, every grant audited."""
    from test_strict_node import StrictProcs

    sent = 0
    with StrictProcs(tmp_path, rate=100, burst=100) as c:
        wait_until(lambda: c.state("eu-1")["strict"]["lease_valid"], timeout=5.0, what="eu-1's first lease")
        port = c.nodes["eu-1"].port
        plain = check(b'{"key":"fc-strict"}')
        via_aiohttp = check(b'{"key":"fc-strict"}', b"X-Custom: 1\r\n")
        before = _counts_of(c)
        conv = _talk(port, [via_aiohttp, plain, *[plain] * 20, plain * 5], 27)
        sent = 27
        after = _counts_of(c)
    shapes = [_shape(a) for a in conv[:-1]]
    assert all(s[0] == 200 for s in shapes)
    names = {tuple(k for k, _v in s[1]) for s in shapes if s[2]["allowed"]}
    assert len(names) == 1, names  # granted answers have the same headers, from either path
    docs = [s[2] for s in shapes]
    assert all(set(d) >= {"allowed", "remaining", "limit", "retry_after_ms", "request_id"} for d in docs)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["requests 200"] == sent == delta["latency count"]
    granted = sum(d["allowed"] for d in docs)
    assert delta["audit events"] == granted and delta["allowed"] == granted
    assert delta["raw"] >= 1  # plain strict checks come from the raw bytes too


def _counts_of(cluster: ClusterProcs) -> dict[str, float]:
    """:func:`_counts` of eu-1, after the audit writes of the answers already read are counted."""
    time.sleep(0.1)
    return _counts(cluster)


@pytest.mark.integration
def test_bytes_that_come_while_a_fast_answer_waits_for_its_write_are_answered_after_it(tmp_path: Path) -> None:
    """With ``audit_fsync`` a grant waits for an fsync in a thread: the next request (whole, split or
    pipelined) arrives meanwhile and is held; every answer must come back in request order."""
    with ClusterProcs(tmp_path, regions=["eu"], rate=1000, burst=1000, server={"audit_fsync": True}) as cluster:
        port = cluster.nodes["eu-1"].port
        _talk(port, [GRANT], 1)
        reqs = [check(b'{"key":"fc-h"}', b"X-Request-Id: my-h-%d\r\n" % i) for i in range(8)]
        writes = [reqs[0], reqs[1][:30], reqs[1][30:] + reqs[2], reqs[3], reqs[4] + reqs[5][:-2], reqs[5][-2:],
                  reqs[6], reqs[7]]
        got = _talk(port, writes, 8, pause_s=0.0005, warm=True)
        raw = _counts(cluster)["raw"]
    assert [a[0] for a in got[:-1]] == [200] * 8
    assert [json.loads(a[2])["request_id"] for a in got[:-1]] == [f"my-h-{i}" for i in range(8)]
    assert raw >= 1
