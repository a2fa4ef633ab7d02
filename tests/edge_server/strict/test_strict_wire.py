"""Strict mode's wire format: every kind round-trips; anything not exactly right is refused with a
specific reason (the metric label), never decoded into something that could be merged."""

from __future__ import annotations

import orjson
import pytest

from edge_server.strict.allocator import Accept, Commit, Hello, Propose
from edge_server.strict.lease import Grant, LeaseRequest
from edge_server.strict.rights import ActorRights
from edge_server.strict.wire import STRICT_WIRE_VERSION, SeqGuard, decode, encode
from edge_server.wire import WireError, sign

SECRET = b"s3cret"
NODES = ["a1", "b1"]
VOTERS = ["va", "vb", "vc"]
RIGHTS = ActorRights(minted=12.5, spent=3, burned=0.25, credited=1, sent={"b1#2": (4.0, 17.125)},
                     accepted={"b1#2": 0.5}, want=(99.5, 2.0))


@pytest.mark.parametrize(("kind", "sender", "body"), [
    ("strict_delta", "a1#1", (7, [("k", {"a1#1": RIGHTS, "b1#2": ActorRights()})])),
    ("strict_ack", "b1#2", 7),
    ("lease_request", "a1#1", LeaseRequest("va", "a1", 1, 5, 0.75)),
    ("grant", "va", Grant("va", "a1", 1, 5, 2, 2, 3, 0.5)),
    ("grant", "vb", Grant("vb", "a1", 1, 5, 2, 2, 3, 0.0, "no_headroom")),
    ("hello", "va", Hello("va", 3, ("va", "vb"))),
    ("propose", "va", Propose("va", 4, ("va", "vb", "vc"))),
    ("accept", "vb", Accept("vb", 4, ("va", "vb", "vc"))),
    ("commit", "va", Commit("va", 4, ("va", "vb", "vc"))),
])
def test_every_kind_round_trips(kind: str, sender: str, body: object) -> None:
    data, sig = encode(SECRET, kind, sender, 3, body)
    msg = decode(SECRET, data, sig, nodes=NODES, voters=VOTERS)
    assert (msg.kind, msg.sender, msg.seq, msg.body) == (kind, sender, 3, body)


def signed(doc: object) -> tuple[bytes, str]:
    data = orjson.dumps(doc)
    return data, sign(SECRET, data)


def delta_doc(**over: object) -> dict:
    doc = {"sv": STRICT_WIRE_VERSION, "kind": "strict_delta", "from": "a1#1", "seq": 1,
           "body": {"upto": 1, "entries": [["k", {"a1#1": [1, 0, 0, 0, {}, {}, [0, 0]]}]]}}
    doc.update(over)
    return doc


def reason_of(data: bytes, sig: str | None) -> str:
    with pytest.raises(WireError) as err:
        decode(SECRET, data, sig, nodes=NODES, voters=VOTERS)
    return err.value.reason


def test_the_reference_message_is_accepted() -> None:
    assert decode(SECRET, *signed(delta_doc()), nodes=NODES).kind == "strict_delta"


def test_unsigned_and_forged_messages_are_refused() -> None:
    data, sig = signed(delta_doc())
    assert reason_of(data, None) == "unsigned"
    assert reason_of(data, "0" * 64) == "bad_signature"
    assert reason_of(data.replace(b'"upto":1', b'"upto":9'), sig) == "bad_signature"
    other = sign(b"another cluster", data)
    assert reason_of(data, other) == "bad_signature"


@pytest.mark.parametrize(("doc", "reason"), [
    (delta_doc(sv=2), "unsupported_version"),
    (delta_doc(sv=None), "unsupported_version"),
    (delta_doc(kind="gossip"), "unknown_kind"),
    (delta_doc(seq=-1), "malformed"),
    (delta_doc(seq=True), "malformed"),
    (delta_doc(body=[]), "malformed"),
    (delta_doc(**{"from": "a1"}), "malformed"),
    (delta_doc(**{"from": "zz#1"}), "unknown_node"),
    (delta_doc(body={"upto": 1, "entries": [["k", {"zz#1": [1, 0, 0, 0, {}, {}, [0, 0]]}]]}), "unknown_node"),
    (delta_doc(body={"upto": 1, "entries": [["k", {"a1#1": [1, 0, 0, 0, {"zz#3": [1, 1]}, {}, [0, 0]]}]]}),
     "unknown_node"),
    (delta_doc(body={"upto": 1, "entries": [["k", {"a1#1": [-1, 0, 0, 0, {}, {}, [0, 0]]}]]}), "malformed"),
    (delta_doc(body={"upto": 1, "entries": [["k", {"a1#1": [1, 0, 0]}]]}), "malformed"),
    (delta_doc(body={"upto": 1, "entries": [["", {}]]}), "malformed"),
    (delta_doc(body={"upto": 1, "entries": [["k" * 300, {}]]}), "malformed"),
    (delta_doc(body={"upto": 1, "entries": "k"}), "malformed"),
    ({"sv": 1, "kind": "grant", "from": "vz", "seq": 1, "body": {}}, "unknown_voter"),
    ({"sv": 1, "kind": "grant", "from": "va", "seq": 1,
      "body": {"voter": "va", "node": "a1", "inc": 1, "req": 1, "epoch": 1, "quorum": 2, "members": 3,
               "fraction": 1.5}}, "malformed"),
    ({"sv": 1, "kind": "lease_request", "from": "a1#1", "seq": 1,
      "body": {"voter": "va", "node": "b1", "inc": 1, "req": 1, "demand": 1}}, "wrong_sender"),
    ({"sv": 1, "kind": "hello", "from": "va", "seq": 1, "body": {"epoch": 1, "members": ["vq"]}}, "unknown_voter"),
    ([1, 2], "malformed"),
])
def test_bad_messages_are_refused_with_a_specific_reason(doc: object, reason: str) -> None:
    assert reason_of(*signed(doc)) == reason


def _two_entries(second: list) -> dict:
    """A delta whose first entry names b1#2 as giver and receiver (so the decoder knows that id) and
    whose second entry is ``second``: the entry the decoder's shortcut for known ids takes."""
    first = [1.0, 0.0, 0.0, 1.0, {"b1#2": [1.0, 2.0]}, {"b1#2": 0.5}, [0.0, 0.0]]
    return delta_doc(body={"upto": 1, "entries": [["k", {"a1#1": first}], ["j", {"a1#1": second}]]})


@pytest.mark.parametrize("second", [
    [1.0, 0.0, 0.0, 1.0, {}, {"b1#2": -0.5}, [0.0, 0.0]],
    [1.0, 0.0, 0.0, 1.0, {}, {"b1#2": None}, [0.0, 0.0]],
    [1.0, 0.0, 0.0, 1.0, {"b1#2": [1.0, -2.0]}, {}, [0.0, 0.0]],
    [1.0, 0.0, 0.0, 1.0, {"b1#2": [1.0]}, {}, [0.0, 0.0]],
    [1.0, 0.0, 0.0, 1.0, {"b1#2": "x"}, {}, [0.0, 0.0]],
    [1.0, 0.0, 0.0, 1.0, {}, {"b1#2": True}, [0.0, 0.0]],
])
def test_an_entry_of_known_actors_is_checked_as_fully_as_the_first(second: list) -> None:
    assert reason_of(*signed(_two_entries(second))) == "malformed"


def test_entries_of_known_actors_decode_as_the_first_did() -> None:
    second = [2.0, 1.0, 0.0, 1.5, {"b1#2": [3.0, 4.0]}, {"b1#2": 1.5}, [5.0, 0.25]]
    msg = decode(SECRET, *signed(_two_entries(second)), nodes=NODES)
    rights = msg.body[1][1][1]["a1#1"]
    assert rights == ActorRights(2.0, 1.0, 0.0, 1.5, {"b1#2": (3.0, 4.0)}, {"b1#2": 1.5}, (5.0, 0.25))


def test_bytes_that_are_not_json_are_refused() -> None:
    for data in (b"\xff\xfe", b"{", b"1e999", b"[" * 100_000):
        assert reason_of(data, sign(SECRET, data)) == "malformed"


def test_a_replayed_message_is_refused_and_counted() -> None:
    guard = SeqGuard()
    first = decode(SECRET, *encode(SECRET, "strict_ack", "b1#2", 5, 1))
    guard.check(first)
    with pytest.raises(WireError) as err:
        guard.check(first)
    assert err.value.reason == "replayed" and guard.refused == 1
    guard.check(decode(SECRET, *encode(SECRET, "strict_ack", "b1#3", 1, 1)))  # a new incarnation has its own seq
    # a claim of a newer incarnation fences nobody: b1#2's next message still passes, its replay does not
    guard.check(decode(SECRET, *encode(SECRET, "strict_ack", "b1#2", 9, 1)))
    with pytest.raises(WireError):
        guard.check(first)


def test_a_reordered_message_is_accepted_once_within_the_window() -> None:
    guard = SeqGuard(window=4)

    def msg(seq: int, actor: str = "b1#2"):
        return decode(SECRET, *encode(SECRET, "strict_ack", actor, seq, 1))

    guard.check(msg(5))
    guard.check(msg(3))  # overtaken by 5 in flight: still new
    with pytest.raises(WireError):
        guard.check(msg(3))  # ...but only once
    with pytest.raises(WireError):
        guard.check(msg(5))
    with pytest.raises(WireError):
        guard.check(msg(1))  # older than the window
    guard.check(msg(4))
    assert guard.refused == 3
