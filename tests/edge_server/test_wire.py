"""Gossip wire format: round trips, and every kind of bad message is refused with its own reason."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_server.wire import (
    ReplayGuard,
    WireError,
    decode_ack,
    decode_delta,
    encode_ack,
    encode_delta,
    sign,
)

SECRET = b"test-secret-123"
counters = st.dictionaries(st.text(min_size=1, max_size=8),
                           st.tuples(st.integers(0, 2**53), st.integers(0, 2**53)), max_size=5)
entries = st.lists(st.tuples(st.text(min_size=1, max_size=40), counters), max_size=20)


@given(entries, st.integers(0, 2**53), st.integers(0, 2**40))
def test_delta_round_trips(items, upto, seq):
    body, signature = encode_delta(SECRET, "n1", 1234, seq, 1000.5, upto, items)
    delta = decode_delta(SECRET, body, signature, max_key_bytes=10_000)
    assert delta.sender == "n1" and delta.boot == 1234 and delta.seq == seq and delta.upto == upto
    assert list(delta.entries) == [(k, dict(c)) for k, c in items]


def test_ack_round_trips():
    body, signature = encode_ack(SECRET, "n2", 99, 42)
    assert decode_ack(SECRET, body, signature) == ("n2", 99, 42)


def _refused(body: bytes, signature: str | None, secret: bytes = SECRET) -> WireError:
    with pytest.raises(WireError) as info:
        decode_delta(secret, body, signature)
    return info.value


def test_unsigned_forged_and_garbled_messages_are_refused():
    body, signature = encode_delta(SECRET, "n1", 1, 1, 0.0, 5, [("k", {"n1": (1, 3)})])
    assert _refused(body, None).reason == "unsigned"
    assert _refused(body, sign(b"wrong-secret", body)).reason == "bad_signature"
    assert _refused(body.replace(b'"k"', b'"x"'), signature).reason == "bad_signature"
    garbled = b"\x00\xffnot json"
    assert _refused(garbled, sign(SECRET, garbled)).reason == "malformed"


@pytest.mark.parametrize("doc, reason", [
    ({"v": 2, "kind": "delta"}, "unsupported_version"),
    ([1, 2, 3], "malformed"),
    ({"v": 1, "kind": "ack"}, "malformed"),
    ({"v": 1, "kind": "delta", "from": "n1", "boot": -1, "seq": 1, "ts": 0, "upto": 1, "entries": []}, "malformed"),
    ({"v": 1, "kind": "delta", "from": "n1", "boot": 1, "seq": 1, "ts": 0, "upto": 1,
      "entries": [["k", {"n1": [1, -5]}]]}, "malformed"),
    ({"v": 1, "kind": "delta", "from": "n1", "boot": 1, "seq": 1, "ts": 0, "upto": 1,
      "entries": [["k", {"n1": [1, 2, 3]}]]}, "malformed"),
    ({"v": 1, "kind": "delta", "from": "n1", "boot": 1, "seq": 1, "ts": 0, "upto": 1,
      "entries": [["", {}]]}, "malformed"),
    ({"v": 1, "kind": "delta", "from": "n1", "boot": 1, "seq": 1, "ts": "x", "upto": 1, "entries": []}, "malformed"),
    ({"v": 1, "kind": "delta", "from": "n1", "boot": True, "seq": 1, "ts": 0, "upto": 1, "entries": []}, "malformed"),
])
def test_wrong_shapes_are_refused(doc, reason):
    body = json.dumps(doc).encode()
    assert _refused(body, sign(SECRET, body)).reason == reason


def test_replay_guard_refuses_old_and_unknown_and_skewed():
    guard = ReplayGuard({"n1"})
    def delta(boot, seq, ts=100.0, sender="n1"):
        body, signature = encode_delta(SECRET, sender, boot, seq, ts, 0, [])
        return decode_delta(SECRET, body, signature)
    guard.check(delta(5, 1), 100.0)
    guard.check(delta(5, 2), 100.0)
    for stale, reason in [(delta(5, 2), "replayed"), (delta(4, 99), "replayed"),
                          (delta(6, 1, ts=200.0), "stale"), (delta(6, 1, sender="zz"), "unknown_peer")]:
        with pytest.raises(WireError) as info:
            guard.check(stale, 100.0)
        assert info.value.reason == reason
    guard.check(delta(6, 1), 100.0)  # a restarted sender (new boot) is accepted


@given(st.binary(min_size=1, max_size=200), st.binary(max_size=2000))
def test_sign_is_hmac_sha256_whatever_keys_came_before(secret: bytes, body: bytes) -> None:
    """``sign`` reuses each key's HMAC state; every signature is still the plain HMAC of that key."""
    import hashlib
    import hmac

    assert sign(secret, body) == hmac.new(secret, body, hashlib.sha256).hexdigest()
    assert sign(SECRET, body) == hmac.new(SECRET, body, hashlib.sha256).hexdigest()
