"""Escrow rights as a bounded-counter CRDT: what each actor (a node incarnation) minted, spent,
burned, gave and accepted, for one key.

An actor is ``"<node id>#<incarnation>"``.  Only the actor itself ever raises its own fields; every
field only grows, and two copies merge by element-wise maximum, so merge is commutative,
associative and idempotent and duplicated, reordered or replayed gossip is harmless (the same
shape as AntidoteDB's ``antidote_crdt_counter_b``, with an explicit ``accepted`` side so a giver
learns, through ordinary gossip, that its transfer has landed).

The rights an actor holds are derived, never stored:
``held = minted + credited - sum(sent) - spent - burned``.  A transfer ``i -> j`` is the pair
``sent[j] = (total, echo)`` in ``i``'s entry: the running total given to ``j`` and the stamp of the
``want`` of ``j`` it answers (on ``j``'s own clock, so only ``j`` judges its freshness).  ``j``
records in ``accepted[i]`` the total of ``i``'s transfers it has processed (credited or burned).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "ActorRights",
    "KeyRights",
    "actor_id",
    "held",
    "leq",
    "merge_actor",
    "merge_key",
    "node_of",
    "split_actor",
]


def actor_id(node: str, incarnation: int) -> str:
    """The CRDT actor of one incarnation of a node: a restart never reuses an actor."""
    return f"{node}#{incarnation}"


def split_actor(actor: str) -> tuple[str, int]:
    """``"eu-1#17" -> ("eu-1", 17)``; raises ``ValueError`` for anything else."""
    node, sep, inc = actor.rpartition("#")
    if not sep or not node or not inc.isdigit():
        raise ValueError(f"{actor!r} is not '<node>#<incarnation>'")
    return node, int(inc)


def node_of(actor: str) -> str:
    return split_actor(actor)[0]


@dataclass(frozen=True, slots=True)
class ActorRights:
    """One actor's counters for one key.  Every field is monotone; merge is the pointwise max."""

    minted: float = 0.0
    spent: float = 0.0
    burned: float = 0.0  # rights destroyed by their holder: lease lapse, trim, restart
    credited: float = 0.0  # rights received by transfer and kept
    sent: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # receiver -> (total, echo)
    accepted: Mapping[str, float] = field(default_factory=dict)  # giver -> total processed
    want: tuple[float, float] = (0.0, 0.0)  # (stamp on own clock, amount wanted)

    @property
    def given(self) -> float:
        return sum(total for total, _echo in self.sent.values())

    @property
    def held(self) -> float:
        return self.minted + self.credited - self.given - self.spent - self.burned


KeyRights = dict[str, ActorRights]
"""Actor -> rights, for one key."""


def _max_pairs(a: Mapping[str, tuple[float, float]], b: Mapping[str, tuple[float, float]]) -> dict:
    out = dict(a)
    for k, v in b.items():
        mine = out.get(k)
        if mine is None or v > mine:
            out[k] = v
    return out


def _max_nums(a: Mapping[str, float], b: Mapping[str, float]) -> dict:
    out = dict(a)
    for k, v in b.items():
        mine = out.get(k)
        if mine is None or v > mine:
            out[k] = v
    return out


def merge_actor(a: ActorRights, b: ActorRights) -> ActorRights:
    """Pointwise maximum.  ``sent`` and ``want`` are pairs ordered lexicographically: the actor raises
    the total and the echo together, so the larger total always carries the newer echo."""
    if a == b:
        return a
    return ActorRights(
        minted=max(a.minted, b.minted),
        spent=max(a.spent, b.spent),
        burned=max(a.burned, b.burned),
        credited=max(a.credited, b.credited),
        sent=_max_pairs(a.sent, b.sent),
        accepted=_max_nums(a.accepted, b.accepted),
        want=max(a.want, b.want),
    )


def merge_key(a: Mapping[str, ActorRights], b: Mapping[str, ActorRights]) -> KeyRights:
    """Merge two actor -> rights maps for one key."""
    out = dict(a)
    for actor, rights in b.items():
        mine = out.get(actor)
        out[actor] = rights if mine is None else merge_actor(mine, rights)
    return out


def _le_map(a: Mapping, b: Mapping) -> bool:
    return all(k in b and v <= b[k] for k, v in a.items())


def leq(a: ActorRights, b: ActorRights) -> bool:
    """The semilattice order: ``a`` is contained in ``b`` (``merge_actor(a, b) == b``)."""
    return (a.minted <= b.minted and a.spent <= b.spent and a.burned <= b.burned
            and a.credited <= b.credited and a.want <= b.want
            and (not a.sent or _le_map(a.sent, b.sent)) and (not a.accepted or _le_map(a.accepted, b.accepted)))


def held(rights: Mapping[str, ActorRights], actors: Iterable[str] | None = None) -> float:
    """Rights held by ``actors`` (all by default) in one key's merged view."""
    chosen = rights.keys() if actors is None else actors
    return sum(rights[a].held for a in chosen if a in rights)
