"""What a hedge's losing try did: the check route's double grants, counted instead of guessed.

A hedge on ``/v1/limits/check`` (a second try on the next region while the first is still unanswered,
:meth:`edge_server.router.Router._tries`) has no commit protocol: both tries carry the body, so when the
first node was slow but alive (paused for less than its try's deadline, CPU-starved, or stalled between
its decision and its answer) it may grant the request as well as the node that answered first.  Two
nodes then spent tokens for one request id (a *double grant*), and the limiter admitted one request but
charged it twice.  The limiter core cannot take such a grant back safely: it is durable in the node's
audit trail and counted in the replicated G-counter, which only grows, so a refund would need a second
(negative) counter replicated and audited alike.  What the router can do at no cost on the hot path is
*see* it: instead of cancelling a losing check try (which closes its connection, so the node's answer,
and whether it granted, is never known) it lets the try finish in the background for as long as its
node may still act on it (its ``X-Edge-Deadline-Ms`` plus one per-try timeout), reads the answer and
counts what the node did:

* ``double_grant``: the loser granted and so did the winner (two grants, one answer);
* ``orphaned_grant``: the loser granted, the winner did not (tokens spent for no answer);
* ``denied`` / ``failed`` (the loser answered without a grant, or broke off), ``unanswered`` (nothing by
  the end of the window: the node is dead, paused past its deadline or blackholed; a node paused past
  the deadline refuses the try when it resumes).

In ``router_hedge_losers_total{route,result}`` on ``/metrics``, in the router's counters
(``double_grants``, ``hedge_orphaned_grants``) and, for the last :data:`RECENT` double grants, with their
request ids and nodes in ``GET /v1/router/state`` (``double_grants_recent``), which the workbench checker
compares with the audit trails.  Only hedged check requests pay for this (a connection held a little
longer, one JSON parse); an unhedged request is untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiohttp

__all__ = ["RECENT", "HedgeWatch", "discard", "first_done", "granted"]

log = logging.getLogger("edge_server.router")

RECENT = 64  # double grants kept with their request ids for /v1/router/state
_BODY_MAX = 64 * 1024  # a check answer is ~150 bytes; read no more than this of a loser's


async def first_done(loop: asyncio.AbstractEventLoop, tasks: list[asyncio.Task[Any]],
                      within_s: float) -> list[asyncio.Task[Any]]:
    """The tasks done after at most ``within_s`` (``asyncio.wait(FIRST_COMPLETED)`` without its sets
    and per-call wrapping: this is on every forwarded request)."""
    done = [t for t in tasks if t.done()]
    if done:
        return done
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for t in tasks:
        t.add_done_callback(wake)
    timer = loop.call_later(within_s, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        for t in tasks:
            t.remove_done_callback(wake)
    return [t for t in tasks if t.done()]


def discard(task: asyncio.Task[aiohttp.ClientResponse]) -> None:
    """A try that lost (or ran on after the request ended): free its connection, keep no exception."""
    if not task.cancelled() and task.exception() is None:
        task.result().release()


def granted(status: int, body: bytes) -> bool:
    """A check answer that spent tokens: a 200 whose JSON says ``"allowed": true``."""
    if status != 200:
        return False
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("allowed") is True


class HedgeWatch:
    """The background watches of one router's losing check tries, and what they found."""

    def __init__(self, counters: dict[str, int], count: Callable[[str, str], None]) -> None:
        self.counters = counters
        self._count = count  # (route, result) -> the Prometheus counter
        self.tasks: set[asyncio.Task[None]] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

    def watch(self, route: str, request_id: str, losers: list[tuple[asyncio.Task[aiohttp.ClientResponse], str, float]],
              winner: str, winner_granted: bool) -> None:
        """Follow each ``(task, node id, seconds left)`` loser to its answer; ``winner`` answered the
        client (``winner_granted``: with a grant)."""
        for task, node, window_s in losers:
            watch = asyncio.ensure_future(self._follow(route, request_id, task, node, window_s, winner, winner_granted))
            self.tasks.add(watch)
            watch.add_done_callback(self.tasks.discard)

    async def _follow(self, route: str, request_id: str, task: asyncio.Task[aiohttp.ClientResponse], node: str,
                      window_s: float, winner: str, winner_granted: bool) -> None:
        result = "unanswered"
        try:
            async with asyncio.timeout(max(0.0, window_s)):
                resp = await task
                try:
                    body = await resp.content.read(_BODY_MAX)
                finally:
                    resp.release()
            if not granted(resp.status, body):
                result = "denied"
            else:
                result = "double_grant" if winner_granted else "orphaned_grant"
        except TimeoutError:
            result = "unanswered"
        except asyncio.CancelledError:  # the router is closing: what the loser did stays unknown
            result = "unanswered"
            raise
        except (aiohttp.ClientError, OSError):
            result = "failed"
        except Exception:  # any other way the try broke off: still no grant seen, and never an unretrieved error
            log.exception("hedge watch: the losing try failed unexpectedly", extra={"request_id": request_id})
            result = "failed"
        finally:
            if not task.done():
                task.cancel()
                task.add_done_callback(_quiet)
            self._count(route, result)
            if result == "double_grant":
                self.counters["double_grants"] += 1
                self.recent.append({"request_id": request_id, "nodes": [winner, node], "at": time.time()})
                log.warning("double grant: a hedged check was granted by both tries",
                            extra={"request_id": request_id, "winner": winner, "loser": node})
            elif result == "orphaned_grant":
                self.counters["hedge_orphaned_grants"] += 1

    async def close(self) -> None:
        """Cancel the watches still running (the router is shutting down)."""
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _quiet(task: asyncio.Task[Any]) -> None:
    """Retrieve a cancelled loser's outcome so asyncio logs nothing, and free its connection."""
    if not task.cancelled() and task.exception() is None:
        task.result().release()
