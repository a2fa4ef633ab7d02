"""Admission control shared by the router and the nodes: a concurrency gate with a short queue, and a
retry budget.

Why a gate and not only a limit: past its capacity a server that accepts everything gets slower for
everyone (its event loop lags, every answer waits behind every other) until clients time out and the
goodput collapses.  :class:`Gate` lets at most ``limit`` requests be served at once; the next
``queue_max`` wait in FIFO order for at most ``queue_timeout_s``; the rest are refused at once.  A
refused request costs one counter update and a small 503 with ``Retry-After`` -- no skill call, no
token -- so the excess is answered in well under a millisecond instead of hanging.

:class:`RetryBudget` is Finagle's: retries may add at most ``ratio`` of the recent requests (over a
sliding 10 s) plus ``min_per_s`` a second, so a fault that makes every try time out cannot turn into
a retry storm that doubles the load on the regions that are left.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

__all__ = ["QUEUE_FULL", "QUEUE_TIMEOUT", "Gate", "RetryBudget"]

QUEUE_FULL = "queue_full"  # shed reason: the queue was full on arrival
QUEUE_TIMEOUT = "queue_timeout"  # shed reason: waited queue_timeout_s without a free slot


class Gate:
    """At most ``limit`` holders; a FIFO queue of at most ``queue_max`` with a deadline; counted sheds.

    Use ``if gate.try_enter() or await gate.enter() is None: ... finally gate.leave()``; see
    :meth:`enter` for the reasons a request is refused.  Only the event loop's thread may call it.
    """

    __slots__ = ("_waiters", "inflight", "limit", "queue_max", "queue_timeout_s", "queued", "shed")

    def __init__(self, limit: int, queue_max: int, queue_timeout_s: float) -> None:
        self.limit = limit
        self.queue_max = queue_max
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self.queued = 0  # live waiters (the deque may also hold expired ones, skipped on wake-up)
        self.shed = {QUEUE_FULL: 0, QUEUE_TIMEOUT: 0}
        self._waiters: deque[asyncio.Future[bool]] = deque()

    def __repr__(self) -> str:
        return f"<Gate inflight={self.inflight}/{self.limit} queued={self.queued}/{self.queue_max} shed={self.shed}>"

    def try_enter(self) -> bool:
        """Take a slot without waiting (the fast path: no coroutine); False when one must queue."""
        if self.inflight < self.limit and not self.queued:
            self.inflight += 1
            return True
        return False

    async def enter(self) -> str | None:
        """Wait for a slot; None once holding one, else the shed reason (the caller answers 503)."""
        if self.try_enter():
            return None
        if self.queued >= self.queue_max or self.queue_timeout_s <= 0:
            self.shed[QUEUE_FULL] += 1
            return QUEUE_FULL
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        self.queued += 1
        timer = loop.call_later(self.queue_timeout_s, self._expire, fut)
        try:
            granted = await fut
        except asyncio.CancelledError:  # the client went away while queued
            if fut.done() and not fut.cancelled() and fut.result():
                self.leave()  # a slot was handed over just before the cancel: give it on
            elif not fut.done() or fut.cancelled():
                self.queued -= 1
            raise
        finally:
            timer.cancel()
        if granted:
            return None
        self.shed[QUEUE_TIMEOUT] += 1
        return QUEUE_TIMEOUT

    def _expire(self, fut: asyncio.Future[bool]) -> None:
        if not fut.done():
            self.queued -= 1
            fut.set_result(False)

    def leave(self) -> None:
        """Give the slot back, or hand it straight to the oldest live waiter."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.queued -= 1
                fut.set_result(True)  # the slot changes hands: inflight stays the same
                return
        self.inflight -= 1


class RetryBudget:
    """Retries allowed: ``ratio`` x requests of the last ``window_s`` + ``min_per_s`` x ``window_s``,
    minus the retries already made in that window (per-second slots, so it costs O(window))."""

    __slots__ = ("_requests", "_retries", "_slot", "clock", "min_per_s", "ratio", "window_s")

    def __init__(self, ratio: float, min_per_s: float, clock: Callable[[], float] = time.monotonic,
                 window_s: int = 10) -> None:
        self.ratio, self.min_per_s, self.window_s, self.clock = ratio, min_per_s, window_s, clock
        self._requests = [0] * window_s
        self._retries = [0] * window_s
        self._slot = int(clock())

    def __repr__(self) -> str:
        return f"<RetryBudget left={self.left():.1f} ratio={self.ratio} min_per_s={self.min_per_s}>"

    def _roll(self) -> int:
        now = int(self.clock())
        if now != self._slot:
            for s in range(max(self._slot + 1, now - self.window_s + 1), now + 1):
                self._requests[s % self.window_s] = 0
                self._retries[s % self.window_s] = 0
            self._slot = now
        return now % self.window_s

    def request(self) -> None:
        """Count one first try (a deposit of ``ratio``)."""
        self._requests[self._roll()] += 1

    def left(self) -> float:
        self._roll()
        return (self.ratio * sum(self._requests) + self.min_per_s * self.window_s) - sum(self._retries)

    def try_retry(self) -> bool:
        """Withdraw one retry if the budget has one."""
        if self.left() < 1:
            return False
        self._retries[self._roll()] += 1
        return True
