"""POST /v1/gossip against a real node: anything unsigned, forged, garbled, replayed or absurd is
refused with a specific status, counted in ``edge_gossip_refused_total{reason}``, and never merged.

The node under test is ``eu-1``; ``us-1`` is in the cluster file but never started, so the test can
speak as that peer by signing messages with the cluster secret.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import ClusterProcs, metric_value, request

from edge_server.wire import SIGNATURE_HEADER, WIRE_VERSION, decode_ack, encode_delta, sign

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

GOSSIP = "/v1/gossip"
_seq = itertools.count(1)
BOOT = int(time.time() * 1000)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProcs]:
    with ClusterProcs(tmp_path_factory.mktemp("gossip"), regions=["eu", "us"], absent=["us-1"],
                      rate=100, burst=100, audit={"replicate": False}) as cluster:  # its holder never starts
        yield cluster


def _secret(cluster: ClusterProcs) -> bytes:
    return cluster.secret.encode()


def _doc(**over: Any) -> dict[str, Any]:
    doc = {"v": WIRE_VERSION, "kind": "delta", "from": "us-1", "boot": BOOT, "seq": next(_seq),
           "ts": time.time(), "upto": 1, "entries": [["g-key", {"us-1": [1, 3]}]]}
    doc.update(over)
    return doc


def _post(cluster: ClusterProcs, body: bytes, signature: str | None):
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    return request(cluster.url("eu-1"), "POST", GOSSIP, body=body, headers=headers)


def _view(cluster: ClusterProcs) -> tuple[int, dict[str, Any]]:
    st = cluster.state("eu-1")
    return st["change_seq"], {k: v["nodes"] for k, v in st["keys"].items()}


def assert_refused(cluster: ClusterProcs, body: bytes, signature: str | None, status: int, reason: str) -> None:
    """Send one message; it must be refused with ``status``, counted under ``reason``, not merged."""
    before_view = _view(cluster)
    before = metric_value(cluster.metrics("eu-1"), "edge_gossip_refused_total", reason=reason)
    r = _post(cluster, body, signature)
    assert r.status == status, (r.status, r.body)
    assert r.error["code"] == f"gossip_{reason}", r.body
    assert metric_value(cluster.metrics("eu-1"), "edge_gossip_refused_total", reason=reason) == before + 1
    assert _view(cluster) == before_view, "a refused gossip message was merged"
    assert request(cluster.url("eu-1"), "GET", "/healthz").status == 200


def _signed(cluster: ClusterProcs, doc: Any) -> tuple[bytes, str]:
    body = json.dumps(doc).encode()
    return body, sign(_secret(cluster), body)


def test_valid_message_is_merged_and_acked(node: ClusterProcs) -> None:
    secret = _secret(node)
    body, sig = encode_delta(secret, "us-1", BOOT, next(_seq), time.time(), 7, [("merge-me", {"us-1": (5, 4)})])
    r = _post(node, body, sig)
    assert r.status == 200, r.body
    sender, _boot, acked = decode_ack(secret, r.body, r.headers.get(SIGNATURE_HEADER.lower()))
    assert sender == "eu-1" and acked == 7
    assert node.state("eu-1", ["merge-me"])["keys"]["merge-me"]["nodes"]["us-1"] == {"gen": 5, "count": 4}


def test_large_valid_delta_is_merged_whole(node: ClusterProcs) -> None:
    # ~150 KB: arrives in several reads; it must be verified and merged whole, not refused.
    entries = [(f"bulk-{i:05d}", {"us-1": (1, 1 + i % 7)}) for i in range(4000)]
    body, sig = encode_delta(_secret(node), "us-1", BOOT, next(_seq), time.time(), 9, entries)
    assert len(body) > 100_000
    r = _post(node, body, sig)
    assert r.status == 200, r.body
    st = node.state("eu-1", ["bulk-00000", "bulk-03999"])["keys"]
    assert st["bulk-03999"]["nodes"]["us-1"]["count"] == 1 + 3999 % 7 and "bulk-00000" in st


def test_unsigned_is_401(node: ClusterProcs) -> None:
    body, _sig = _signed(node, _doc())
    assert_refused(node, body, None, 401, "unsigned")
    assert_refused(node, body, "", 401, "unsigned")


@pytest.mark.parametrize("forge", ["other-secret", "garbage", "truncated", "uppercase", "other-body"])
def test_forged_signature_is_401(node: ClusterProcs, forge: str) -> None:
    body, sig = _signed(node, _doc())
    forged = {
        "other-secret": sign(b"not-the-cluster-secret", body),
        "garbage": "zz" * 32,
        "truncated": sig[:-2],
        "uppercase": sig.upper(),
        "other-body": sign(_secret(node), body + b" "),
    }[forge]
    assert_refused(node, body, forged, 401, "bad_signature")


@pytest.mark.parametrize("body", [b"\x00\xff\xfe garbled", b"{not json", b"", b"[" * 50_000, b'"a string"',
                                  b"[1, 2, 3]", b"null"],
                         ids=["binary", "bad-json", "empty", "deeply-nested", "string", "array", "null"])
def test_garbled_bytes_with_valid_signature_is_400(node: ClusterProcs, body: bytes) -> None:
    assert_refused(node, body, sign(_secret(node), body), 400, "malformed")


@pytest.mark.parametrize("version", [0, 2, 99, "1", None, 1.5])
def test_unknown_version_is_refused(node: ClusterProcs, version: Any) -> None:
    body, sig = _signed(node, _doc(v=version))
    assert_refused(node, body, sig, 400, "unsupported_version")


@pytest.mark.parametrize("sender", ["zz-9", "eu-1", "US-1"])
def test_unknown_peer_is_refused(node: ClusterProcs, sender: str) -> None:
    body, sig = _signed(node, _doc(**{"from": sender}))
    assert_refused(node, body, sig, 401, "unknown_peer")


def test_replayed_message_is_409_and_not_merged_twice(node: ClusterProcs) -> None:
    secret = _secret(node)
    seq = next(_seq)
    body, sig = encode_delta(secret, "us-1", BOOT, seq, time.time(), 3, [("replay-key", {"us-1": (9, 2)})])
    first = _post(node, body, sig)
    assert first.status == 200, first.body
    assert node.state("eu-1", ["replay-key"])["keys"]["replay-key"]["nodes"]["us-1"]["count"] == 2
    assert_refused(node, body, sig, 409, "replayed")
    # An older (boot, seq) signed afresh is a replay too, and so is an older boot.
    old, old_sig = encode_delta(secret, "us-1", BOOT, seq - 1, time.time(), 3, [("replay-key", {"us-1": (9, 50)})])
    assert_refused(node, old, old_sig, 409, "replayed")
    older_boot, ob_sig = encode_delta(secret, "us-1", BOOT - 1, 10**6, time.time(), 3,
                                      [("replay-key", {"us-1": (9, 60)})])
    assert_refused(node, older_boot, ob_sig, 409, "replayed")
    assert node.state("eu-1", ["replay-key"])["keys"]["replay-key"]["nodes"]["us-1"]["count"] == 2


@pytest.mark.parametrize("skew", [-3600, 3600])
def test_message_from_far_past_or_future_is_refused(node: ClusterProcs, skew: float) -> None:
    body, sig = _signed(node, _doc(ts=time.time() + skew))
    assert_refused(node, body, sig, 400, "stale")


ABSURD: dict[str, dict[str, Any]] = {
    "negative-count": {"entries": [["k", {"us-1": [1, -5]}]]},
    "negative-gen": {"entries": [["k", {"us-1": [-1, 5]}]]},
    "count-string": {"entries": [["k", {"us-1": [1, "5"]}]]},
    "count-float": {"entries": [["k", {"us-1": [1, 2.5]}]]},
    "count-bool": {"entries": [["k", {"us-1": [1, True]}]]},
    "count-null": {"entries": [["k", {"us-1": [1, None]}]]},
    "pair-too-long": {"entries": [["k", {"us-1": [1, 2, 3]}]]},
    "pair-is-object": {"entries": [["k", {"us-1": {"gen": 1, "count": 2}}]]},
    "counters-is-list": {"entries": [["k", [["us-1", 1, 2]]]]},
    "entry-is-object": {"entries": [{"key": "k", "us-1": [1, 2]}]},
    "entry-too-short": {"entries": [["k"]]},
    "key-not-string": {"entries": [[7, {"us-1": [1, 2]}]]},
    "key-empty": {"entries": [["", {"us-1": [1, 2]}]]},
    "key-too-long": {"entries": [["k" * 257, {"us-1": [1, 2]}]]},
    "entries-not-list": {"entries": {"k": {"us-1": [1, 2]}}},
    "entries-missing": {"entries": None},
    "boot-negative": {"boot": -1},
    "seq-string": {"seq": "7"},
    "upto-float": {"upto": 1.5},
    "ts-string": {"ts": "now"},
    "from-missing": {"from": None},
    "kind-ack": {"kind": "ack"},
    # The first entry is fine, the second is not: the message is refused whole, nothing merged.
    "good-then-bad": {"entries": [["half", {"us-1": [1, 2]}], ["k", {"us-1": [1, -1]}]]},
}


@pytest.mark.parametrize("name", list(ABSURD))
def test_absurd_entries_are_refused(node: ClusterProcs, name: str) -> None:
    body, sig = _signed(node, _doc(**ABSURD[name]))
    assert_refused(node, body, sig, 400, "malformed")


def test_lone_surrogate_key_is_refused(node: ClusterProcs) -> None:
    raw = json.dumps(_doc(entries=[["KEY", {"us-1": [1, 2]}]])).replace('"KEY"', '"\\ud800"').encode()
    assert_refused(node, raw, sign(_secret(node), raw), 400, "malformed")


@pytest.mark.parametrize("ghost", ["zz-9", "", "ap-1"])
def test_entry_for_a_node_outside_the_cluster_is_refused(node: ClusterProcs, ghost: str) -> None:
    # Signed by a real peer, but it names a node the cluster does not have: merging it would count
    # phantom consumption against the key for ever.
    body, sig = _signed(node, _doc(entries=[["ghost", {"us-1": [1, 1], ghost: [1, 40]}]]))
    assert_refused(node, body, sig, 400, "unknown_node")


def test_oversized_gossip_is_refused_without_crashing(node: ClusterProcs) -> None:
    body = b'{"v":1,"pad":"' + b"x" * (33 * 1024 * 1024) + b'"}'
    r = _post(node, body, sign(_secret(node), body))
    assert 400 <= r.status < 500, r.status
    assert request(node.url("eu-1"), "GET", "/healthz").status == 200


def test_node_keeps_deciding_after_all_of_the_above(node: ClusterProcs) -> None:
    r = request(node.url("eu-1"), "POST", "/v1/limits/check", json={"key": "after-gossip-abuse"})
    assert r.status == 200 and r.json()["allowed"] is True
    text = node.metrics("eu-1")
    assert metric_value(text, "edge_gossip_messages_total", direction="received", outcome="ok") >= 2
    assert not any('status="5' in line for line in text.splitlines() if line.startswith("edge_requests_total"))
    err = Path(node.nodes["eu-1"].logs[1]).read_text()
    assert "Traceback" not in err
