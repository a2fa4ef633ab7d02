"""Forged and replayed incarnations: a message that claims a newer incarnation of a node must not
fence it, burn its rights or win a lease, and what is refused is counted, never merged.

Wire rules first, then a node's :class:`StrictGossiper` in process (its real voter, table, guard and
metrics; its clock moved by hand, no sockets), which also saves and restores its voter's ledger.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest
from prometheus_client import CollectorRegistry

from edge_server.config import parse_cluster
from edge_server.strict.lease import Grant, LeaseRequest
from edge_server.strict.rights import ActorRights
from edge_server.strict.wire import INCARNATION_AHEAD_MS, SeqGuard, decode, encode
from edge_server.strict_gossip import StrictGossiper, ledger_path
from edge_server.wire import WireError

SECRET = b"s3cret-s3cret"
NODES = ["a1", "b1"]
VOTERS = ["va", "vb", "vc"]


def refused_reason(kind: str, sender: str, body: object, **kw: object) -> str:
    data, sig = encode(SECRET, kind, sender, 1, body)
    with pytest.raises(WireError) as err:
        decode(SECRET, data, sig, nodes=NODES, voters=VOTERS, **kw)  # type: ignore[arg-type]
    return err.value.reason


def test_a_message_speaking_for_another_incarnation_or_voter_is_refused() -> None:
    assert refused_reason("lease_request", "a1#1", LeaseRequest("va", "a1", 9, 1, 1.0)) == "wrong_sender"
    assert refused_reason("grant", "va", Grant("vb", "a1", 1, 1, 1, 2, 3, 0.5)) == "wrong_sender"


def test_an_incarnation_far_ahead_of_the_wall_clock_is_refused_wherever_it_appears() -> None:
    now_ms = 1_800_000_000_000
    limit = now_ms + INCARNATION_AHEAD_MS
    far = f"a1#{limit + 1}"
    kw = {"max_incarnation": limit}
    assert refused_reason("strict_ack", far, 1, **kw) == "future_incarnation"
    relayed = (1, [("k", {"b1#5": ActorRights(), far: ActorRights(minted=5.0)})])
    assert refused_reason("strict_delta", "b1#5", relayed, **kw) == "future_incarnation"
    gift = (1, [("k", {"b1#5": ActorRights(minted=5.0, sent={far: (5.0, 1.0)})})])
    assert refused_reason("strict_delta", "b1#5", gift, **kw) == "future_incarnation"
    acked = (1, [("k", {"b1#5": ActorRights(accepted={far: 5.0})})])
    assert refused_reason("strict_delta", "b1#5", acked, **kw) == "future_incarnation"
    assert refused_reason("grant", "va", Grant("va", "a1", limit + 1, 1, 1, 2, 3, 0.5), **kw) \
        == "future_incarnation"
    ok = decode(SECRET, *encode(SECRET, "strict_ack", f"a1#{limit}", 1, 1), nodes=NODES, max_incarnation=limit)
    assert ok.sender == f"a1#{limit}"  # a day ahead is still accepted (a time-zone mistake)


def test_the_guard_keeps_a_few_incarnations_per_node_and_refuses_older_ones() -> None:
    guard = SeqGuard(incarnations=2)

    def ack(actor: str, seq: int) -> None:
        guard.check(decode(SECRET, *encode(SECRET, "strict_ack", actor, seq, 1)))

    ack("a1#5", 1)
    ack("a1#9", 1)  # claims a newer incarnation
    ack("a1#5", 2)  # the live a1#5 goes on
    ack("a1#12", 1)  # a third: a1#5, the oldest, is no longer tracked ...
    with pytest.raises(WireError) as err:
        ack("a1#5", 3)  # ... and an incarnation older than every one tracked is refused
    assert err.value.reason == "replayed" and guard.refused == 1
    ack("b1#1", 1)  # per node


# ------------------------------------------------------------------ a node, in process


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    doc = {"cluster": {"secret": SECRET.decode(), "mode": "strict", "gossip_interval_ms": 20.0,
                       "audit_dir": str(tmp_path / "audit")},
           "regions": [{"name": r, "nodes": [{"id": f"{r}-1", "host": "127.0.0.1", "port": 9000 + i}]}
                       for i, r in enumerate(("eu", "us", "ap"))],
           "limits": [{"pattern": "*", "rate": 10.0, "burst": 10.0}]}
    return parse_cluster(doc, source="c.toml")


def gossiper(config, clock: Clock) -> StrictGossiper:  # type: ignore[no-untyped-def]
    me = next(n for n in config.nodes if n.id == "eu-1")  # hosts voter-eu
    return StrictGossiper(config, me, boot=int(time.time() * 1000), metrics=SimpleNamespace(
        registry=CollectorRegistry()), clock=clock)


def post(g: StrictGossiper, kind: str, sender: str, seq: int, body: object) -> tuple[int, dict]:
    data, sig = encode(SECRET, kind, sender, seq, body)
    return g.handle_batch(orjson.dumps([[data.decode(), sig]]))


def grants_to(g: StrictGossiper, node: str) -> list[Grant]:
    box = g._outbox[node]
    out = [decode(SECRET, d.encode(), s).body for d, s, _kind in box]
    box.clear()
    return [m for m in out if isinstance(m, Grant)]


def refused(g: StrictGossiper, reason: str) -> float:
    value = g.m_refused.labels(reason)._value.get()  # the counter itself, not a scrape
    return float(value)


def test_a_forged_newer_incarnation_fences_nothing_and_is_counted(tmp_path: Path) -> None:
    clock = Clock()
    g = gossiper(cluster(tmp_path), clock)
    clock.t += g.settings.reclaim_s + 0.01  # a first start: the voter waits one reclaim time
    real = int(time.time() * 1000) - 5_000
    forged = real + 3_000  # plausible: a few seconds newer
    us_real, us_forged = f"us-1#{real}", f"us-1#{forged}"

    def renew(actor: str, inc: int, seq: int) -> list[Grant]:
        status, answer = post(g, "lease_request", actor, seq, LeaseRequest("voter-eu", "us-1", inc, seq, 1.0))
        assert status == 200, answer
        return grants_to(g, "us-1")

    assert renew(us_real, real, 1)[0].fraction > 0
    for seq in range(2, 12):
        clock.t += g.settings.renew_s / 2
        (claim,) = renew(us_forged, forged, seq)
        assert claim.fraction == 0 and claim.reason == "old_incarnation_lease"
        assert post(g, "strict_ack", us_forged, 100 + seq, 0)[0] == 200
        clock.t += g.settings.renew_s / 2
        (ours,) = renew(us_real, real, seq)  # never refused as replayed, never fenced
        assert ours.fraction > 0, ours
    assert g.voter is not None and g.voter.incarnations["us-1"] == real
    # replays and impossible incarnations are refused and counted, never handled
    data, sig = encode(SECRET, "lease_request", us_real, 5, LeaseRequest("voter-eu", "us-1", real, 5, 1.0))
    assert g.handle_batch(orjson.dumps([[data.decode(), sig]]))[0] == 409
    far = f"us-1#{99_999_999_999_999}"
    status, answer = post(g, "lease_request", far, 1, LeaseRequest("voter-eu", "us-1", 99_999_999_999_999, 1, 1.0))
    assert status == 400 and answer["refused"] == {"future_incarnation": 1}
    g.round()  # the gauges carry the voter's refusals into the metrics
    assert refused(g, "replayed") == 1 and refused(g, "future_incarnation") == 1
    assert refused(g, "voter_old_incarnation_lease") == 10
    assert g.voter.incarnations["us-1"] == real and grants_to(g, "us-1") == []


def test_the_node_saves_its_voters_ledger_and_restores_it_after_a_restart(tmp_path: Path) -> None:
    config = cluster(tmp_path)
    clock = Clock()
    g = gossiper(config, clock)
    assert g.ledger_start == "none"
    clock.t += g.settings.reclaim_s + 0.01
    inc = int(time.time() * 1000) - 5_000
    post(g, "lease_request", f"us-1#{inc}", 1, LeaseRequest("voter-eu", "us-1", inc, 1, 100.0))
    (grant,) = grants_to(g, "us-1")
    assert grant.fraction > 0
    saved = orjson.loads(ledger_path(config, "voter-eu").read_bytes())  # on disk before the grant left
    assert saved["granted"]["us-1"][1] >= grant.fraction and saved["incarnations"]["us-1"] == inc

    clock2 = Clock()  # the next process: another monotonic origin
    clock2.t = 7.0
    back = gossiper(config, clock2)
    assert back.ledger_start == "restored" and back.voter is not None
    state = back.state()["voter"]
    assert state["started_from"] == "restored" and state["grants_in_s"] == 0.0
    assert state["ledger"]["us-1"] >= grant.fraction and state["incarnations"] == {"us-1": inc}
    # us-1 held the whole capacity: ap-1 gets none of it while us-1 may still be using its lease
    ap = int(time.time() * 1000) - 4_000
    post(back, "lease_request", f"ap-1#{ap}", 1, LeaseRequest("voter-eu", "ap-1", ap, 1, 100.0))
    (none,) = grants_to(back, "ap-1")
    assert none.fraction == 0 and none.reason == "no_headroom"
    clock2.t += back.settings.reclaim_s + 0.01  # us-1 silent since the restart: its share comes back
    post(back, "lease_request", f"ap-1#{ap}", 2, LeaseRequest("voter-eu", "ap-1", ap, 2, 100.0))
    assert grants_to(back, "ap-1")[0].fraction > 0

    ledger_path(config, "voter-eu").write_bytes(b'{"v": 1, "voter": "voter-eu"')  # a torn or garbled file
    torn = gossiper(config, Clock())
    assert torn.ledger_start == "unusable" and torn.state()["voter"]["grants_in_s"] > 0


def test_a_grant_whose_ledger_cannot_be_saved_never_leaves(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = dataclasses.replace(cluster(tmp_path), audit_dir=blocker / "audit")
    clock = Clock()
    g = gossiper(config, clock)
    assert g.ledger_start == "unusable"
    clock.t += g.settings.reclaim_s + 0.01
    inc = int(time.time() * 1000) - 5_000
    post(g, "lease_request", f"us-1#{inc}", 1, LeaseRequest("voter-eu", "us-1", inc, 1, 1.0))
    (grant,) = grants_to(g, "us-1")
    assert grant.fraction == 0 and grant.reason == "ledger_unwritable"
    assert g.m_ledger_writes.labels("failed")._value.get() >= 1
