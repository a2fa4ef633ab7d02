"""Bad HTTP input against a real node: every refusal is a 4xx JSON error naming the field, the node
stays healthy, answers no 5xx, and a refused request grants nothing (the audit trail does not move)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from procs import API_KEY, ClusterProcs, Response, metric_value, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CHECK = "/v1/limits/check"
INVOKE = "/v1/skills/rating/invoke"
JSON_CT = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {API_KEY}", **JSON_CT}


def _raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _audit_mark(cluster: ClusterProcs) -> tuple[int, int]:
    st = cluster.state("eu-1")
    return st["audit_last_seq"], st["audit_total_cost"]


def _server_errors(cluster: ClusterProcs) -> float:
    text = cluster.metrics("eu-1")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("edge_requests_total{") and 'status="5' in line)


@pytest.fixture
def node(one_node: ClusterProcs) -> Iterator[ClusterProcs]:
    """The shared node; after each test: still healthy, and the test caused no 5xx answer."""
    errors = _server_errors(one_node)
    yield one_node
    r = request(one_node.url("eu-1"), "GET", "/healthz")
    assert r.status == 200 and r.json()["status"] == "ok"
    assert _server_errors(one_node) == errors, one_node.log_tail("eu-1")


def refused(cluster: ClusterProcs, status: int, field: str | None, method: str, path: str, *,
            body: Any = None, headers: dict[str, str] | None = None) -> Response:
    """Send one request that must be refused with ``status`` naming ``field``, granting nothing."""
    before = _audit_mark(cluster)
    r = request(cluster.url("eu-1"), method, path, body=body, headers=headers)
    assert r.status == status, (r.status, r.body)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    err = r.error
    assert err["field"] == field, err
    assert r.headers.get("x-edge-node") == "eu-1" and r.headers.get("x-edge-region") == "eu"
    assert _audit_mark(cluster) == before, "a refused request was granted tokens"
    return r


# ------------------------------------------------------------------------ bodies, both routes

BAD_BODIES: list[tuple[str, bytes, str | None]] = [
    ("malformed", b'{"key": ', None),
    ("trailing-garbage", b'{"key": "k"} x', None),
    ("empty", b"", None),
    ("not-utf8", b'{"key": "\xff\xfe"}', None),
    ("deeply-nested", b"[" * 50_000, None),
    ("array", b'[{"key": "k"}]', None),
    ("string", b'"k"', None),
    ("number", b"42", None),
    ("null", b"null", None),
    ("cost-string", _raw({"key": "k", "cost": "1"}), "cost"),
    ("cost-true", _raw({"key": "k", "cost": True}), "cost"),
    ("cost-false", _raw({"key": "k", "cost": False}), "cost"),
    ("cost-1.5", _raw({"key": "k", "cost": 1.5}), "cost"),
    ("cost-list", _raw({"key": "k", "cost": [1]}), "cost"),
    ("cost-object", _raw({"key": "k", "cost": {"n": 1}}), "cost"),
    ("cost-null", _raw({"key": "k", "cost": None}), "cost"),
    ("cost-NaN", b'{"key": "k", "cost": NaN}', "cost"),
    ("cost-Infinity", b'{"key": "k", "cost": Infinity}', "cost"),
    ("cost-1e400", b'{"key": "k", "cost": 1e400}', "cost"),
    ("cost-0", _raw({"key": "k", "cost": 0}), "cost"),
    ("cost-negative", _raw({"key": "k", "cost": -1}), "cost"),
    ("cost-over-max", _raw({"key": "k", "cost": 1_000_001}), "cost"),
    ("cost-huge", _raw({"key": "k", "cost": 10**40}), "cost"),
    ("cost-over-burst", _raw({"key": "k", "cost": 1001}), "cost"),
]

BAD_KEYS: list[tuple[str, bytes]] = [
    ("key-int", _raw({"key": 5})),
    ("key-null", _raw({"key": None})),
    ("key-list", _raw({"key": ["a"]})),
    ("key-object", _raw({"key": {"a": 1}})),
    ("key-bool", _raw({"key": True})),
    ("key-missing", _raw({"cost": 1})),
    ("key-empty", _raw({"key": ""})),
    ("key-257-bytes", _raw({"key": "k" * 257})),
    ("key-258-bytes-multibyte", _raw({"key": "é" * 129})),  # 129 characters, 258 bytes
    ("key-lone-surrogate", b'{"key": "\\ud800"}'),
]


@pytest.mark.parametrize(("name", "body", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_check_refuses_bad_body(node: ClusterProcs, name: str, body: bytes, field: str | None) -> None:
    r = refused(node, 400, field, "POST", CHECK, body=body, headers=JSON_CT)
    assert r.error["code"] in {"invalid_json", "invalid_body", "invalid_field"}


@pytest.mark.parametrize(("name", "body"), BAD_KEYS, ids=[c[0] for c in BAD_KEYS])
def test_check_refuses_bad_key(node: ClusterProcs, name: str, body: bytes) -> None:
    refused(node, 400, "key", "POST", CHECK, body=body, headers=JSON_CT)


@pytest.mark.parametrize(("name", "body", "field"),
                         [c for c in BAD_BODIES if c[0] != "cost-over-burst"],
                         ids=[c[0] for c in BAD_BODIES if c[0] != "cost-over-burst"])
def test_invoke_refuses_bad_body(node: ClusterProcs, name: str, body: bytes, field: str | None) -> None:
    refused(node, 400, field, "POST", INVOKE, body=body, headers=AUTH)


def test_invoke_cost_over_burst_of_tenant(node: ClusterProcs) -> None:
    refused(node, 400, "cost", "POST", INVOKE, body=_raw({"cost": 1001}), headers=AUTH)


def test_key_of_exactly_256_bytes_is_allowed_and_granted(node: ClusterProcs) -> None:
    key = "é" * 127 + "xy"  # 256 bytes
    assert len(key.encode()) == 256
    seq, total = _audit_mark(node)
    r = request(node.url("eu-1"), "POST", CHECK, json={"key": key, "cost": 2})
    assert r.status == 200 and r.json()["allowed"] is True, r.body
    assert _audit_mark(node) == (seq + 1, total + 2)
    assert node.state("eu-1")["keys"][key]["nodes"]["eu-1"]["count"] == 2


def test_whole_float_cost_and_default_cost(node: ClusterProcs) -> None:
    seq, total = _audit_mark(node)
    assert request(node.url("eu-1"), "POST", CHECK, json={"key": "whole", "cost": 3.0}).status == 200
    assert request(node.url("eu-1"), "POST", CHECK, json={"key": "whole"}).status == 200
    assert _audit_mark(node) == (seq + 2, total + 4)


@pytest.mark.parametrize("path", [CHECK, INVOKE])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_64k_is_413(node: ClusterProcs, path: str, chunked: bool) -> None:
    payload = _raw({"key": "big", "pad": "x" * (64 * 1024)})
    body: Any = iter([payload[i:i + 8192] for i in range(0, len(payload), 8192)]) if chunked else payload
    headers = {**(AUTH if path == INVOKE else JSON_CT)}  # an iterable body goes chunked, no length
    r = refused(node, 413, None, "POST", path, body=body, headers=headers)
    assert r.error["code"] == "body_too_large"


def test_body_of_exactly_64k_is_accepted(node: ClusterProcs) -> None:
    doc = {"key": "edge64", "pad": ""}
    doc["pad"] = "x" * (64 * 1024 - len(_raw(doc)))
    body = _raw(doc)
    assert len(body) == 64 * 1024
    r = request(node.url("eu-1"), "POST", CHECK, body=body, headers=JSON_CT)
    assert r.status == 200, r.body


@pytest.mark.parametrize("path", [CHECK, INVOKE])
def test_chunked_body_under_the_limit_is_read_whole(node: ClusterProcs, path: str) -> None:
    # A body arriving in pieces must be read to its end, not parsed from its first piece.
    payload = _raw({"key": "chunked", "pad": "x" * (60 * 1024)})
    body = iter([payload[i:i + 4096] for i in range(0, len(payload), 4096)])
    r = request(node.url("eu-1"), "POST", path, body=body, headers=AUTH if path == INVOKE else JSON_CT)
    assert r.status == 200, r.body


def _raw_exchange(base_url: str, pieces: list[bytes], pause_s: float, close_early: bool = False) -> bytes:
    """Send ``pieces`` on one connection with a pause between them; return what the node answered."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        for i, piece in enumerate(pieces):
            if i:
                time.sleep(pause_s)
            sock.sendall(piece)
        if close_early:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + _length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_body_arriving_after_the_headers_is_waited_for(node: ClusterProcs) -> None:
    # The usual request brings its body in the same packet; this one sends the headers, pauses, then
    # the body in two pieces: the node must wait for all of it, not parse what came first.
    body = _raw({"key": "slow-body", "cost": 2})
    head = (f"POST {CHECK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    before = _audit_mark(node)
    answer = _raw_exchange(node.url("eu-1"), [head, body[:7], body[7:]], pause_s=0.2)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    doc = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert doc["allowed"] is True
    assert _audit_mark(node) == (before[0] + 1, before[1] + 2)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "chunked-garbage"])
def test_body_cut_short_grants_nothing(node: ClusterProcs, framing: str) -> None:
    # The body promises more than ever comes before the client hangs up: no grant, no 5xx, and the
    # node keeps serving.
    body = _raw({"key": "short-body"})
    if framing == "chunked":
        length_header = "Transfer-Encoding: chunked"
        sent = f"{len(body):x}\r\n".encode() + body + b"\r\n"  # and never the last, empty chunk
    elif framing == "chunked-garbage":
        length_header = "Transfer-Encoding: chunked"
        sent = b"zz\r\n" + body + b"\r\n0\r\n\r\n"  # a chunk size that is not hexadecimal
    else:
        length_header = f"Content-Length: {len(body) + 10}"
        sent = body
    head = (f"POST {CHECK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{length_header}\r\n\r\n").encode()
    before = _audit_mark(node)
    answer = _raw_exchange(node.url("eu-1"), [head, sent], pause_s=0.1, close_early=True)
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert _audit_mark(node) == before


@pytest.mark.parametrize("path", [CHECK, INVOKE])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(node: ClusterProcs, path: str, content_type: str | None) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"} if path == INVOKE else {}
    if content_type:
        headers["Content-Type"] = content_type
    r = refused(node, 415, None, "POST", path, body=_raw({"key": "k"}), headers=headers)
    assert r.error["code"] == "unsupported_media_type"


def test_json_with_charset_is_accepted(node: ClusterProcs) -> None:
    r = request(node.url("eu-1"), "POST", CHECK, body=_raw({"key": "cs"}),
                headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status == 200, r.body


# ------------------------------------------------------------------------ auth, routes, methods


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer ", "Basic a2V5LWFjbWU=", "bearer key-acme",
                                           "Bearer key-unknown", "Bearer key-acme-x"])
def test_invoke_without_valid_api_key_is_401(node: ClusterProcs, authorization: str | None) -> None:
    headers = dict(JSON_CT)
    if authorization is not None:
        headers["Authorization"] = authorization
    r = refused(node, 401, "Authorization", "POST", INVOKE, body=_raw({"text": "hi"}), headers=headers)
    assert r.error["code"] == "unauthorized"
    assert r.headers.get("www-authenticate", "").startswith("Bearer")


def test_unknown_skill_is_404(node: ClusterProcs) -> None:
    r = refused(node, 404, "skill", "POST", "/v1/skills/nope/invoke", body=_raw({}), headers=AUTH)
    assert r.error["code"] == "unknown_skill"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/"), ("GET", "/nope"), ("POST", "/v1/limits"), ("GET", "/v1/skills/rating"),
    ("POST", "/v1/skills//invoke"), ("GET", "/v1/state/extra"), ("GET", "/%ff%fe"),
])
def test_unknown_route_is_404_json(node: ClusterProcs, method: str, path: str) -> None:
    r = refused(node, 404, None, method, path, body=b"{}" if method == "POST" else None, headers=JSON_CT)
    assert r.error["code"] == "not_found"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", CHECK), ("PUT", CHECK), ("DELETE", INVOKE), ("GET", INVOKE), ("POST", "/healthz"),
    ("POST", "/metrics"), ("DELETE", "/v1/state"), ("PUT", "/v1/audit"), ("GET", "/v1/gossip"),
])
def test_wrong_method_is_405_json(node: ClusterProcs, method: str, path: str) -> None:
    r = refused(node, 405, None, method, path, body=b"{}" if method in {"PUT", "POST"} else None,
                headers=JSON_CT)
    assert r.error["code"] == "method_not_allowed"


@pytest.mark.parametrize(("query", "field"), [
    ("after=abc", "after"), ("after=-1", "after"), ("after=1.5", "after"), ("after=", "after"),
    ("limit=x", "limit"), ("limit=-3", "limit"), ("limit=1e3", "limit"), ("after=1&limit=%00", "limit"),
    ("after=" + "9" * 5000, "after"),
])
def test_audit_bad_query_is_400(node: ClusterProcs, query: str, field: str) -> None:
    r = refused(node, 400, field, "GET", f"/v1/audit?{query}")
    assert r.error["code"] == "invalid_query"


def test_audit_past_the_end_is_empty(node: ClusterProcs) -> None:
    r = request(node.url("eu-1"), "GET", "/v1/audit?after=99999999999&limit=5")
    assert r.status == 200 and r.json()["events"] == []


# ------------------------------------------------------------------------ good answers and 429


def test_200s_carry_node_and_region(node: ClusterProcs) -> None:
    for method, path, kwargs in [("GET", "/healthz", {}), ("GET", "/readyz", {}), ("GET", "/metrics", {}),
                                 ("GET", "/v1/state", {}), ("GET", "/v1/audit", {}),
                                 ("POST", CHECK, {"json": {"key": "hdr"}}),
                                 ("POST", INVOKE, {"json": {"text": "hdr"}, "headers": AUTH})]:
        r = request(node.url("eu-1"), method, path, **kwargs)
        assert r.status == 200, (path, r.status, r.body)
        assert r.headers.get("x-edge-node") == "eu-1", path
        assert r.headers.get("x-edge-region") == "eu", path


def test_invoke_200_answers_with_result_and_request_id(node: ClusterProcs) -> None:
    r = request(node.url("eu-1"), "POST", INVOKE, json={"text": "five stars"}, headers={
        **AUTH, "X-Request-Id": "req-abc-1"})
    assert r.status == 200, r.body
    doc = r.json()
    assert doc["request_id"] == "req-abc-1" and doc["node"] == "eu-1" and doc["region"] == "eu"
    assert 1 <= doc["result"]["rating"]["score"] <= 5
    events = node.audit_events("eu-1")
    assert [e["request_id"] for e in events].count("req-abc-1") == 1


def test_invoke_with_lone_surrogate_text_is_answered_not_500(node: ClusterProcs) -> None:
    # Tokens are granted before the skill runs: the skill must not fail on odd but valid JSON.
    r = request(node.url("eu-1"), "POST", INVOKE, body=b'{"text": "\\udcff rating"}', headers=AUTH)
    assert r.status == 200, r.body


def test_check_denial_is_200_with_ratelimit_headers(node: ClusterProcs) -> None:
    url = node.url("eu-1")
    r = request(url, "POST", CHECK, json={"key": "tiny-check", "cost": 5})
    assert r.status == 200 and r.json()["allowed"] is True
    seq = _audit_mark(node)
    r = request(url, "POST", CHECK, json={"key": "tiny-check", "cost": 2})
    doc = r.json()
    assert r.status == 200 and doc["allowed"] is False and doc["retry_after_ms"] >= 1, doc
    assert r.headers["ratelimit-limit"] == "5" and r.headers["ratelimit-remaining"] == "0"
    assert int(r.headers["ratelimit-reset"]) >= 1
    assert _audit_mark(node) == seq


def test_invoke_429_carries_retry_after_and_ratelimit_headers(node: ClusterProcs) -> None:
    url = node.url("eu-1")
    tiny = {"Authorization": "Bearer key-tiny", **JSON_CT}
    granted = 0
    for _ in range(10):  # burst 5, rate 0.5/s: at most 5 (+1 if a token refills) are granted
        r = request(url, "POST", INVOKE, json={"text": "t"}, headers=tiny)
        if r.status == 429:
            break
        assert r.status == 200, r.body
        assert r.headers["ratelimit-limit"] == "5"
        granted += 1
    assert 5 <= granted <= 6
    assert r.status == 429
    err = r.error
    assert err["code"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    assert r.headers["ratelimit-limit"] == "5"
    assert r.headers["ratelimit-remaining"] == "0"
    assert int(r.headers["ratelimit-reset"]) >= 1
    assert r.headers["x-edge-node"] == "eu-1" and r.headers["x-edge-region"] == "eu"
    before = _audit_mark(node)
    r = request(url, "POST", INVOKE, json={"text": "t"}, headers=tiny)
    assert r.status == 429
    assert _audit_mark(node) == before
    assert node.state("eu-1", ["tiny-tenant"])["keys"]["tiny-tenant"]["nodes"]["eu-1"]["count"] == granted


def test_audit_sum_equals_own_count_after_all_of_the_above(node: ClusterProcs) -> None:
    events = node.audit_events("eu-1", page=7)
    st = node.state("eu-1")
    own = sum(k["nodes"].get("eu-1", {}).get("count", 0) for k in st["keys"].values())
    assert sum(e["cost"] for e in events) == own == st["audit_total_cost"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert metric_value(node.metrics("eu-1"), "edge_audit_events_total") == len(events)
