"""The replicated part of the limiter: per-key G-Counters whose entries carry a generation.

Each node increments only its own entry.  An entry is ``(generation, count)`` and entries merge by
lexicographic maximum, so merge is commutative, associative and idempotent (a join semilattice).
The generation lets a node forget an idle key and later start counting it again from zero under a
newer generation without becoming invisible to peers that still remember its old, larger count.

Everything here is pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "Entry",
    "KeyCounters",
    "consumed_between",
    "merge_entries",
    "merge_maps",
    "total",
]

Entry = tuple[int, int]
"""``(generation, count)`` of one node for one key."""

KeyCounters = dict[str, Entry]
"""Node id -> entry, for one key."""


def consumed_between(old: Entry | None, new: Entry) -> int:
    """Tokens that ``new`` accounts for beyond ``old`` (0 when ``new`` is not newer).

    A newer generation restarts the count, so everything it holds is new consumption.
    """
    if old is None:
        return new[1]
    if new[0] > old[0]:
        return new[1]
    if new[0] == old[0] and new[1] > old[1]:
        return new[1] - old[1]
    return 0


def merge_entries(a: Mapping[str, Entry], b: Mapping[str, Entry]) -> KeyCounters:
    """Element-wise lexicographic maximum of two per-key counters."""
    out = dict(a)
    for node, entry in b.items():
        mine = out.get(node)
        if mine is None or entry > mine:
            out[node] = entry
    return out


def merge_maps(
    a: Mapping[str, Mapping[str, Entry]], b: Mapping[str, Mapping[str, Entry]]
) -> dict[str, KeyCounters]:
    """Merge two whole key -> counters maps (used by tests and by state comparison)."""
    out = {key: dict(counters) for key, counters in a.items()}
    for key, counters in b.items():
        out[key] = merge_entries(out.get(key, {}), counters)
    return out


def total(counters: Iterable[Entry]) -> int:
    """Sum of the counts of the current generation of every node."""
    return sum(count for _gen, count in counters)
