"""A first start or a lost disk? What a replicating node does when it finds no trail of its own.

An empty data directory looks the same after a node's first start and after its disk was lost.
The holders of its replica (:func:`~edge_server.audit.replica.replica_holders`, in other regions)
can tell them apart: before it is ready, the node asks each of them how much of its trail it holds
(``GET /v1/audit/replica/held?origin=ID&nonce=N``, answered signed, with the nonce, so an answer
of an earlier start cannot be replayed).

* a holder holds events of it: it lost its disk -- it rebuilds its trail from the holder holding
  the most (:func:`~edge_server.audit.replica.rebuild_from_replica`), then recovers and serves;
* every holder answers "none": a new node -- it starts a fresh trail;
* a holder does not answer within ``[audit] holders_wait_s``: it may hold the trail, nobody else
  can say.  ``[audit] holders_unanswered`` decides: ``"refuse"`` (the default) exits 3 rather
  than serve from zero -- a copy may exist, and a node that starts from zero hands out its counts
  again and forks its own chain; ``"start_fresh"`` serves, and should the holder turn up with an
  older trail, the node's replication stops in *conflict* (``/metrics``, logs), both trails kept.

:func:`decide` is the rule alone (pure, unit-tested); :func:`ask_holders` the asking.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

import aiohttp
import orjson

from edge_server.audit.log import AuditLog
from edge_server.audit.replica import PATH, rebuild_from_replica, verify
from edge_server.config import AuditConfig, NodeSpec
from edge_server.wire import SIGNATURE_HEADER

__all__ = ["HELD_PATH", "Bootstrap", "BootstrapRefused", "ask_holders", "bootstrap_trail", "decide"]

log = logging.getLogger("edge_server.audit.bootstrap")
HELD_PATH = PATH + "/held"
RETRY_S = 0.2  # between two rounds of asking the holders that did not answer yet


class BootstrapRefused(RuntimeError):
    """The node must not start: a holder that may hold its trail did not answer."""


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """What a node without a trail does: ``"rebuild"`` from ``holder``, ``"fresh"``, or ``"refuse"``."""

    action: str
    holder: str | None
    answers: dict[str, int | None]  # holder -> newest seq it holds of the node (None: no answer)

    def describe(self) -> str:
        said = ", ".join(f"{h}: {'no answer' if s is None else f'{s} events' if s else 'none'}"
                         for h, s in self.answers.items())
        return said or "no holder (a single region)"


def decide(answers: dict[str, int | None], unanswered: str) -> Bootstrap:
    """The rule (see the module docstring) over the holders' answers, in the order they were asked
    (the first holding the most wins a tie).  ``unanswered`` is ``[audit] holders_unanswered``."""
    best = max(answers, key=lambda h: answers[h] or 0, default=None)
    if best is not None and (answers[best] or 0) > 0:
        return Bootstrap("rebuild", best, dict(answers))
    if any(seq is None for seq in answers.values()) and unanswered == "refuse":
        return Bootstrap("refuse", None, dict(answers))
    return Bootstrap("fresh", None, dict(answers))


async def _ask(session: aiohttp.ClientSession, me: NodeSpec, holder: NodeSpec, secret: bytes) -> int:
    """How much of ``me``'s trail ``holder`` holds; raises on no answer, or one that is not signed,
    not fresh (another nonce) or not about ``me``."""
    nonce = secrets.token_hex(16)
    async with session.get(f"{holder.url}{HELD_PATH}?origin={me.id}&nonce={nonce}") as resp:
        body = await resp.read()
        if resp.status != 200:
            raise ValueError(f"{holder.id} answered {resp.status}: {body[:200]!r}")
        if not verify(secret, body, resp.headers.get(SIGNATURE_HEADER)):
            raise ValueError(f"{holder.id}'s answer is not signed with the cluster secret")
    doc = orjson.loads(body)
    if doc.get("nonce") != nonce or doc.get("origin") != me.id or doc.get("holder") != holder.id:
        raise ValueError(f"{holder.id}'s answer is not the answer to this question (replayed or misrouted)")
    seq = doc.get("last_seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError(f"{holder.id}'s answer has no valid last_seq")
    return seq


async def ask_holders(me: NodeSpec, holders: list[NodeSpec], secret: bytes, wait_s: float) -> dict[str, int | None]:
    """Ask every holder, again every ``RETRY_S`` those that did not answer, until all answered or
    ``wait_s`` is over; ``holder id -> newest seq held`` (None: no valid answer)."""
    answers: dict[str, int | None] = {h.id: None for h in holders}
    errors: dict[str, str] = {}
    deadline = time.monotonic() + wait_s
    timeout = aiohttp.ClientTimeout(total=2, connect=1)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            pending = [h for h in holders if answers[h.id] is None]
            results = await asyncio.gather(*(_ask(session, me, h, secret) for h in pending), return_exceptions=True)
            for holder, result in zip(pending, results, strict=True):
                if isinstance(result, BaseException):
                    if not isinstance(result, aiohttp.ClientError | TimeoutError | OSError | ValueError):
                        raise result
                    errors[holder.id] = f"{result.__class__.__name__}: {result}"
                else:
                    answers[holder.id] = result
            if all(seq is not None for seq in answers.values()) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(RETRY_S, max(0.0, deadline - time.monotonic())))
    for holder_id, error in errors.items():
        if answers[holder_id] is None:
            log.warning("replica holder did not answer", extra={"holder": holder_id, "error": error})
    return answers


async def bootstrap_trail(audit: AuditLog, me: NodeSpec, holders: list[NodeSpec], secret: bytes,
                          settings: AuditConfig, source: str) -> Bootstrap:
    """Decide (and do) what a node with no trail of its own does; raises :class:`BootstrapRefused`
    with a message naming the holders and the setting when it must not start."""
    answers = await ask_holders(me, holders, secret, settings.holders_wait_s)
    choice = decide(answers, settings.holders_unanswered)
    if choice.action == "refuse":
        silent = ", ".join(h for h, seq in answers.items() if seq is None)
        raise BootstrapRefused(
            f"no audit trail of its own, and its replica holder(s) {silent} did not answer within "
            f"{settings.holders_wait_s:g} s: one may hold its trail (a lost disk). Start them, or set "
            f'[audit] holders_unanswered = "start_fresh" in {source} to serve from a fresh trail')
    if choice.action == "fresh":
        log.info("no replica holder holds events of this node: a fresh trail", extra={"holders": choice.describe()})
        return choice
    holder = next(h for h in holders if h.id == choice.holder)
    audit.open()
    try:
        events = await rebuild_from_replica(audit, me, holder, secret, within_s=settings.holders_wait_s)
    finally:
        audit.close()
    log.warning("audit trail rebuilt from its replica", extra={"holder": holder.id, "events": events,
                                                               "holders": choice.describe()})
    return choice
