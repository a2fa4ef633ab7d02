"""The envelope: for each key and every window [s, t], tokens admitted <= B + R (t - s) + allowance.

Two independent checks.  :func:`check_envelope` reads the grants (the nodes' audit trails when there
are any: exact grant times, and grants whose reply was lost).  :func:`check_envelope_counter` trusts
no server: it takes what the clients saw, Jepsen's counter rule, and counts every request of unknown
outcome (sent, then a timeout, a reset or a router 502 / 504) as admitted, so the upper bound holds
whatever the audit trails say.  Both state the allowance they used and its inputs.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from workbench.check.errors import unknown_outcome
from workbench.check.verdict import NOTHING_MEASURED, Verdict, percentile, run_seconds, scenario_of
from workbench.history import Recording
from workbench.spec.scenario import Scenario

__all__ = [
    "DELIVERY_ALLOWANCE_S",
    "admission_intervals",
    "admissions",
    "allowance_inputs",
    "check_envelope",
    "check_envelope_counter",
    "default_slack_s",
    "max_interval_window_excess",
    "max_window_excess",
]

DELIVERY_ALLOWANCE_S = 0.05  # a gossip message's trip: HTTP, event-loop scheduling, merge (measured ~5-40 ms)
GOSSIP_LAG_METRIC = "edge_gossip_lag_seconds"  # per peer: time since the last acknowledged exchange


def default_slack_s(scenario: Scenario | None) -> float:
    """Staleness eventual mode allows: what a node admits before its peers learn of it, about two
    gossip intervals plus one delivery, plus any latency the scenario adds to links."""
    if scenario is None or scenario.mode == "strict":  # strict mode promises the plain envelope
        return 0.0
    return 2 * scenario.topology.gossip_interval_ms / 1000.0 + DELIVERY_ALLOWANCE_S + _added_latency_s(scenario)


def _added_latency_s(scenario: Scenario) -> float:
    return max((f.ms + f.jitter_ms for f in scenario.faults if f.action == "latency"), default=0.0) / 1000.0


def allowance_inputs(rec: Recording, slack_s: float, tolerance_tokens: float = 0.0) -> dict[str, Any]:
    """What the allowance is made of, for the verdict to state: ``tolerance + R * slack_s`` with
    ``slack_s`` = 2 gossip intervals + delivery + added latency by default, and the gossip lag the
    nodes measured (their ``edge_gossip_lag_seconds`` at the final scrape) beside it."""
    scenario = scenario_of(rec)
    lags = sorted(m.value * 1000 for m in rec.metrics if m.name == GOSSIP_LAG_METRIC)
    measured = None if not lags else {"p50": round(percentile(lags, 50) or 0.0, 3),
                                      "max": round(lags[-1], 3), "samples": len(lags)}
    return {
        "formula": "tolerance_tokens + R * slack_s",
        "slack_s": round(slack_s, 6),
        "tolerance_tokens": tolerance_tokens,
        "gossip_interval_ms": None if scenario is None else scenario.topology.gossip_interval_ms,
        "delivery_allowance_ms": DELIVERY_ALLOWANCE_S * 1000,
        "added_latency_ms": None if scenario is None else round(_added_latency_s(scenario) * 1000, 3),
        "default_slack_s": None if scenario is None else round(default_slack_s(scenario), 6),
        "measured_gossip_lag_ms": measured,
    }


def admissions(rec: Recording, source: str = "auto") -> dict[str, list[tuple[float, int]]]:
    """Per key, the (run-clock time, cost) of every admission, sorted by time.

    ``audit`` takes the nodes' audit trails (grant time on the node: exact, and it also counts
    tokens whose reply was lost); ``client`` takes the send time of every admitted request;
    ``client_upper`` adds every request of unknown outcome to ``client`` (Jepsen's upper bound);
    ``auto`` uses the audit trails when there are any.
    """
    if source not in ("auto", "audit", "client", "client_upper"):
        raise ValueError(f"source must be auto, audit, client or client_upper, not {source!r}")
    out: dict[str, list[tuple[float, int]]] = defaultdict(list)
    if source == "audit" or (source == "auto" and rec.audit):
        base = rec.started_wall
        for ev in rec.audit:
            out[ev.key].append((ev.ts - base, ev.cost))
    else:
        upper = source == "client_upper"
        for r in rec.requests:
            if r.admitted or (upper and unknown_outcome(r)):
                out[r.key].append((r.start_s, r.cost))
    for items in out.values():
        items.sort()
    return dict(out)


def max_window_excess(events: Sequence[tuple[float, int]], rate: float, burst: float) -> tuple[float, float, float]:
    """The worst ``admitted[s, t] - (B + R (t - s))`` over all windows, and that window ``(s, t)``.

    ``events`` are (time, cost) sorted by time.  With prefix sums P, a window from event j to event k
    holds ``P[k] - P[j-1]``, so excess(k) = (P[k] - R t_k) - min over j <= k of (P[j-1] - R t_j) - B:
    one pass with a running minimum, O(n).  Returns ``(-B, 0, 0)`` for no events.
    """
    best, best_s, best_t = -burst, 0.0, 0.0
    low, low_t = math.inf, 0.0
    prefix = 0.0
    for t, cost in events:
        start = prefix - rate * t  # a window that starts at this event excludes everything before it
        if start < low:
            low, low_t = start, t
        prefix += cost
        excess = prefix - rate * t - low - burst
        if excess > best:
            best, best_s, best_t = excess, low_t, t
    return best, best_s, best_t


def _judge(rec: Recording, by_key: dict[str, list[Any]], *, tolerance_tokens: float,
           slack_s: float, label: str) -> tuple[list[str], dict[str, Any]]:
    """Per-key windows and the run figures shared by both envelope checks.

    Events are ``(t, cost)`` (an exact grant time) or ``(a, b, cost)`` (a grant somewhere in ``[a, b]``,
    judged by :func:`max_interval_window_excess`)."""
    scenario = scenario_of(rec)
    assert scenario is not None
    run_s = run_seconds(rec, scenario)
    keys = sorted(set(by_key) | {r.key for r in rec.requests})
    reasons: list[str] = []
    per_key: dict[str, dict[str, Any]] = {}
    admitted_total = envelope_total = over_total = 0.0
    worst = -math.inf
    for key in keys:
        limit = scenario.limit_for(key)
        events = by_key.get(key, [])
        admitted = float(sum(e[-1] for e in events))
        if limit is None:
            if events:
                reasons.append(f"key {key!r}: {admitted:g} tokens {label} but no limit matches it")
            continue
        envelope = limit.burst + limit.rate * max(run_s, events[-1][0] if events else 0.0)
        if events and len(events[0]) == 3:
            excess, s, t = max_interval_window_excess(events, limit.rate, limit.burst)
        else:
            excess, s, t = max_window_excess(events, limit.rate, limit.burst)
        allowed = tolerance_tokens + limit.rate * slack_s
        per_key[key] = {"admitted": admitted, "envelope": envelope, "allowance_tokens": round(allowed, 3),
                        "over_admission_pct": round((admitted / envelope - 1) * 100, 2),
                        "worst_excess": round(excess, 3), "worst_window_s": [round(s, 6), round(t, 6)]}
        admitted_total += admitted
        envelope_total += envelope
        over_total += max(0.0, admitted - envelope)
        worst = max(worst, excess)
        if excess > allowed + 1e-6:  # float noise of R·t is not over-admission
            reasons.append(f"key {key!r}: {excess:.1f} tokens {label} over B + R·(t-s) in [{s:.3f}s, {t:.3f}s] "
                           f"(allowance {allowed:.1f} = {tolerance_tokens:g} + {limit.rate:g}/s x {slack_s:.3f} s; "
                           f"burst {limit.burst:g})")
    figures = {
        "admitted_tokens": admitted_total, "envelope_tokens": envelope_total,
        # signed: negative is under-admission (the cluster served less than the limit allows)
        "over_admission_pct": round((admitted_total / envelope_total - 1) * 100, 2) if envelope_total else None,
        # only the keys that went over, so one key's headroom cannot hide another key's excess
        "over_admitted_keys_pct": round(over_total / envelope_total * 100, 2) if envelope_total else None,
        "worst_excess_tokens": None if worst == -math.inf else round(worst, 3),
        "run_s": run_s, "keys": per_key,
    }
    return reasons, figures


def check_envelope(rec: Recording, *, tolerance_tokens: float = 0.0, slack_s: float = 0.0,
                   source: str = "auto") -> Verdict:
    """Every key's admissions in every window [s, t] must stay <= B + R (t - s) + allowance.

    The allowance is ``tolerance_tokens + R * slack_s`` (``slack_s``: staleness the mode allows, see
    :func:`default_slack_s`); the verdict's ``allowance`` figure states it with its inputs.
    ``over_admission_pct`` is signed: admitted / (B + R T) - 1 summed over keys, T the run length.
    """
    if scenario_of(rec) is None:
        return Verdict(False, ["no valid scenario in the recording: limits unknown"], {})
    if source == "auto":
        source = "audit" if rec.audit else "client"
    by_key = admissions(rec, source)
    reasons, figures = _judge(rec, by_key, tolerance_tokens=tolerance_tokens, slack_s=slack_s, label="admitted")
    n = sum(len(v) for v in by_key.values())
    figures.update(source=source, allowance=allowance_inputs(rec, slack_s, tolerance_tokens),
                   looked_at=f"{n} grants from the {'audit trails' if source == 'audit' else 'client replies'} "
                             f"over {len(figures['keys'])} keys")
    if not by_key and not rec.requests:
        reasons.append(f"{NOTHING_MEASURED}: no grant and no request recorded")
    return Verdict(not reasons, reasons, figures)


def admission_intervals(rec: Recording) -> dict[str, list[tuple[float, float, int]]]:
    """Per key, when each possible grant must have happened as the clients saw it: ``(a, b, cost)``.

    An acknowledged grant happened on the node after the request left the client and before its
    answer came back, so in ``[start_s, end_s]``.  A request of unknown outcome may have been granted
    at any time after it was sent, even after the client gave up (a paused node resumes and serves
    what it holds), so its interval runs to the end of the history.  Sorted by ``a``.
    """
    end = max((r.end_s for r in rec.requests), default=0.0)
    out: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for r in rec.requests:
        if r.admitted:
            out[r.key].append((r.start_s, max(r.start_s, r.end_s), r.cost))
        elif unknown_outcome(r):
            out[r.key].append((r.start_s, max(end, r.start_s), r.cost))
    for items in out.values():
        items.sort()
    return dict(out)


def max_interval_window_excess(intervals: Sequence[tuple[float, float, int]], rate: float,
                               burst: float) -> tuple[float, float, float]:
    """The worst ``certain[s, t] - (B + R (t - s))``, where ``certain[s, t]`` counts only the grants whose
    interval ``[a, b]`` lies inside ``[s, t]``: grants that happened in that window whatever the network
    and queueing delays were.  So an excess here is proven by the clients' view alone, never an artefact
    of requests sent in a burst and served over time.

    Windows start at some ``a`` and end at some ``b``.  Sweeping ``s`` over the ``a`` values from the
    latest down, each grant with ``a >= s`` adds its cost to every window end ``t >= b``; a segment tree
    over the sorted ``b`` values holds ``certain(s, t) - R t`` and answers the best ``t >= s``: O(n log n).
    Returns ``(-B, 0, 0)`` for no intervals.
    """
    if not intervals:
        return -burst, 0.0, 0.0
    ends = sorted({b for _a, b, _c in intervals})
    index = {b: i for i, b in enumerate(ends)}
    tree = _SuffixMaxTree([-rate * b for b in ends])
    order = sorted(intervals, key=lambda x: x[0], reverse=True)
    best, best_s, found = -burst, 0.0, False
    i = 0
    while i < len(order):
        s = order[i][0]
        while i < len(order) and order[i][0] == s:
            _a, b, cost = order[i]
            tree.add_suffix(index[b], cost)
            i += 1
        excess = tree.max_suffix(_first_at_or_after(ends, s)) + rate * s - burst
        if excess > best:
            best, best_s, found = excess, s, True
    if not found:
        return best, 0.0, 0.0
    # the window's end, for the verdict: one linear pass for the best start
    acc, best_t, top = 0.0, best_s, -math.inf
    for b, cost in sorted((b, c) for a, b, c in intervals if a >= best_s):
        acc += cost
        if acc - rate * b > top:
            top, best_t = acc - rate * b, b
    return best, best_s, best_t


def _first_at_or_after(values: Sequence[float], x: float) -> int:
    return bisect.bisect_left(values, x)


class _SuffixMaxTree:
    """Range add on a suffix and max over a suffix of a fixed array (iterative lazy segment tree)."""

    def __init__(self, values: Sequence[float]) -> None:
        n = self.n = len(values)
        self.h = max(1, n.bit_length())
        self.t = [0.0] * n + list(values)
        self.d = [0.0] * n
        for p in range(n - 1, 0, -1):
            self.t[p] = max(self.t[2 * p], self.t[2 * p + 1])

    def _apply(self, p: int, v: float) -> None:
        self.t[p] += v
        if p < self.n:
            self.d[p] += v

    def _build(self, p: int) -> None:
        while p > 1:
            p >>= 1
            self.t[p] = max(self.t[2 * p], self.t[2 * p + 1]) + self.d[p]

    def _push(self, p: int) -> None:
        for sh in range(self.h, 0, -1):
            i = p >> sh
            if i and self.d[i]:
                self._apply(2 * i, self.d[i])
                self._apply(2 * i + 1, self.d[i])
                self.d[i] = 0.0

    def add_suffix(self, k: int, v: float) -> None:
        lo, hi = k + self.n, 2 * self.n
        l0, r0 = lo, hi
        while lo < hi:
            if lo & 1:
                self._apply(lo, v)
                lo += 1
            if hi & 1:
                hi -= 1
                self._apply(hi, v)
            lo >>= 1
            hi >>= 1
        self._build(l0)
        self._build(r0 - 1)

    def max_suffix(self, k: int) -> float:
        if k >= self.n:
            return -math.inf
        lo, hi = k + self.n, 2 * self.n
        self._push(lo)
        self._push(hi - 1)
        res = -math.inf
        while lo < hi:
            if lo & 1:
                res = max(res, self.t[lo])
                lo += 1
            if hi & 1:
                hi -= 1
                res = max(res, self.t[hi])
            lo >>= 1
            hi >>= 1
        return res


def check_envelope_counter(rec: Recording, *, tolerance_tokens: float = 0.0, slack_s: float = 0.0) -> Verdict:
    """Jepsen's counter rule from the clients alone: acknowledged grants plus every request of
    unknown outcome (counted as admitted) must fit the same envelope.

    Each possible grant is placed in the interval the clients saw (:func:`admission_intervals`) and a
    window counts only the grants certainly inside it (:func:`max_interval_window_excess`), so network
    and queueing delays cannot make a compliant cluster fail, while a real excess still shows.

    It needs no audit trail, so a node that forgets to audit, or audits what it never granted, cannot
    make it pass.  ``lower_bound_tokens`` (acknowledged) and ``upper_bound_tokens`` are reported.
    """
    if scenario_of(rec) is None:
        return Verdict(False, ["no valid scenario in the recording: limits unknown"], {})
    upper = admission_intervals(rec)
    reasons, figures = _judge(rec, upper, tolerance_tokens=tolerance_tokens, slack_s=slack_s,
                              label="acknowledged or of unknown outcome")
    acked = sum(r.cost for r in rec.requests if r.admitted)
    unknown = [r for r in rec.requests if unknown_outcome(r)]
    figures.update(lower_bound_tokens=float(acked), upper_bound_tokens=figures["admitted_tokens"],
                   unknown_outcome_requests=len(unknown), unknown_outcome_tokens=sum(r.cost for r in unknown),
                   source="client_upper", allowance=allowance_inputs(rec, slack_s, tolerance_tokens),
                   looked_at=f"{len(rec.requests)} client requests ({len(unknown)} of unknown outcome "
                             "counted as admitted)")
    if not rec.requests:
        reasons.append(f"{NOTHING_MEASURED}: no request recorded")
    return Verdict(not reasons, reasons, figures)
