"""Convergence: after every heal and every restart, how long until every live node agrees.

An *event* is a network heal (``heal``, or the timed end of a partition / blackhole), a ``restart``
or a ``resume``.  For a restart or a resume the clock starts when the returning node serves its first
client request after it (a cold node is not ready until its peers sent their baselines, and what it
knows before it serves admits nothing), or, if it served none, when it first answers its state.
For each pair (A, B) of nodes sampled after that, B's own entries in its first sample are the
reference; A agrees with B at its first sample whose view of B is at least that.  Samples are
discrete, so A learnt it between its previous sample and that one:

- ``upper`` = that sample's time - the event: the time to agreement reported (p50 / max over events);
- ``lower`` = the previous sample's time - B's reference time: the check fails when even the lower
  bound is past the bound (N gossip intervals);
- a pair whose two samples are further apart than twice the bound cannot tell, and fails as
  "sampled too coarsely": a sparse sampler must not pass a slow cluster.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from workbench.check.envelope import DELIVERY_ALLOWANCE_S
from workbench.check.verdict import (
    NOTHING_MEASURED,
    Verdict,
    ms,
    percentile,
    scenario_of,
    served,
    spend_publication_delay_s,
)
from workbench.history import Recording, StateSample

__all__ = ["CONVERGENCE_EVENTS", "check_convergence", "convergence_events"]

CONVERGENCE_EVENTS = ("heal", "end_partition", "end_blackhole", "restart", "resume")
_NO_ENTRY = (-1, -1)


def convergence_events(rec: Recording) -> list[tuple[float, str, str]]:
    """(time, action, target) of every event after which nodes must converge, in time order."""
    return sorted((f.t_s, f.action, f.target) for f in rec.faults if f.action in CONVERGENCE_EVENTS)


def _one_event(by_node: dict[str, list[StateSample]], t_event: float, returning: tuple[str, ...],
               end: float, bound_s: float, served_at: float | None) -> tuple[list[str], dict[str, Any]]:
    after = {n: [s for s in xs if t_event <= s.t_s < end] for n, xs in by_node.items()}
    starts = [after[n][0].t_s for n in returning if after.get(n)] if served_at is None else [served_at]
    start = max([t_event, *starts])
    after = {n: [s for s in xs if s.t_s >= start] for n, xs in after.items()}
    live = sorted(n for n, xs in after.items() if xs)
    reasons: list[str] = []
    upper = lower = gap_worst = 0.0
    pairs = 0
    for b in live:
        ref = after[b][0]
        own = {k: e[b] for k, e in ref.counts.items() if b in e}
        for a in live:
            if a == b:
                continue
            prev_t = start
            caught = None
            for s in after[a]:
                if all(s.counts.get(k, {}).get(b, _NO_ENTRY) >= e for k, e in own.items()):
                    caught = s
                    break
                prev_t = s.t_s
            if caught is None:
                reasons.append(f"{a} never caught up with {b}'s counts of {ref.t_s:.3f}s")
                continue
            pairs += 1
            upper = max(upper, caught.t_s - start)
            low = max(0.0, prev_t - ref.t_s)
            lower = max(lower, low)
            gap = caught.t_s - max(prev_t, ref.t_s) if caught.t_s > ref.t_s + bound_s else 0.0
            gap_worst = max(gap_worst, gap)
            if low > bound_s:
                reasons.append(f"{a} learnt {b}'s counts at least {low * 1000:.0f} ms after {b} had them "
                               f"(allowed {bound_s * 1000:.0f} ms)")
            elif gap > 2 * bound_s:
                reasons.append(f"{a}'s samples around its catch-up of {b} are {gap * 1000:.0f} ms apart: "
                               "sampled too coarsely to check the bound")
    if not pairs and not reasons:
        reasons.append(f"{NOTHING_MEASURED}: fewer than two nodes sampled after it")
    return reasons, {"start_s": round(start, 6), "nodes": live, "pairs": pairs,
                     "agreement_ms": ms(upper * 1000) if pairs else None,
                     "lower_bound_ms": ms(lower * 1000) if pairs else None,
                     "unresolved_gap_ms": ms(gap_worst * 1000)}


def check_convergence(rec: Recording, *, within_intervals: float = 2.0, max_ms: float | None = None) -> Verdict:
    """After every heal and restart, every live node learns every other's entries within the bound;
    "not applicable" (ok, and said so) when nothing healed or restarted.

    The bound is ``within_intervals`` gossip intervals plus one delivery (the envelope's
    ``DELIVERY_ALLOWANCE_S``: HTTP, event-loop scheduling, merge), or ``max_ms`` when given (a stated
    threshold for a loaded host); the verdict states which.  In strict mode the bound adds the
    nodes' own publication delay of a spend (``SPEND_DELAY_S``): a strict node publishes a key's
    spends that long after the first of them, unless another change of the key goes sooner (only it
    ever spends its rights, so peers' views of them are for reading).  Without it a strict drill's
    heal on six nodes failed at 97-109 ms against 90."""
    events = convergence_events(rec)
    if not events:
        return Verdict(True, [], {"heal_s": None, "convergence_ms": None, "events": [],
                                  "applicable": False, "note": "not applicable: nothing healed or restarted",
                                  "looked_at": "no heal, restart or resume in the fault records"})
    scenario = scenario_of(rec)
    if scenario is None:
        return Verdict(False, ["no valid scenario in the recording: gossip interval unknown"], {})
    if max_ms is not None:
        bound_s, bound_rule = max_ms / 1000.0, f"max_convergence_ms = {max_ms:g}"
    else:
        bound_s = within_intervals * scenario.topology.gossip_interval_ms / 1000.0 + DELIVERY_ALLOWANCE_S
        bound_rule = (f"{within_intervals:g} gossip intervals of {scenario.topology.gossip_interval_ms:g} ms "
                      f"+ {DELIVERY_ALLOWANCE_S * 1000:g} ms delivery")
        publication = spend_publication_delay_s(scenario)
        if publication:
            bound_s += publication
            bound_rule += f" + {publication * 1000:g} ms strict spend publication delay"
    by_node: dict[str, list[StateSample]] = defaultdict(list)
    for s in sorted(rec.states, key=lambda s: s.t_s):
        by_node[s.node].append(s)
    reasons: list[str] = []
    per_event: list[dict[str, Any]] = []
    for i, (t, action, target) in enumerate(events):
        end = events[i + 1][0] if i + 1 < len(events) else float("inf")
        returning: tuple[str, ...] = ()
        if action in ("restart", "resume"):
            try:
                returning = scenario.topology.resolve(target)
            except KeyError:
                returning = ()
        served_at = min((r.end_s for r in rec.requests if r.node in returning and served(r)
                         and t <= r.end_s < end), default=None) if returning else None
        why, fig = _one_event(by_node, t, returning, end, bound_s, served_at)
        label = f"{action}{' ' + target if target else ''} at {t:.3f}s"
        reasons += [f"{label}: {w}" for w in why]
        per_event.append({"event": label, "t_s": t, "ok": not why, **fig})
    agreed = sorted(e["agreement_ms"] for e in per_event if e["agreement_ms"] is not None)
    samples = sum(len(v) for v in by_node.values())
    figures = {
        "heal_s": events[-1][0], "applicable": True, "events": per_event,
        "convergence_ms": agreed[-1] if agreed else None,
        "convergence_p50_ms": percentile(agreed, 50), "convergence_max_ms": agreed[-1] if agreed else None,
        "allowed_ms": ms(bound_s * 1000), "bound_rule": bound_rule, "within_intervals": within_intervals,
        "looked_at": f"{len(events)} heal / restart events, {samples} state samples of {len(by_node)} nodes",
    }
    return Verdict(not reasons, reasons, figures)
