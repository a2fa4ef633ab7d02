"""Strict mode's wire format: versioned JSON, HMAC-SHA256 over the exact body bytes.

Kinds: ``strict_delta`` (rights state, per key per actor), ``strict_ack``, ``lease_request``,
``grant`` and the voters' ``hello`` / ``propose`` / ``accept`` / ``commit``.  A message is refused
(never merged) with a :class:`edge_server.wire.WireError` naming the reason, for metrics: unsigned,
forged signature, not JSON, unknown version (the field ``"sv"``), unknown kind, a field of the wrong
type, a negative or non-finite number, a node outside the cluster, a message whose sender is not who
its body speaks for (``wrong_sender``: a lease request for another incarnation, a grant in another
voter's name), an incarnation too far ahead of the receiver's wall clock (``future_incarnation``), or
-- through :class:`SeqGuard` -- a seq already seen from that sender (replayed).  Replays are harmless
to the state (merge is idempotent) but are refused and counted all the same.

**Forged and replayed incarnations.**  Every message is signed with the cluster's one secret, so a
signature says "a member of this cluster", not which one; what a message may do is therefore
limited by what it *claims*.  An incarnation is a boot id (wall-clock milliseconds), so a claim
more than :data:`INCARNATION_AHEAD_MS` (a day) ahead of the receiver's wall clock can only be forged
or come from a broken clock, and is refused whole, wherever in the message it appears.  A merely
*newer* incarnation fences nobody here: :class:`SeqGuard` keeps its sequence per incarnation, so
the messages of the node's live incarnation are still accepted (the voters adopt a newer
incarnation only once the old one is silent, see ``allocator.py``).

An entry is a positional list ``[minted, spent, burned, credited, {receiver: [total, echo]},
{giver: accepted}, [want_stamp, want_amount]]``: the field order is part of version 1.
"""

from __future__ import annotations

import bisect
import hmac
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson

from edge_server.strict.allocator import Accept, Commit, Hello, Propose
from edge_server.strict.lease import Grant, LeaseRequest
from edge_server.strict.rights import ActorRights, KeyRights, split_actor
from edge_server.wire import WireError, sign

__all__ = [
    "INCARNATION_AHEAD_MS",
    "STRICT_WIRE_VERSION",
    "SeqGuard",
    "StrictMessage",
    "decode",
    "encode",
]

STRICT_WIRE_VERSION = 1
INCARNATION_AHEAD_MS = 86_400_000  # a day: wider than any time-zone mistake, far below a forged 10**14
_VOTER_KINDS: dict[str, type] = {"hello": Hello, "propose": Propose, "accept": Accept, "commit": Commit}
_KINDS = frozenset({"strict_delta", "strict_ack", "lease_request", "grant", *_VOTER_KINDS})


@dataclass(frozen=True, slots=True)
class StrictMessage:
    """A decoded message.  ``body`` is the kind's payload (see :func:`encode`)."""

    kind: str
    sender: str  # an actor ``node#incarnation`` for node messages, a voter id for voter messages
    seq: int
    body: Any


def _rights_doc(r: ActorRights) -> list:
    # orjson writes the tuples in ``sent`` and ``want`` as arrays: no copy of either mapping per entry
    # (these copies were most of a busy round's encoding).
    return [r.minted, r.spent, r.burned, r.credited, r.sent, r.accepted, r.want]


def encode(secret: bytes, kind: str, sender: str, seq: int, body: Any) -> tuple[bytes, str]:
    """Serialize and sign one message.  ``body`` by kind:

    ``strict_delta``: ``(upto, [(key, {actor: ActorRights})])``; ``strict_ack``: ``upto``;
    ``lease_request``: a :class:`LeaseRequest`; ``grant``: a :class:`Grant`; voter kinds: the
    voter message dataclass.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    if kind == "strict_delta":
        upto, entries = body
        payload: Any = {"upto": upto, "entries": [[key, {a: _rights_doc(r) for a, r in rights.items()}]
                                                  for key, rights in entries]}
    elif kind == "strict_ack":
        payload = {"upto": body}
    elif kind == "lease_request":
        payload = {"voter": body.voter, "node": body.node, "inc": body.incarnation, "req": body.req_id,
                   "demand": body.demand}
    elif kind == "grant":
        payload = {"voter": body.voter, "node": body.node, "inc": body.incarnation, "req": body.req_id,
                   "epoch": body.epoch, "quorum": body.quorum, "members": body.members,
                   "fraction": body.fraction, "reason": body.reason}
    else:
        payload = {"epoch": body.epoch, "members": list(body.members)}
    doc = {"sv": STRICT_WIRE_VERSION, "kind": kind, "from": sender, "seq": seq, "body": payload}
    data = orjson.dumps(doc)
    return data, sign(secret, data)


# ---------------------------------------------------------------------- decoding


def _fail(message: str, reason: str = "malformed") -> WireError:
    return WireError(reason, message)


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise _fail(f"{what} must be a finite number >= 0")
    return float(value)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(f"{what} must be an integer >= 0")
    return value


def _str(value: Any, what: str, limit: int = 256) -> str:
    # A character is at most 4 bytes of UTF-8: a string that short needs no encoding to be measured.
    if not isinstance(value, str) or not value or (
            4 * len(value) > limit and len(value.encode("utf-8", "replace")) > limit):
        raise _fail(f"{what} must be a non-empty string of at most {limit} bytes")
    return value


def _actor(value: Any, what: str, nodes: Collection[str] | None, max_inc: int | None = None) -> str:
    actor = _str(value, what)
    try:
        node, inc = split_actor(actor)
    except ValueError:
        raise _fail(f"{what} {actor!r} is not '<node>#<incarnation>'") from None
    if nodes is not None and node not in nodes:
        raise WireError("unknown_node", f"{what} {actor!r} names a node outside the cluster")
    if max_inc is not None and inc > max_inc:
        raise _future(what, actor)
    return actor


def _future(what: str, actor: str) -> WireError:
    return WireError("future_incarnation", f"{what} {actor!r}: an incarnation (boot id, wall-clock ms) more "
                     f"than {INCARNATION_AHEAD_MS} ms ahead of this node's clock")


_INF = math.inf


def _fast_pairs(sent: dict) -> dict[str, tuple[float, float]] | None:
    """``sent`` as ``{receiver: (total, echo)}`` if every value is two floats in ``[0, inf)``, else None
    (then the full checks say what is wrong)."""
    out = {}
    for receiver, pair in sent.items():
        if type(pair) is not list or len(pair) != 2:
            return None
        total, echo = pair
        if not (type(total) is float and type(echo) is float and 0.0 <= total < _INF and 0.0 <= echo < _INF):
            return None
        out[receiver] = (total, echo)
    return out


def _rights(raw: Any, where: str, nodes: Collection[str] | None, max_inc: int | None = None,
            known: set[str] | None = None) -> ActorRights:
    # The common entry first: four floats, nothing given or accepted, a want of two floats.  ``0.0 <= x
    # < inf`` on a float is exactly ``_num``'s test (NaN fails it); anything else takes the full checks.
    # A node's peers decode every busy key's entry ten times a second: this is most of their strict work.
    # Next, an entry whose givers and receivers this message has already checked (``known``): a node
    # that was given rights carries ``accepted`` in every later entry of that key, and its donors
    # decode each of them.
    if type(raw) is list and len(raw) == 7:
        m, sp, b, c, sent, acc, want = raw
        if (type(m) is float and type(sp) is float and type(b) is float and type(c) is float
                and 0.0 <= m < _INF and 0.0 <= sp < _INF and 0.0 <= b < _INF and 0.0 <= c < _INF
                and type(sent) is dict and type(acc) is dict and type(want) is list and len(want) == 2):
            ws, wa = want
            if type(ws) is float and type(wa) is float and 0.0 <= ws < _INF and 0.0 <= wa < _INF:
                if not sent and not acc:
                    return ActorRights(m, sp, b, c, {}, {}, (ws, wa))
                if known is not None and known.issuperset(acc) and known.issuperset(sent):
                    pairs = _fast_pairs(sent)
                    if pairs is not None and all(type(v) is float and 0.0 <= v < _INF for v in acc.values()):
                        return ActorRights(m, sp, b, c, pairs, dict(acc), (ws, wa))
    if not (isinstance(raw, list) and len(raw) == 7 and isinstance(raw[4], dict) and isinstance(raw[5], dict)
            and isinstance(raw[6], list) and len(raw[6]) == 2):
        raise _fail(f"{where} is not [minted, spent, burned, credited, sent, accepted, want]")
    # ``known``: the actor ids this message already passed through ``_actor`` (the same few givers and
    # receivers in every entry of a busy key: a donor's peers decode thousands of them a second).
    if known is None:
        known = set()
    sent = {}
    for receiver, pair in raw[4].items():
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _fail(f"{where} sent[{receiver!r}] is not [total, echo]")
        if receiver not in known:
            known.add(_actor(receiver, f"{where} receiver", nodes, max_inc))
        sent[receiver] = (_num(pair[0], "total"), _num(pair[1], "echo"))
    accepted = {}
    for giver, value in raw[5].items():
        if giver not in known:
            known.add(_actor(giver, f"{where} giver", nodes, max_inc))
        accepted[giver] = _num(value, "accepted")
    return ActorRights(_num(raw[0], "minted"), _num(raw[1], "spent"), _num(raw[2], "burned"),
                       _num(raw[3], "credited"), sent, accepted,
                       (_num(raw[6][0], "want stamp"), _num(raw[6][1], "want amount")))


def decode(secret: bytes, data: bytes, signature: str | None, *, nodes: Collection[str] | None = None,
           voters: Collection[str] | None = None, max_key_bytes: int = 256,
           max_incarnation: int | None = None) -> StrictMessage:
    """Verify and parse one message; raise ``WireError`` for anything not exactly right.

    With ``nodes`` (and ``voters``), any actor or voter outside the cluster is refused.  With
    ``max_incarnation`` (the receiver's wall clock in ms plus :data:`INCARNATION_AHEAD_MS`), any
    incarnation beyond it -- the sender's, an entry's, a receiver's or giver's, a grant's -- is.
    """
    if not signature:
        raise WireError("unsigned", "missing signature", 401)
    if not isinstance(data, bytes | bytearray) or not _consteq(sign(secret, bytes(data)), signature):
        raise WireError("bad_signature", "signature does not match the body", 401)
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _fail("body is not JSON") from None
    except RecursionError:
        raise _fail("body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise _fail("body is not a JSON object")
    if doc.get("sv") != STRICT_WIRE_VERSION:
        raise WireError("unsupported_version", f"strict wire version {doc.get('sv')!r} is not {STRICT_WIRE_VERSION}")
    kind = doc.get("kind")
    if kind not in _KINDS:
        raise WireError("unknown_kind", f"kind {kind!r} is not one of {sorted(_KINDS)}")
    seq = _int(doc.get("seq"), "'seq'")
    body = doc.get("body")
    if not isinstance(body, dict):
        raise _fail("'body' must be an object")
    if kind in _VOTER_KINDS:
        sender = _str(doc.get("from"), "'from'")
        if voters is not None and sender not in voters:
            raise WireError("unknown_voter", f"{sender!r} is not a voter of the cluster")
        members = body.get("members")
        if not isinstance(members, list) or not members:
            raise _fail("'members' must be a non-empty list")
        for m in members:
            _str(m, "member")
            if voters is not None and m not in voters:
                raise WireError("unknown_voter", f"member {m!r} is not a voter of the cluster")
        msg: Any = _VOTER_KINDS[kind](sender, _int(body.get("epoch"), "'epoch'"), tuple(members))
        return StrictMessage(kind, sender, seq, msg)
    if kind == "grant":
        sender = _str(doc.get("from"), "'from'")
        if voters is not None and sender not in voters:
            raise WireError("unknown_voter", f"{sender!r} is not a voter of the cluster")
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise _fail("'reason' must be a string")
        fraction = _num(body.get("fraction"), "'fraction'")
        if fraction > 1:
            raise _fail("'fraction' must be in [0, 1]")
        node = _str(body.get("node"), "'node'")
        if nodes is not None and node not in nodes:
            raise WireError("unknown_node", f"grant for {node!r}, a node outside the cluster")
        voter = _str(body.get("voter"), "'voter'")
        if voter != sender:
            raise WireError("wrong_sender", f"a grant in the name of {voter!r} sent by {sender!r}")
        inc = _int(body.get("inc"), "'inc'")
        if max_incarnation is not None and inc > max_incarnation:
            raise _future("grant for", f"{node}#{inc}")
        grant = Grant(voter, node, inc, _int(body.get("req"), "'req'"), _int(body.get("epoch"), "'epoch'"),
                      _int(body.get("quorum"), "'quorum'"), _int(body.get("members"), "'members'"),
                      fraction, reason)
        return StrictMessage(kind, sender, seq, grant)
    sender = _actor(doc.get("from"), "'from'", nodes, max_incarnation)
    if kind == "strict_ack":
        return StrictMessage(kind, sender, seq, _int(body.get("upto"), "'upto'"))
    if kind == "lease_request":
        node = _str(body.get("node"), "'node'")
        inc = _int(body.get("inc"), "'inc'")
        if (node, inc) != split_actor(sender):
            raise WireError("wrong_sender", f"a lease request for {node}#{inc} sent by {sender!r}")
        voter = _str(body.get("voter"), "'voter'")
        if voters is not None and voter not in voters:
            raise WireError("unknown_voter", f"{voter!r} is not a voter of the cluster")
        req = LeaseRequest(voter, node, inc, _int(body.get("req"), "'req'"), _num(body.get("demand"), "'demand'"))
        return StrictMessage(kind, sender, seq, req)
    raw_entries = body.get("entries")
    if not isinstance(raw_entries, list):
        raise _fail("'entries' must be a list")
    entries: list[tuple[str, KeyRights]] = []
    actors: set[str] = set()  # the actors this message named that passed ``_actor``: the same few in every entry
    for item in raw_entries:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict)):
            raise _fail("an entry is not [key, {actor: rights}]")
        key = _str(item[0], "a key", max_key_bytes)
        rights: KeyRights = {}
        for a, r in item[1].items():
            if a not in actors:
                actors.add(_actor(a, f"entry {key!r} actor", nodes, max_incarnation))
            rights[a] = _rights(r, f"entry {key!r}", nodes, max_incarnation, actors)
        entries.append((key, rights))
    return StrictMessage(kind, sender, seq, (_int(body.get("upto"), "'upto'"), entries))


def _consteq(a: str, b: str) -> bool:
    return isinstance(b, str) and hmac.compare_digest(a, b)


class SeqGuard:
    """Refuses a message whose seq it has already seen from its sender (a replay).

    Sequences are kept per *sender* -- an actor ``node#incarnation``, or a voter id -- not per node:
    a message claiming a newer incarnation of a node (forged, or a replay reaching a receiver that
    restarted) must not make the messages of that node's live incarnation look replayed.  The
    newest ``incarnations`` incarnations of each node are kept; a message of an incarnation older
    than all of them is refused.

    Reordering is normal (concurrent HTTP requests, jitter), so a message older than the newest is
    accepted once, as long as it is within ``window`` of the newest seq and not seen before (the
    anti-replay window of IPsec, RFC 4303).  Anything older than the window or seen before is
    refused.  Refusing a reordered message would cost availability (a lost lease request), never
    safety: merge is idempotent either way.
    """

    def __init__(self, window: int = 256, incarnations: int = 4) -> None:
        self.window = window
        self.incarnations = incarnations
        self._last: dict[str, int] = {}  # sender -> newest seq
        self._seen: dict[str, set[int]] = {}  # sender -> seqs within the window below the newest
        self._kept: dict[str, list[int]] = {}  # node -> incarnations tracked, ascending
        self.refused = 0

    def _refuse(self, msg: StrictMessage, why: str) -> WireError:
        self.refused += 1
        return WireError("replayed", f"{msg.sender!r} seq {msg.seq}: {why}", 409)

    def check(self, msg: StrictMessage) -> None:
        sender, seq = msg.sender, msg.seq
        last = self._last.get(sender)
        if last is None:
            try:
                node, inc = split_actor(sender)
            except ValueError:
                node, inc = sender, 0  # voters have no incarnation
            kept = self._kept.setdefault(node, [])
            if len(kept) >= self.incarnations and inc < kept[0]:
                raise self._refuse(msg, f"incarnation {inc} is older than every one tracked for {node!r}")
            bisect.insort(kept, inc)
            if len(kept) > self.incarnations:
                gone = f"{node}#{kept.pop(0)}"
                self._last.pop(gone, None)
                self._seen.pop(gone, None)
            self._last[sender] = seq
            self._seen[sender] = {seq}
            return
        seen = self._seen[sender]
        if seq > last:
            seen.add(seq)
            if len(seen) > 2 * self.window:
                floor = seq - self.window
                self._seen[sender] = {s for s in seen if s > floor}
            self._last[sender] = seq
            return
        if seq > last - self.window and seq not in seen:
            seen.add(seq)
            return
        raise self._refuse(msg, f"seen before, or older than the newest ({last}) by more than the window "
                           f"of {self.window}")
