"""Delta-state replication of a strict node's entries: what each peer has, deltas, acks, merge.

A part of :class:`~edge_server.strict.table.StrictTable` (a base class of it).  A delta carries the
keys changed since the peer's last acknowledged change, each with our own entry and what we learned
from others since then (never the peer's own entry); merge is a max per actor and refuses what no
honest peer sends (unknown keys or nodes, our own entry grown by someone else).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from edge_server.strict.keystate import KeyState
from edge_server.strict.rights import ActorRights, KeyRights, leq, merge_actor, split_actor
from edge_server.token_bucket import KeyTableFull

__all__ = ["Deltas", "PeerView"]

ACTOR_CACHE_MAX = 4096  # parsed actor ids kept (nodes x incarnations seen; cleared past this)
RESEND_ROUNDS = 5  # a delta not acknowledged after this many rounds is sent again (doubling up to ...)
RESEND_MAX_ROUNDS = 50  # ... this many, while the peer stays silent)
PENDING_MAX = 64  # deltas per peer awaiting their ack; an older one's ack is ignored (resent anyway)


class PeerView:
    """What one peer has of our state.  ``acked``: every change up to it has reached the peer.
    A delta covers the changes in ``(base, upto]``; its ack advances ``acked`` only if ``base``
    is already acknowledged, so a lost delta is never skipped over by a later one's ack."""

    __slots__ = ("acked", "actor", "backoff", "got", "pending", "resent", "sent")

    def __init__(self) -> None:
        self.actor = ""
        self.reset()

    def reset(self) -> None:
        self.acked = 0
        self.sent = 0  # the upto of the last delta built
        self.resent = -RESEND_MAX_ROUNDS  # the round of the last delta built from ``acked``
        self.backoff = RESEND_ROUNDS
        self.pending: dict[int, int] = {}  # upto -> base, of deltas not yet acknowledged
        self.got: set[int] = set()  # uptos acknowledged while an earlier delta was still missing

    def on_ack(self, upto: int) -> None:
        if upto not in self.pending:
            return  # acknowledged already, or so old it was forgotten (or not ours)
        self.got.add(upto)
        advanced = True
        while advanced:
            advanced = False
            for u in [u for u in self.got if self.pending.get(u, self.acked + 1) <= self.acked]:
                self.got.discard(u)
                if u > self.acked:
                    self.acked = u
                    self.backoff = RESEND_ROUNDS
                    advanced = True
        for u in [u for u in self.pending if u <= self.acked]:
            del self.pending[u]
        self.got = {u for u in self.got if u > self.acked}


class Deltas:
    """The replication half of ``StrictTable``: ``delta_for``, ``on_ack``, ``merge``."""

    def delta_for(self, peer: str) -> tuple[int, list[tuple[str, KeyRights]]]:
        """Keys changed since ``peer`` last acknowledged, oldest change first, each with our own entry
        and the other actors' entries that changed here since then (relayed: a transfer can cross a
        partial partition).  Never ``peer``'s own entry: nobody but ``peer`` raises it.

        Walks only the changed keys (newest first), so a round costs what changed, not what the
        table holds.  What an earlier delta still in flight carries is not sent again, unless that
        delta went unacknowledged for ``RESEND_ROUNDS`` rounds (doubling while the peer stays
        silent): a slow peer is not buried under the same keys every round.  An empty delta is not
        recorded and need not be sent: a quiet table costs no message (nor an ack) per round.
        """
        view = self._peers[peer]
        acked, skip, me = view.acked, view.actor, self.actor
        if view.sent <= acked or self._rounds - view.resent >= view.backoff:
            if view.sent > acked:  # a resend: the peer is slow or a delta was lost
                view.backoff = min(2 * view.backoff, RESEND_MAX_ROUNDS)
            base = acked
            view.resent = self._rounds
        else:
            base = view.sent
        keys = self._keys
        out = []
        for key, seq in reversed(self._recent.items()):
            if seq <= base:
                break
            st = keys[key]
            own = st.own_c
            if own is None:
                own = st.own_c = st.own()
            rights = {me: own}
            if st.view:
                vseq = st.vseq
                for actor, r in st.view.items():
                    if vseq[actor] > acked and actor != skip:
                        rights[actor] = r
            out.append((key, rights))
        out.reverse()
        upto = self._seq
        if not out:  # nothing changed since ``base`` (so ``upto == base``): the caller sends nothing
            return upto, out
        view.sent = upto
        pending = view.pending
        pending[upto] = min(base, pending.get(upto, base))
        if len(pending) > PENDING_MAX:
            del pending[next(iter(pending))]
        return upto, out

    def on_ack(self, peer_actor: str, upto: int, now: float) -> None:
        """``peer_actor`` merged our state up to change ``upto``.  A new incarnation starts from 0."""
        try:
            node, _inc = split_actor(peer_actor)
        except ValueError:
            self._count("ack_bad_actor")
            return
        view = self._peers.get(node)
        if view is None:
            self._count("ack_unknown_node")
            return
        switched = self._switch(view, peer_actor)
        if switched is None or switched:
            return  # a late ack of a dead incarnation, or the first of a new one (it starts from 0)
        view.on_ack(upto)

    def merge(self, sender: str, entries: Iterable[tuple[str, Mapping[str, ActorRights]]], now: float) -> int:
        """Merge a peer's state; credit transfers to us; drop our acknowledged transfers.

        Returns the number of entries refused (each counted in ``refused`` by reason): a key with
        no limit, a node outside the cluster, our own entry grown by someone else (forged) -- those
        are never merged -- and a transfer answering a want we never made, which is never credited.
        """
        refused = 0
        try:
            snode, _sinc = split_actor(sender)
        except ValueError:
            self._count("bad_actor")
            return 1
        if snode not in self._peers:
            self._count("unknown_node")
            return 1
        self._switch(self._peers[snode], sender)
        changed_at = self._seq + 1  # an entry merged now rides in deltas built after our next change
        for key, actors in entries:
            st = self._keys.get(key)
            if st is None:
                if self._limit_for(key) is None:
                    self._count("unknown_key")
                    refused += 1
                    continue
                try:
                    st = self._get(key, now)
                except KeyTableFull:
                    self._count("table_full")
                    refused += 1
                    continue
            # Settled first whenever this merge may change the pots or the gifts counted against them:
            # ``_acknowledged`` (gifts in flight) drops gifts, and a settle after that would mint the
            # time since the last settle against the smaller sum; ``_receive`` settles before it
            # credits.  A merge that only updates the view (a peer's spends: most of them) needs none.
            settled = bool(st.unacked)
            if settled:
                self._settle(st, now)
            wanted = False
            for actor, rights in actors.items():
                reason = self._check_actor(st, actor, rights)
                if reason:
                    self._count(reason)
                    refused += 1
                    continue
                if actor == self.actor:
                    continue
                old = st.view.get(actor)
                if old is None:
                    st.view[actor] = rights
                    wanted = wanted or rights.want[1] > 0
                elif leq(rights, old):
                    continue  # nothing new (a duplicate, or older than what we hold)
                else:
                    # An honest peer's entry only grows, so the new one usually holds the old: then it
                    # is the merge, with no new object built (most of a busy receiver's merge cost).
                    st.view[actor] = rights if leq(old, rights) else merge_actor(old, rights)
                    wanted = wanted or rights.want[0] > old.want[0]
                st.vseq[actor] = changed_at
                node, inc = self._split(actor)
                if inc > self._current.get(node, -1):
                    self._current[node] = inc
                    wanted = True  # wants of a newer incarnation count from now on
            if wanted and not st.hot:
                self._mark(st)  # a peer wants rights: the next tick may give
            refused += self._receive(st, now, settled)
            self._acknowledged(st)
        return refused

    @staticmethod
    def _switch(view: PeerView, actor: str) -> bool | None:
        """Track a peer's newest incarnation: True if ``actor`` is a new one (resend everything),
        False if it is the current one, None if it is older (a late message of a dead process)."""
        if view.actor == actor:
            return False
        if view.actor and split_actor(actor)[1] < split_actor(view.actor)[1]:
            return None
        view.actor = actor
        view.reset()
        return True

    def _split(self, actor: str) -> tuple[str, int]:
        """:func:`split_actor`, parsed once per actor id (a merge checks every id it carries)."""
        got = self._actors.get(actor)
        if got is None:
            got = split_actor(actor)
            if len(self._actors) >= ACTOR_CACHE_MAX:
                self._actors.clear()
            self._actors[actor] = got
        return got

    def _check_actor(self, st: KeyState, actor: str, rights: ActorRights) -> str:
        nodes = self.nodes
        try:
            node, inc = self._split(actor)
            if node not in nodes:
                return "unknown_node"
            for receiver in (*rights.sent, *rights.accepted):
                if self._split(receiver)[0] not in nodes:
                    return "unknown_node"
        except ValueError:
            return "bad_actor"
        if actor == self.actor and not leq(rights, st.own()):
            return "forged_own"
        if node == self.node_id and inc > self.incarnation:
            return "newer_incarnation_of_self"
        return ""
