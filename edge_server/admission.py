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

:class:`AdaptiveLimit` moves a gate's limit with the process's own event-loop lag (AIMD, in the spirit
of Netflix's concurrency-limits, with CoDel's rule for what counts as a standing queue).  Why the lag
and not the requests' latency: here a request's latency is mostly the skill's (a lognormal of seconds),
which says nothing about this process; what grows without bound when a process takes in more than it
can serve is the time every request waits for the loop to get to it, before any gate or timer sees it.
That wait is the lag.  Requests in flight that wait on the skill cost no CPU; each *admission* does,
so lowering the limit stops admissions at once and frees the loop, and the excess gets a quick 503.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

__all__ = ["QUEUE_FULL", "QUEUE_STALLED", "QUEUE_TIMEOUT", "AdaptiveLimit", "Gate", "RetryBudget"]

QUEUE_FULL = "queue_full"  # shed reason: the queue was full on arrival
QUEUE_TIMEOUT = "queue_timeout"  # shed reason: waited queue_timeout_s without a free slot
QUEUE_STALLED = "queue_stalled"  # shed reason: most recent waiters timed out, so this one was not queued
STALLED_SHARE = 0.5  # the queue is stalled while fewer than this share of recent waiters got a slot
QUEUE_EWMA = 0.05  # weight of one waiter's outcome in that share (about the last 20 waiters)


class Gate:
    """At most ``limit`` holders; a FIFO queue of at most ``queue_max`` with a deadline; counted sheds.

    Use ``if gate.try_enter() or await gate.enter() is None: ... finally gate.leave()``; see
    :meth:`enter` for the reasons a request is refused.  Only the event loop's thread may call it.

    A queue is for bursts: a waiter gets a slot within the queue's deadline when the burst passes.  Under
    sustained overload slots free at the goodput rate while arrivals come ten times faster, so nine in
    ten waiters sit out their deadline and are shed anyway, each having cost a timer, a future and a
    suspended handler.  So the gate follows the share of recent waiters that got a slot
    (:attr:`queue_ok`, an EWMA); below :data:`STALLED_SHARE` an arrival that finds no slot is refused at
    once (``queue_stalled``) unless the queue is empty: one waiter at a time keeps probing, and its
    outcome moves the share back up when slots free in time again.
    """

    __slots__ = ("_waiters", "done", "inflight", "limit", "outcome_at", "pressed", "queue_max", "queue_ok",
                 "queue_timeout_s", "queued", "shed")

    def __init__(self, limit: int, queue_max: int, queue_timeout_s: float) -> None:
        self.limit = limit
        self.pressed = 0  # arrivals that found no free slot (queued or shed): the limit is binding
        self.queue_max = queue_max
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self.done = 0  # slots given back or handed over so far (completions: what frees a slot)
        self.queued = 0  # live waiters (the deque may also hold expired ones, skipped on wake-up)
        self.queue_ok = 1.0  # share of recent waiters that got a slot in time (EWMA)
        self.outcome_at = 0.0  # time.monotonic() of the last waiter's outcome (when queue_ok last moved)
        self.shed = {QUEUE_FULL: 0, QUEUE_TIMEOUT: 0, QUEUE_STALLED: 0}
        self._waiters: deque[asyncio.Future[bool]] = deque()

    def __repr__(self) -> str:
        return f"<Gate inflight={self.inflight}/{self.limit} queued={self.queued}/{self.queue_max} shed={self.shed}>"

    def try_enter(self) -> bool:
        """Take a slot without waiting (the fast path: no coroutine); False when one must queue."""
        if self.inflight < self.limit and not self.queued:
            self.inflight += 1
            return True
        return False

    def refusal(self) -> str | None:
        """Why an arrival that finds no free slot is refused at once, or None when it may queue (no side
        effect: :meth:`refuse` counts a refusal)."""
        if self.queued >= self.queue_max or self.queue_timeout_s <= 0:
            return QUEUE_FULL
        if self.queued and self.queue_ok < STALLED_SHARE:
            return QUEUE_STALLED
        return None

    def unstall(self) -> None:
        """Mark the queue as moving again (the share just at :data:`STALLED_SHARE`): for a caller that saw
        no waiter for a while (the overload has passed, and no waiter came to raise the share); one
        timed-out waiter stalls it again."""
        self.queue_ok = max(self.queue_ok, STALLED_SHARE)

    def refuse(self, reason: str) -> None:
        """Count an arrival refused for ``reason`` without waiting (also pressure on the limit)."""
        self.pressed += 1
        self.shed[reason] = self.shed.get(reason, 0) + 1

    async def enter(self) -> str | None:
        """Wait for a slot; None once holding one, else the shed reason (the caller answers 503)."""
        if self.try_enter():
            return None
        reason = self.refusal()
        if reason is not None:
            self.refuse(reason)
            return reason
        self.pressed += 1
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
        self.queue_ok += QUEUE_EWMA * ((1.0 if granted else 0.0) - self.queue_ok)
        self.outcome_at = time.monotonic()
        if granted:
            return None
        self.shed[QUEUE_TIMEOUT] += 1
        return QUEUE_TIMEOUT

    def _expire(self, fut: asyncio.Future[bool]) -> None:
        if not fut.done():
            self.queued -= 1
            fut.set_result(False)

    def leave(self) -> None:
        """Give the slot back, or hand it straight to the oldest live waiter (unless the limit was
        lowered below the slots held: then the slot is given back)."""
        self.done += 1
        while self._waiters and self.inflight <= self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.queued -= 1
                fut.set_result(True)  # the slot changes hands: inflight stays the same
                return
        self.inflight -= 1

    def set_limit(self, limit: int) -> None:
        """A new limit; slots it frees go to the oldest waiters at once.  A lower limit cuts nobody
        off: requests holding slots finish, and no new one enters until fewer than ``limit`` are held."""
        self.limit = limit
        while self._waiters and self.inflight < limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self.queued -= 1
                self.inflight += 1
                fut.set_result(True)


class AdaptiveLimit:
    """AIMD on a :class:`Gate`'s limit from the event loop's lag.

    Every ``tick_s`` a task sleeps and measures how late it woke (the lag).  The lag counts as a
    standing queue once it has stayed above ``target_s`` for ``interval_s`` (a lag sample of L says the
    loop was late for the last L seconds, so one long stall counts at once) -- CoDel's rule: a burst that
    drains within an interval is no reason to shed.  Then, at most once per interval, the limit drops to
    ``backoff`` x the slots held: admissions stop until enough requests have finished, the loop catches
    up, and the excess is answered with a quick 503.

    Two guards keep a lag that is not ours from starving the service.  Nothing is cut while at most
    ``min_limit`` slots are held (a lag at start-up or at low load is not caused by admissions).  And no
    cut goes below ``keep`` x the most slots recently held while the lag was below the target (that
    figure fades with a half-life of ``good_half_life_s``, but only while the lag is below the target):
    measured on this design's first version, a machine saturated by the load generator and by the cost
    of answering the excess itself kept the lag high whatever the router admitted, and cut after cut
    took its limit from ~1,400 to 150 and the goodput to a third -- shedding more did not bring the
    lag down, only the goodput.

    While the lag is below the target and the limit is binding (an arrival found no free slot, or nine
    tenths of the slots are held) the limit grows once per interval: by ``growth`` x itself, or by a
    quarter while it is below half the slots held before the last cut (a quick return after a brief
    stall).  Without pressure it stays where it is: a limit nobody presses against says nothing.

    :meth:`observe` is the whole control law (pure, driven by the caller's clock); :meth:`run` feeds it.
    """

    __slots__ = ("_above_since", "_ceiling", "_good", "_last_change", "_last_sample", "_pressed", "backoff", "cuts",
                 "gate", "good_half_life_s", "growth", "interval_s", "keep", "lag_s", "max_limit", "min_limit",
                 "target_s", "tick_s")

    def __init__(self, gate: Gate, target_s: float, interval_s: float, min_limit: int, *,
                 max_limit: int | None = None, backoff: float = 0.9, growth: float = 0.1, keep: float = 0.9,
                 good_half_life_s: float = 5.0, tick_s: float = 0.01) -> None:
        self.gate, self.target_s, self.interval_s = gate, target_s, interval_s
        self.max_limit = gate.limit if max_limit is None else max_limit
        self.min_limit = min(min_limit, self.max_limit)
        self.backoff, self.growth, self.keep, self.tick_s = backoff, growth, keep, tick_s
        self.good_half_life_s = good_half_life_s
        self.lag_s = 0.0  # the last lag sample
        self.cuts = 0  # multiplicative decreases so far
        self._above_since: float | None = None  # when the current episode of lag began
        self._good = 0.0  # most slots held recently while the lag was below the target (fading)
        self._last_sample: float | None = None
        self._ceiling = 0  # slots held before the last cut
        self._last_change = -1e18
        self._pressed = gate.pressed

    def __repr__(self) -> str:
        return (f"<AdaptiveLimit limit={self.gate.limit} [{self.min_limit}, {self.max_limit}] "
                f"lag={self.lag_s * 1000:.1f}ms target={self.target_s * 1000:g}ms cuts={self.cuts}>")

    def observe(self, now: float, lag_s: float) -> None:
        """One lag sample taken at ``now`` (seconds on any monotonic clock)."""
        gate = self.gate
        self.lag_s = lag_s
        pressed = gate.pressed != self._pressed
        self._pressed = gate.pressed
        held = min(gate.limit, gate.inflight)
        last, self._last_sample = self._last_sample, now
        if lag_s > self.target_s:
            if self._above_since is None:
                self._above_since = now - lag_s
            if (now - self._above_since >= self.interval_s and now - self._last_change >= self.interval_s
                    and held > self.min_limit):
                new = max(self.min_limit, int(self._good * self.keep), int(held * self.backoff))
                if new < gate.limit:
                    self._ceiling = held
                    gate.set_limit(new)
                    self.cuts += 1
                self._last_change = now
            return
        self._above_since = None
        fade = 0.5 ** ((now - last) / self.good_half_life_s) if last is not None else 1.0
        self._good = max(float(held), self._good * fade)
        if now - self._last_change < self.interval_s or gate.limit >= self.max_limit:
            return
        if pressed or gate.inflight >= 0.9 * gate.limit:
            step = 0.25 if gate.limit < self._ceiling / 2 else self.growth
            gate.set_limit(min(self.max_limit, gate.limit + max(1, int(gate.limit * step))))
            self._last_change = now

    async def run(self) -> None:
        """Sample the loop's lag every ``tick_s`` for ever (cancel to stop)."""
        mono = time.monotonic
        while True:
            t0 = mono()
            await asyncio.sleep(self.tick_s)
            now = mono()
            self.observe(now, max(0.0, now - t0 - self.tick_s))


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
