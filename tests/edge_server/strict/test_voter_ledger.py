"""The voter's saved ledger: what a restarted voter remembers, and that it never overlaps a grant it
made before -- with its ledger, without it, and when the ledger is garbled.  Also the rule that a
newer incarnation is adopted only once the current one is silent (a claim alone fences nobody)."""

from __future__ import annotations

import copy

import orjson
import pytest

from edge_server.strict.allocator import Accept, Commit, LedgerError, Propose, Voter
from edge_server.strict.lease import LeaseRequest
from edge_server.strict.settings import StrictSettings

S = StrictSettings(alpha=0.2, lease_ms=200, rho=0.01, gossip_interval_ms=20)
VOTERS = ["va", "vb", "vc"]
NODES = ["a1", "b1", "c1"]
CAPACITY = 2 / 3  # quorum 2 of 3 members


def req(node: str, inc: int = 1, rid: int = 1, demand: float = 1.0) -> LeaseRequest:
    return LeaseRequest("va", node, inc, rid, demand)


def save(v: Voter, now: float) -> dict | None:
    """The caller's write-ahead save; the document goes through JSON as it does on disk."""
    doc = v.pending_ledger(now)
    if doc is None:
        return None
    v.saved(doc)
    return orjson.loads(orjson.dumps(doc))


def restore(doc: dict, now: float) -> Voter:
    return Voter.restore(doc, "va", VOTERS, NODES, S, now=now)


def test_a_voter_restarted_from_its_ledger_never_overlaps_what_it_granted() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    big = v.on_request(req("a1", demand=100.0), 0.0)
    assert big.fraction == pytest.approx(CAPACITY)
    doc = save(v, 0.0)
    assert doc is not None and doc["granted"]["a1"][1] >= big.fraction
    # kill -9 at 0.05 s, back at 0.06 s (a new process: its clock says 5.0); how long it was down is unknown
    back = restore(doc, 5.0)
    assert back.restored and back.incarnations == {"a1": 1}
    assert back.ledger(5.0)["a1"] >= big.fraction
    # b1 gets nothing while a1 may still be using its lease: a whole reclaim time from the restart
    assert back.on_request(req("b1", rid=2, demand=100.0), 5.0).reason == "no_headroom"
    assert back.on_request(req("b1", rid=3, demand=100.0), 5.0 + S.reclaim_s - 1e-6).reason == "no_headroom"
    assert sum(back.ledger(5.0 + S.reclaim_s - 1e-6).values()) <= CAPACITY + 1e-9
    assert back.on_request(req("b1", rid=4, demand=100.0), 5.0 + S.reclaim_s + 1e-6).fraction > 0


def test_with_its_ledger_a_voter_grants_its_free_capacity_at_once_without_it_nothing_for_a_reclaim() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    v.on_request(req("a1", demand=1.0), 0.0)
    v.on_request(req("b1", rid=2, demand=1.0), 0.0)  # weights follow demand: b1 gets the rest
    doc = save(v, 0.0)
    assert doc is not None
    back = restore(doc, 3.0)
    free = back.on_request(req("c1", rid=3), 3.0)
    used = sum(back.ledger(3.0).values())
    assert used <= CAPACITY + 1e-9 and free.reason in ("", "no_headroom")
    lost = Voter("va", VOTERS, NODES, S, now=3.0, restarted=True)  # the data directory is gone
    assert not lost.restored
    assert lost.on_request(req("c1", rid=4), 3.0).reason == "epoch_settling"
    assert lost.on_request(req("c1", rid=5), 3.0 + S.reclaim_s - 1e-6).reason == "epoch_settling"
    assert lost.on_request(req("c1", rid=6), 3.0 + S.reclaim_s + 1e-6).fraction > 0
    assert lost.pending_ledger(3.0)["settling"] is True  # a restart during the wait waits again


def test_only_what_a_restart_must_remember_triggers_a_write() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    assert save(v, 0.0) is not None  # the first document
    v.on_request(req("a1", demand=1.0), 0.0)
    first = save(v, 0.0)
    assert first is not None and "a1" in first["granted"] and first["incarnations"] == {"a1": 1}
    for i in range(5):  # steady renewals at the same share: no write
        v.on_request(req("a1", rid=10 + i, demand=1.0), 0.01 * (i + 1))
        assert v.pending_ledger(0.01 * (i + 1)) is None
    v.on_request(req("b1", rid=20), 0.1)  # a new node's grant must be saved before it leaves
    assert save(v, 0.1) is not None
    t = 0.1 + S.reclaim_s + 0.01  # everyone silent: the grants ran out
    assert v.on_request(req("a1", inc=2, rid=30), t).fraction > 0  # a newer incarnation, adopted
    doc = save(v, t)
    assert doc is not None and doc["incarnations"]["a1"] == 2 and doc["granted"]["a1"][0] == 2


def test_an_accepted_proposal_and_an_epochs_wait_survive_a_restart() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    save(v, 0.0)
    out = v.on_message(Propose("vb", 2, ("va", "vb")), 0.1)
    assert out == [("vb", Accept("va", 2, ("va", "vb")))]
    doc = save(v, 0.1)
    assert doc is not None and doc["frozen_for"] == [2, ["va", "vb"]]  # saved before the accept leaves
    back = restore(doc, 1.0)
    assert back.on_request(req("a1"), 1.0).reason == "changing_epoch"  # still no grant in epoch 1
    assert back.on_message(Propose("vc", 2, ("va", "vc")), 1.0) == []  # and no second accept for epoch 2
    # the commit arrives: the voter waits a reclaim time; a restart in the middle waits again
    back.on_message(Commit("vb", 2, ("va", "vb")), 1.1)
    settling = save(back, 1.1)
    assert settling is not None and settling["epoch"] == 2 and settling["settling"] is True
    again = restore(settling, 2.0)
    assert again.epoch == 2 and again.members == ("va", "vb")
    assert again.on_request(req("a1"), 2.0).reason == "epoch_settling"
    assert again.on_request(req("a1", rid=2), 2.0 + S.reclaim_s + 1e-6).fraction > 0


def test_a_restored_voter_still_refuses_an_old_incarnation() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    v.on_request(req("a1", inc=1), 0.0)
    t = S.reclaim_s + 0.01
    assert v.on_request(req("a1", inc=2, rid=2), t).fraction > 0
    back = restore(save(v, t), 9.0)
    # a replay of a1#1's request (or a late one) reaching the restarted voter
    assert back.on_request(req("a1", inc=1, rid=3), 9.0).reason == "old_incarnation"


@pytest.mark.parametrize(("change", "words"), [
    (lambda d: d.update(v=2), "'v'"),
    (lambda d: d.update(voter="vb"), "voter"),
    (lambda d: d.update(voters=["va", "vb"]), "voter"),
    (lambda d: d.update(epoch=-1), "'epoch'"),
    (lambda d: d.update(members=["vz"]), "'members'"),
    (lambda d: d.update(frozen_for=[2]), "'frozen_for'"),
    (lambda d: d.update(settling="no"), "'settling'"),
    (lambda d: d.update(incarnations={"a1": "x"}), "'incarnations'"),
    (lambda d: d.update(granted={"a1": [1, 7.0]}), "'granted'"),
    (lambda d: d.pop("granted"), "'granted'"),
])
def test_a_garbled_or_foreign_ledger_is_refused_naming_the_field(change, words) -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    v.on_request(req("a1"), 0.0)
    doc = copy.deepcopy(save(v, 0.0))
    change(doc)
    with pytest.raises(LedgerError) as err:
        restore(doc, 1.0)
    assert words in str(err.value)
    with pytest.raises(LedgerError):
        restore([], 1.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ a claimed newer incarnation


def test_a_claimed_newer_incarnation_does_not_fence_a_live_node() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    assert v.on_request(req("a1", inc=5), 0.0).fraction > 0
    t, rid = 0.0, 100
    for _ in range(20):  # the real a1#5 renews every renew interval; someone claims a1#6 in between
        t += S.renew_s / 2
        rid += 1
        assert v.on_request(req("a1", inc=6, rid=rid), t).reason == "old_incarnation_lease"
        t += S.renew_s / 2
        rid += 1
        assert v.on_request(req("a1", inc=5, rid=rid), t).fraction > 0  # never fenced
    assert v.incarnations == {"a1": 5} and v.refused["old_incarnation_lease"] == 20
    # a1#5 really died: once it is silent for a reclaim time, a1#6 is adopted and a1#5 refused
    t += S.reclaim_s + 1e-6
    assert v.on_request(req("a1", inc=6, rid=rid + 1), t).fraction > 0
    assert v.on_request(req("a1", inc=5, rid=rid + 2), t).reason == "old_incarnation"


def test_a_refused_old_incarnation_is_still_alive_for_the_rule() -> None:
    """A live node refused for lack of headroom holds no grant, but it is heard: a claim of its newer
    incarnation is still refused."""
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    v.on_request(req("b1", demand=100.0), 0.0)  # b1 takes the whole capacity
    assert v.on_request(req("a1", inc=5, rid=2, demand=1.0), 0.01).reason == "no_headroom"
    assert v.on_request(req("a1", inc=6, rid=3), 0.02).reason == "old_incarnation_lease"
    assert v.incarnations["a1"] == 5


def test_the_saved_shares_round_up_but_never_add_up_to_more_than_the_capacity() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    for i, node in enumerate(NODES):  # equal demand: 2/9 each, which rounds up to 8/32 alone
        v.on_request(req(node, rid=i), 0.0)
    for i, node in enumerate(NODES):
        v.on_request(req(node, rid=10 + i), 0.01)
    doc = save(v, 0.01)
    assert doc is not None
    shares = {n: g[1] for n, g in doc["granted"].items()}
    assert all(shares[n] >= f for n, f in v.ledger(0.01).items())
    assert sum(shares.values()) <= CAPACITY + 1e-9
    assert sum(restore(doc, 1.0).ledger(1.0).values()) <= CAPACITY + 1e-9
