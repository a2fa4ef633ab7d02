"""Leases and the voters: fencing, reclaim after L*(1+rho)/(1-rho), incarnations, membership."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.strict.allocator import Voter
from edge_server.strict.lease import Grant, LeaseRequest, NodeLease
from edge_server.strict.settings import StrictSettings, StrictSettingsError

S = StrictSettings(alpha=0.2, lease_ms=200, rho=0.01, gossip_interval_ms=20)
VOTERS = ["va", "vb", "vc"]
NODES = ["a1", "b1", "c1"]


def voters(now: float = 0.0) -> dict[str, Voter]:
    return {v: Voter(v, VOTERS, NODES, S, now=now) for v in VOTERS}


def ask(lease: NodeLease, vs: dict[str, Voter], now: float, demand: float = 1.0, reach=VOTERS) -> list[str]:
    reasons = []
    for req in lease.requests(now, demand):
        if req.voter in reach:
            reasons.append(lease.on_grant(vs[req.voter].on_request(req, now), now))
    return reasons


def test_a_node_reaching_only_a_minority_of_voters_has_no_floating_share() -> None:
    vs = voters()
    lease = NodeLease("a1", 1, VOTERS, S)
    ask(lease, vs, 0.0, reach=["va"])
    assert lease.phi(0.01) == 0.0  # one grant of three: fenced
    ask(lease, vs, 0.06, reach=["va", "vb"])
    assert lease.phi(0.07) > 0.0


def test_a_lease_is_measured_from_the_requests_send_time() -> None:
    vs = voters()
    lease = NodeLease("a1", 1, VOTERS, S)
    reqs = lease.requests(0.0, 1.0)
    grants = [vs[r.voter].on_request(r, 0.0) for r in reqs]
    for g in grants:
        assert lease.on_grant(g, 0.15) == ""  # arrived late: 150 ms after the request left
    assert lease.valid(0.19) and not lease.valid(0.2)  # ends at send + L, not arrival + L
    vs = voters()
    late = NodeLease("b1", 1, VOTERS, S)
    reqs = late.requests(0.0, 1.0)
    assert late.on_grant(vs[reqs[0].voter].on_request(reqs[0], 0.0), 0.25) == "expired"


def test_duplicated_replayed_or_foreign_grants_are_refused_and_counted() -> None:
    vs = voters()
    lease = NodeLease("a1", 1, VOTERS, S)
    req = lease.requests(0.0, 1.0)[0]
    g = vs[req.voter].on_request(req, 0.0)
    assert lease.on_grant(g, 0.0) == ""
    assert lease.on_grant(g, 0.01) == "unknown_or_old_request"  # a duplicate
    other = Grant("va", "a1", 9, req.req_id, 1, 2, 3, 0.5)
    assert lease.on_grant(other, 0.01) == "wrong_incarnation"
    assert lease.on_grant(Grant("vz", "a1", 1, 2, 1, 2, 3, 0.5), 0.01) == "unknown_voter"
    assert lease.refused == {"unknown_or_old_request": 1, "wrong_incarnation": 1, "unknown_voter": 1}


def test_a_voter_never_grants_more_than_quorum_over_members() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    total = 0.0
    for i, node in enumerate(NODES * 3):
        g = v.on_request(LeaseRequest("va", node, 1, i, demand=5.0), 0.01 * i)
        total = sum(v.ledger(0.01 * i).values())
        assert total <= 2 / 3 + 1e-9, (g, total)
    assert total == pytest.approx(2 / 3)


def test_a_dead_nodes_share_is_reclaimed_only_after_L_times_drift_bound() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    big = v.on_request(LeaseRequest("va", "a1", 1, 1, demand=100.0), 0.0)
    assert big.fraction == pytest.approx(2 / 3)  # a1 alone asked: the whole capacity
    small = v.on_request(LeaseRequest("va", "b1", 1, 2, demand=100.0), 0.01)
    assert small.fraction == 0.0 and small.reason == "no_headroom"  # decrease before increase
    reclaim = S.lease_s * (1 + S.rho) / (1 - S.rho)
    assert S.reclaim_s == pytest.approx(reclaim)
    still = v.on_request(LeaseRequest("va", "b1", 1, 3, demand=100.0), reclaim - 1e-6)
    assert still.fraction == 0.0  # a1 might still be using it (its clock may be slow)
    now_free = v.on_request(LeaseRequest("va", "b1", 1, 4, demand=100.0), reclaim + 1e-6)
    assert now_free.fraction == pytest.approx(2 / 3)


def test_a_new_incarnation_waits_for_the_old_lease_and_the_old_one_is_refused() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    assert v.on_request(LeaseRequest("va", "a1", 1, 1, 1.0), 0.0).fraction > 0
    assert v.on_request(LeaseRequest("va", "a1", 2, 2, 1.0), 0.1).reason == "old_incarnation_lease"
    # the old one is silent from 0.0 on: the new one is adopted once its grant ran out ...
    assert v.on_request(LeaseRequest("va", "a1", 2, 4, 1.0), S.reclaim_s + 0.01).fraction > 0
    # ... and from then on the old one is refused
    assert v.on_request(LeaseRequest("va", "a1", 1, 3, 1.0), S.reclaim_s + 0.02).reason == "old_incarnation"


def test_bad_lease_requests_are_refused_with_a_reason() -> None:
    v = Voter("va", VOTERS, NODES, S, now=0.0)
    assert v.on_request(LeaseRequest("va", "zz", 1, 1, 1.0), 0.0).reason == "unknown_node"
    assert v.on_request(LeaseRequest("vb", "a1", 1, 1, 1.0), 0.0).reason == "wrong_voter"
    assert v.on_request(LeaseRequest("va", "a1", 1, 1, float("nan")), 0.0).reason == "bad_demand"
    assert v.refused == {"unknown_node": 1, "wrong_voter": 1, "bad_demand": 1}


def run_voters(vs: dict[str, Voter], now: float, alive: set[str]) -> None:
    """One round of voter messages among ``alive`` voters, delivered until quiet."""
    inbox = [(dst, msg) for vid in sorted(alive) for dst, msg in vs[vid].tick(now)]
    while inbox:
        dst, msg = inbox.pop(0)
        if dst in alive and msg.sender in alive:
            inbox += vs[dst].on_message(msg, now)


def test_the_majority_votes_a_silent_voter_out_and_then_gets_its_capacity() -> None:
    vs = voters()
    t = 0.0
    while t < S.voter_dead_s + 0.1:
        run_voters(vs, t, {"va", "vb"})
        t += 0.05
    assert vs["va"].members == ("va", "vb") and vs["vb"].members == ("va", "vb")
    assert vs["vc"].epoch == 1  # the silent one never learned
    req = LeaseRequest("va", "a1", 1, 1, 1.0)
    assert vs["va"].on_request(req, t).reason == "epoch_settling"  # old-epoch leases may still run
    later = t + S.reclaim_s
    g = vs["va"].on_request(LeaseRequest("va", "a1", 1, 2, 1.0), later)
    assert g.epoch == 2 and g.quorum == 2 and g.fraction == pytest.approx(1.0)
    # the voter that was cut off cannot lease anything alone: its epoch-1 quorum is 2
    lone = vs["vc"].on_request(LeaseRequest("vc", "c1", 1, 3, 1.0), later)
    lease = NodeLease("c1", 1, VOTERS, S)
    lease._sent[3] = later  # the request above, as if sent by this lease
    lease.on_grant(lone, later)
    assert lease.phi(later) == 0.0
    # it comes back: it learns the new epoch, and the members vote it back in
    t = later
    for _ in range(5):
        run_voters(vs, t, set(VOTERS))
        t += 0.05
    assert all(v.members == tuple(VOTERS) and v.epoch == 3 for v in vs.values())


@pytest.mark.parametrize(("field", "value", "key"), [
    ("alpha", -0.1, "alpha"), ("alpha", 1.5, "alpha"), ("lease_ms", 40.0, "lease_ms"),
    ("rho", 0.5, "rho"), ("transfer_window_ms", 500.0, "transfer_window_ms"), ("alpha", "x", "alpha"),
])
def test_bad_settings_name_the_key_and_the_expected_value(field: str, value: object, key: str) -> None:
    with pytest.raises(StrictSettingsError) as err:
        StrictSettings(**{field: value})
    assert err.value.key == key and f"'strict.{key}'" in str(err.value) and "expected" in str(err.value)


def test_a_lease_shorter_than_a_few_gossip_intervals_is_refused() -> None:
    with pytest.raises(StrictSettingsError, match=r"at least 3 gossip intervals \(>= 150 ms\)"):
        StrictSettings(lease_ms=100, gossip_interval_ms=50)


def _phi_by_definition(grants: list[tuple[str, int, float, float, float]], t: float, quorum: int) -> float:
    """``phi(t)`` straight from the module's definition, over every grant ever taken in."""
    by_epoch: dict[int, dict[str, float]] = {}
    for voter, epoch, fraction, start, end in grants:
        if start <= t < end:
            best = by_epoch.setdefault(epoch, {})
            best[voter] = max(best.get(voter, 0.0), fraction)
    for epoch in sorted(by_epoch, reverse=True):
        if len(by_epoch[epoch]) >= quorum:
            return min(1.0, sum(by_epoch[epoch].values()) / quorum)
    return 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 0.15), st.sets(st.sampled_from(VOTERS)), st.integers(1, 2),
                          st.floats(0.05, 0.6), st.floats(0.0, 0.15), st.booleans()), max_size=40))
def test_the_step_function_built_grant_by_grant_and_pruned_is_phi_by_definition(steps: list) -> None:
    """Each grant rebuilds phi only from its arrival on, and a prune cuts history: from the prune's
    horizon on, phi is still what the definition gives over every grant taken in."""
    lease = NodeLease("a1", 1, VOTERS, S)
    taken: list[tuple[str, int, float, float, float]] = []
    now, horizon = 0.0, 0.0
    for wait, answering, epoch, fraction, delay, prune in steps:
        now += wait
        sent = now
        requests = lease.requests(now, 1.0)
        now += delay  # the grants arrive this much later (some after the lease they bring ended)
        for req in requests:
            if req.voter in answering:
                g = Grant(req.voter, "a1", 1, req.req_id, epoch, 2, 3, fraction)
                if lease.on_grant(g, now) == "":
                    taken.append((req.voter, epoch, fraction, now, sent + S.lease_s))
        if prune:
            lease.prune(now, 0.3)
            horizon = now - 0.3
        cuts, _phis = lease.steps()
        for t in {horizon, now, now + 0.01, *cuts, *(c - 1e-6 for c in cuts), now + S.lease_s}:
            if t >= horizon:
                assert lease.phi(t) == pytest.approx(_phi_by_definition(taken, t, 2)), (t, horizon)
