"""Merge of per-key G-Counters is a join: commutative, associative, idempotent; consumption is never negative."""

from hypothesis import given
from hypothesis import strategies as st

from edge_server.gcounter import consumed_between, merge_entries, merge_maps

entries = st.tuples(st.integers(0, 5), st.integers(0, 1000))
counters = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), entries, max_size=4)
maps = st.dictionaries(st.sampled_from(["k1", "k2", "k3"]), counters, max_size=3)


@given(counters, counters)
def test_merge_commutes(a, b):
    assert merge_entries(a, b) == merge_entries(b, a)


@given(counters, counters, counters)
def test_merge_associates(a, b, c):
    assert merge_entries(merge_entries(a, b), c) == merge_entries(a, merge_entries(b, c))


@given(counters, counters)
def test_merge_is_idempotent_and_an_upper_bound(a, b):
    m = merge_entries(a, b)
    assert merge_entries(m, m) == m
    assert merge_entries(m, a) == m
    for node, entry in a.items():
        assert m[node] >= entry


@given(maps, maps, maps)
def test_map_merge_is_a_join(a, b, c):
    assert merge_maps(a, b) == merge_maps(b, a)
    assert merge_maps(merge_maps(a, b), c) == merge_maps(a, merge_maps(b, c))
    assert merge_maps(a, a) == {k: v for k, v in a.items()}


@given(st.one_of(st.none(), entries), entries)
def test_consumption_is_never_negative_and_zero_for_older(old, new):
    got = consumed_between(old, new)
    assert got >= 0
    if old is not None and new <= old:
        assert got == 0


def test_new_generation_counts_everything_it_holds():
    assert consumed_between((1, 500), (2, 7)) == 7
    assert consumed_between((2, 5), (2, 9)) == 4
    assert consumed_between(None, (3, 4)) == 4
