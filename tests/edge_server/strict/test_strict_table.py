"""Each safety rule of ``StrictTable`` on its own, in scenarios small enough to read.

The state machine (``test_strict_machine.py``) shows the envelope holds under random schedules;
these show each mechanism does its part even where a random schedule rarely reaches it.
"""

from __future__ import annotations

import pytest

from edge_server.strict.allocator import Voter
from edge_server.strict.rights import ActorRights
from edge_server.strict.settings import StrictSettings
from edge_server.strict.table import StrictTable
from edge_server.token_bucket import CostExceedsBurst, Limit, NoLimitForKey

LIMIT = Limit(100.0, 10.0)
NODES = ["a1", "b1"]


def limit_for(key: str) -> Limit | None:
    return LIMIT if key.startswith("k") else None


def table(node: str, inc: int = 1, *, alpha: float = 1.0, now: float = 0.0, voters=("v",)) -> StrictTable:
    s = StrictSettings(alpha=alpha, lease_ms=200, rho=0.0, gossip_interval_ms=20)
    return StrictTable(node, inc, NODES, voters, limit_for, s, now=now)


def lease_up(t: StrictTable, voter: Voter, now: float) -> None:
    for req in t.lease_requests(now):
        assert t.on_grant(voter.on_request(req, now), now) == ""


def sync(src: StrictTable, dst: StrictTable, now: float) -> None:
    upto, entries = src.delta_for(dst.node_id)
    dst.merge(src.actor, entries, now)
    src.on_ack(dst.actor, upto, now)


def drain(t: StrictTable, now: float, key: str = "k") -> int:
    n = 0
    while (d := t.take(key, 1, now)).allowed:
        assert d.ticket is not None and t.commit(d.ticket, now)
        n += 1
    return n


def demand(t: StrictTable, now: float, n: int = 200) -> None:
    """``n`` requests at once: the pot runs dry and the measured demand jumps above the node's rate."""
    for _ in range(n):
        d = t.take("k", 1, now)
        if d.allowed:
            assert d.ticket is not None and t.commit(d.ticket, now)


def test_admits_only_rights_it_holds_pinned_share_of_the_burst() -> None:
    a = table("a1")  # alpha 1: all pinned, weight 1/2 -> cap B/2 = 5, rate 50/s
    assert drain(a, 0.05) == 0  # nothing minted during the restart ("ghost") window
    assert drain(a, 10.0) == 5  # full pot: half the burst, not the whole
    assert drain(a, 10.03) == 1  # 30 ms at 50/s: 1.5 tokens


def test_bad_requests_are_clear_errors() -> None:
    a = table("a1")
    with pytest.raises(NoLimitForKey):
        a.take("nope", 1, 1.0)
    with pytest.raises(CostExceedsBurst):
        a.take("k", 11, 1.0)
    with pytest.raises(ValueError):
        a.take("k", 0, 1.0)


def test_a_pause_between_take_and_answer_past_the_lease_refuses_the_request() -> None:
    a, v = table("a1", alpha=0.0), Voter("v", ["v"], NODES, StrictSettings(lease_ms=200, rho=0.0), now=0.0)
    lease_up(a, v, 0.0)  # valid until 0.2 on a's clock, from the request's send time
    d = a.take("k", 1, 0.15)
    assert d.allowed and d.ticket is not None and d.ticket.from_floating == 1
    assert not a.commit(d.ticket, 0.25)  # the answer would leave after the lease ended
    assert a.revoked == 1
    d = a.take("k", 1, 0.15)
    assert d.allowed and d.ticket is not None and a.commit(d.ticket, 0.16)
    assert a.phi(0.2) == 0.0 and a.held("k", 0.2) == 0.0  # floating rights burned at expiry


def test_a_committed_take_whose_lease_ended_during_the_audit_write_is_refused_and_stays_spent() -> None:
    a, v = table("a1", alpha=0.0), Voter("v", ["v"], NODES, StrictSettings(lease_ms=200, rho=0.0), now=0.0)
    lease_up(a, v, 0.0)  # valid until 0.2 on a's clock
    d = a.take("k", 1, 0.15)
    assert d.allowed and d.ticket is not None and d.ticket.from_floating == 1
    assert a.commit(d.ticket, 0.15)  # spent; the audit write starts
    spent = a.rights("k")[a.actor].spent
    assert a.confirm(d.ticket, 0.19)  # written within the lease: the answer leaves as allowed
    assert not a.confirm(d.ticket, 0.25)  # written after the lease ended: refused
    assert a.revoked_after_write == 1 and a.rights("k")[a.actor].spent == spent  # still spent
    pinned = table("a1", alpha=1.0)  # pinned rights need no lease: never refused after the write
    d = pinned.take("k", 1, 1.0)
    assert d.allowed and d.ticket is not None and d.ticket.from_floating == 0
    assert pinned.commit(d.ticket, 1.0) and pinned.confirm(d.ticket, 9.0)


def test_a_gift_counts_against_the_giver_until_the_receiver_acknowledges_it() -> None:
    a, b = table("a1"), table("b1")
    assert a.held("k", 1.0) == 5  # a idle and full
    demand(b, 1.0)  # b has demand and runs dry
    b.tick(1.0)
    b.tick(1.02)
    sync(b, a, 1.02)  # a sees b's want
    a.tick(1.02)  # a gives its surplus
    given = 5 - a.held("k", 1.02)
    assert given > 0
    assert a.outstanding("k", 1.02) == pytest.approx(5)  # still counted against a
    assert a.outstanding("k", 1.05) == pytest.approx(5)  # so a does not mint it back
    sync(a, b, 1.05)  # b credits the gift ...
    assert b.held("k", 1.05) > 0
    sync(b, a, 1.05)  # ... and a learns it landed
    assert a.outstanding("k", 1.05) == pytest.approx(5 - given)


def test_a_gift_that_arrives_after_the_transfer_window_is_burned_not_credited() -> None:
    a, b = table("a1"), table("b1")
    demand(b, 1.0)
    b.tick(1.0)
    b.tick(1.02)
    sync(b, a, 1.02)
    a.tick(1.02)
    before = b.held("k", 1.2)
    _upto, entries = a.delta_for("b1")
    b.merge(a.actor, entries, 1.2)  # 180 ms after the want, window is 80 ms
    assert b.refused.get("stale_transfer") == 1
    assert b.held("k", 1.2) == pytest.approx(before)


def test_forged_entries_are_refused_and_counted_never_credited() -> None:
    a, b = table("a1"), table("b1")
    b.held("k", 1.0)
    forged_gift = ActorRights(minted=5, sent={b.actor: (5.0, 999.0)})  # answers a want b never made
    assert b.merge(a.actor, [("k", {a.actor: forged_gift})], 1.0) == 1
    assert b.refused["forged_transfer"] == 1
    assert b.held("k", 1.0) == pytest.approx(5)
    mine = ActorRights(minted=1e6)  # b's own entry, grown by someone else
    assert b.merge(a.actor, [("k", {b.actor: mine})], 1.0) == 1
    assert b.refused["forged_own"] == 1
    assert b.rights("k")[b.actor].minted < 1e6


def test_unknown_keys_and_nodes_are_refused_and_counted() -> None:
    b = table("b1")
    assert b.merge("a1#1", [("nope", {"a1#1": ActorRights(minted=1)})], 1.0) == 1
    assert b.merge("a1#1", [("k", {"zz#1": ActorRights(minted=1)})], 1.0) == 1
    assert b.merge("a1#1", [("k", {"a1#1": ActorRights(sent={"zz#4": (1.0, 1.0)})})], 1.0) == 1
    assert b.merge("zz#1", [], 1.0) == 1
    assert b.refused == {"unknown_key": 1, "unknown_node": 3}
    assert "nope" not in b.keys() and "zz#1" not in b.rights("k")


def test_a_restart_is_a_new_actor_that_starts_empty_and_burns_the_old_rights() -> None:
    old = table("a1", 1)
    assert old.held("k", 5.0) == 5
    new = table("a1", 2, now=5.0)
    new.burn_predecessor("k", old.actor, old.rights("k")[old.actor], 5.0)
    assert new.rights("k")[old.actor].held == 0  # every view will show the old rights gone
    assert drain(new, 5.05) == 0  # ghost window: a late transfer of the old one may still land
    assert drain(new, 5.12) == 2  # 40 ms at 50/s
    with pytest.raises(ValueError):
        new.burn_predecessor("k", "a1#3", ActorRights(), 5.1)


def test_a_lost_data_directory_looks_like_a_fresh_start_and_is_just_as_safe() -> None:
    """Without its data a node cannot tell a restart from a first start; it starts empty either way."""
    first = table("a1", 1)
    restarted_blind = table("a1", 7, now=3.0)
    assert first.held("k", 0.05) == restarted_blind.held("k", 3.05) == 0


def test_transfer_for_a_dead_incarnation_is_never_credited_to_the_new_one() -> None:
    a, b_old = table("a1"), table("b1", 1)
    demand(b_old, 1.0)
    b_old.tick(1.0)
    b_old.tick(1.02)
    sync(b_old, a, 1.02)
    a.tick(1.02)
    assert a.rights("k")[a.actor].sent[b_old.actor][0] > 0  # a gift to the old incarnation is in flight
    _upto, gift = a.delta_for("b1")
    b_new = table("b1", 2, now=1.02)
    b_new.merge(a.actor, gift, 1.03)
    assert b_new.rights("k")[b_new.actor].credited == 0


def test_a_late_message_of_a_dead_incarnation_does_not_reset_what_its_successor_acknowledged() -> None:
    a, b_new = table("a1"), table("b1", 2)
    a.held("k", 1.0)
    a.merge(b_new.actor, [], 1.0)
    upto, entries = a.delta_for("b1")
    assert entries
    a.on_ack(b_new.actor, upto, 1.0)
    assert a.delta_for("b1")[1] == []  # all acknowledged
    a.on_ack("b1#1", 0, 1.01)  # a late ack of the old incarnation
    a.merge("b1#1", [], 1.01)  # and a late delta of it
    assert a.delta_for("b1")[1] == []  # nothing to resend: the successor already has it all
    a.merge("b1#3", [], 1.02)  # a newer incarnation does start from scratch
    assert a.delta_for("b1")[1]


def _always_settled_take(t: StrictTable, key: str, cost: int, now: float):
    """A take that settles first: the reference the no-settle denial must agree with."""
    st = t._keys.get(key) or t._get(key, now)
    t._settle(st, now)
    return t.take(key, cost, now)


@pytest.mark.parametrize("seed", range(5))
def test_a_denial_without_settling_decides_as_a_settled_take_would(seed: int) -> None:
    """``take`` skips the settle of a key that could not hold ``cost`` even at the fastest mint since
    its last settle.  Two tables, one always settled first, see the same takes at the same times
    (random gaps and costs, leases renewed and lapsing): every decision and every admitted total agree."""
    import random

    rng = random.Random(seed)
    voter_a, voter_b = Voter("v", ["v"], NODES, StrictSettings(alpha=0.2, lease_ms=200, rho=0.0), now=0.0), \
        Voter("v", ["v"], NODES, StrictSettings(alpha=0.2, lease_ms=200, rho=0.0), now=0.0)
    fast, ref = table("a1", alpha=0.2), table("a1", alpha=0.2)
    now, admitted = 0.0, [0, 0]
    for _ in range(3000):
        now += rng.choice((0.0, 0.001, 0.004, 0.02, 0.15))
        if rng.random() < 0.05:  # renewals, sometimes late enough for the lease to lapse between them
            lease_up(fast, voter_a, now)
            lease_up(ref, voter_b, now)
        cost = rng.choice((1, 1, 1, 2, 3))
        key = rng.choice(("k1", "k2"))
        d1 = fast.take(key, cost, now)
        d2 = _always_settled_take(ref, key, cost, now)
        assert d1.allowed == d2.allowed, (now, key, cost)
        for t, d, i in ((fast, d1, 0), (ref, d2, 1)):
            if d.allowed:
                assert d.ticket is not None and t.commit(d.ticket, now)
                admitted[i] += cost
    assert admitted[0] == admitted[1] > 0
