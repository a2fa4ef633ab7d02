"""What one strict node keeps per key, and the records its decisions hand out.

``KeyState`` is the node's own state of one key (its pots, reservations, gifts in flight, the other
actors' entries as merged, demand); ``Ticket`` is what an allowed take reserved, ``StrictDecision``
the answer to a take.  Plain slotted objects and tuples: they are touched on every request.
"""

from __future__ import annotations

from typing import NamedTuple

from edge_server.strict.rights import ActorRights, KeyRights
from edge_server.token_bucket import CostExceedsBurst, Limit

__all__ = ["CostExceedsNodeCap", "KeyState", "StrictDecision", "Ticket", "Unacked", "UnknownTransfer"]


class UnknownTransfer(LookupError):
    """A transfer or state entry names a key with no limit or a node outside the cluster."""


class CostExceedsNodeCap(CostExceedsBurst):
    """A request costs more rights than this node can ever hold of the key (its pinned cap plus the
    whole floating cap, ``(alpha * p_i + 1 - alpha) * B``): in strict mode it could never be allowed,
    so it is refused up front, like a cost over the burst in eventual mode."""

    def __init__(self, cap: float, burst: float) -> None:
        ValueError.__init__(self, f"cost exceeds {cap:g}, the most rights of this key one node can hold "
                                  f"in strict mode (of the burst {burst:g})")
        self.burst, self.cap = burst, cap


class Ticket(NamedTuple):
    """What one allowed take reserved; give it back to :meth:`StrictTable.commit`.  (A tuple: a
    frozen dataclass cost more than the whole decision.)"""

    key: str
    cost: int
    from_pinned: float
    from_floating: float
    at: float
    phi: float


class StrictDecision(NamedTuple):
    allowed: bool
    remaining: float
    limit: float
    retry_after_s: float
    ticket: Ticket | None


class Unacked:
    """A gift not yet acknowledged by its receiver: it still counts against our caps until ``until``."""

    __slots__ = ("floating", "pinned", "receiver", "total", "until")

    def __init__(self, receiver: str, total: float, pinned: float, floating: float, until: float) -> None:
        self.receiver, self.total, self.pinned, self.floating, self.until = receiver, total, pinned, floating, until


class KeyState:
    """One key of one node incarnation: its pots, reservations, gifts, view and demand."""

    __slots__ = (
        "accepted",
        "burned",
        "changed",
        "coef",
        "considered",
        "credited",
        "demand",
        "f",
        "fast",
        "hot",
        "key",
        "lazy",
        "limit",
        "minted",
        "most",
        "own_c",
        "p",
        "requested",
        "res_f",
        "res_p",
        "sent",
        "spent",
        "stamp",
        "ticked",
        "uf",
        "unacked",
        "up",
        "view",
        "visited",
        "vseq",
        "want",
        "want_credited",
        "want_gap",
    )

    def __init__(self, key: str, limit: Limit, now: float) -> None:
        self.key = key
        self.limit = limit
        self.most = limit.burst  # the largest cost this node could ever admit (set by the table)
        self.coef = (0.0, 0.0, 0.0, 0.0)  # the caps' factors (set by the table; see ``StrictTable._caps``)
        self.view: KeyRights = {}  # other actors' entries, as merged
        self.vseq: dict[str, int] = {}  # actor -> our seq after which its entry last changed here
        self.own_c: ActorRights | None = None  # our entry as last published (cleared by a change)
        self.minted = self.spent = self.burned = self.credited = 0.0
        self.sent: dict[str, tuple[float, float]] = {}
        self.accepted: dict[str, float] = {}
        self.considered: dict[str, float] = {}  # actor -> the newest want stamp of it a tick looked at (a donor)
        self.want = (0.0, 0.0)
        self.want_gap = 0.0  # how old a want must be before it is published again (see ``Transfers``)
        self.want_credited = 0.0  # ``credited`` when the last want was published
        self.p = 0.0  # pinned pot
        self.f = 0.0  # floating pot
        self.res_p = self.res_f = 0.0
        self.unacked: list[Unacked] = []
        self.up = self.uf = 0.0  # sums of unacked pinned / floating, kept with the list
        self.stamp = now
        self.requested = 0.0
        self.demand = 0.0  # tokens per second asked for (allowed or not), averaged
        self.fast = 0.0  # the same over a much shorter time
        self.changed = 0
        self.ticked = now  # the last tick that visited this key
        self.visited = -1  # the round of that tick
        self.hot = False  # in the table's list of keys for the next tick
        self.lazy = False  # spent since our entry last went into the deltas (see ``StrictTable.commit``)

    def own(self) -> ActorRights:
        return ActorRights(self.minted, self.spent, self.burned, self.credited, dict(self.sent),
                           dict(self.accepted), self.want)
