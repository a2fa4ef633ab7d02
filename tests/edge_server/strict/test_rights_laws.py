"""The rights counter is a join semilattice: merge is commutative, associative, idempotent and
monotone, so duplicated, reordered or replayed gossip cannot change what a node ends up with."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from edge_server.strict.rights import ActorRights, actor_id, held, leq, merge_actor, merge_key, split_actor

ACTORS = [actor_id(n, i) for n in ("a1", "b1", "c1") for i in (1, 2)]
nums = st.floats(0, 1e6, allow_nan=False, allow_infinity=False)
pairs = st.tuples(nums, nums)
rights = st.builds(
    ActorRights, minted=nums, spent=nums, burned=nums, credited=nums,
    sent=st.dictionaries(st.sampled_from(ACTORS), pairs, max_size=3),
    accepted=st.dictionaries(st.sampled_from(ACTORS), nums, max_size=3), want=pairs)
key_rights = st.dictionaries(st.sampled_from(ACTORS), rights, max_size=4)
fast = settings(max_examples=200, deadline=None)


@fast
@given(rights, rights)
def test_actor_merge_commutes(a: ActorRights, b: ActorRights) -> None:
    assert merge_actor(a, b) == merge_actor(b, a)


@fast
@given(rights, rights, rights)
def test_actor_merge_associates(a: ActorRights, b: ActorRights, c: ActorRights) -> None:
    assert merge_actor(merge_actor(a, b), c) == merge_actor(a, merge_actor(b, c))


@fast
@given(rights, rights)
def test_actor_merge_is_idempotent_and_an_upper_bound(a: ActorRights, b: ActorRights) -> None:
    m = merge_actor(a, b)
    assert merge_actor(a, a) == a
    assert merge_actor(m, b) == m
    assert leq(a, m) and leq(b, m)


@fast
@given(key_rights, key_rights, key_rights)
def test_key_merge_is_a_semilattice(a: dict, b: dict, c: dict) -> None:
    assert merge_key(a, b) == merge_key(b, a)
    assert merge_key(merge_key(a, b), c) == merge_key(a, merge_key(b, c))
    assert merge_key(a, a) == a


@fast
@given(key_rights, st.lists(st.sampled_from([0, 1, 2]), min_size=1, max_size=12))
def test_any_delivery_order_with_duplicates_converges(base: dict, order: list[int]) -> None:
    """Three states delivered in any order, any number of times, give the same result as once each."""
    parts = [dict(list(base.items())[i::3]) for i in range(3)]
    once = merge_key(merge_key(parts[0], parts[1]), parts[2])
    got: dict = {}
    for i in [*order, 0, 1, 2]:
        got = merge_key(got, parts[i])
    assert got == once


def test_held_is_derived_from_the_counters() -> None:
    r = ActorRights(minted=10, spent=3, burned=1, credited=4, sent={"b1#1": (2.0, 5.0)})
    assert r.held == 10 + 4 - 2 - 3 - 1
    assert held({"a1#1": r, "b1#1": ActorRights(minted=1)}) == 9


def test_a_merge_never_lowers_a_field() -> None:
    big = ActorRights(minted=5, sent={"b1#1": (3.0, 1.0)}, want=(9.0, 1.0))
    small = ActorRights(minted=2, sent={"b1#1": (1.0, 7.0)}, want=(8.0, 50.0))
    m = merge_actor(big, small)
    assert m.minted == 5 and m.sent["b1#1"] == (3.0, 1.0) and m.want == (9.0, 1.0)


def test_actor_ids_round_trip_and_refuse_garbage() -> None:
    assert split_actor(actor_id("eu#west-1", 17)) == ("eu#west-1", 17)
    for bad in ("eu-1", "#3", "eu-1#", "eu-1#x"):
        try:
            split_actor(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
