"""Strict mode: escrow rights, leases and fencing -- the global limit holds under any partition.

The pure core (no I/O, no clock reads; time is an argument): ``rights`` (the bounded-counter CRDT),
``lease`` (a node's floating share), ``allocator`` (the per-region voters), ``table`` (the per-node
limiter, with ``keystate``, ``pots``, ``transfers`` and ``deltas``), ``wire`` (the signed, versioned
encoding) and ``memcluster`` (an in-memory driver used by the tests and the benchmark). The design
and its safety argument: ``docs/strict-mode.md``.
"""

from edge_server.strict.allocator import Voter
from edge_server.strict.lease import Grant, LeaseRequest, NodeLease
from edge_server.strict.rights import ActorRights, merge_actor, merge_key
from edge_server.strict.settings import StrictSettings, StrictSettingsError
from edge_server.strict.table import StrictDecision, StrictTable, Ticket

__all__ = [
    "ActorRights",
    "Grant",
    "LeaseRequest",
    "NodeLease",
    "StrictDecision",
    "StrictSettings",
    "StrictSettingsError",
    "StrictTable",
    "Ticket",
    "Voter",
    "merge_actor",
    "merge_key",
]
