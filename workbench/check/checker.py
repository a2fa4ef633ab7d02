"""Invariant checks and figures over a :class:`~workbench.history.Recording`: pure functions, no I/O.

Each ``check_*`` returns a :class:`Verdict` (ok, human reasons, figures); the figure helpers return
plain dicts; :func:`summarize` assembles the summary the CLI prints and writes with ``--json``.
Percentiles are exact nearest-rank over all samples (no interpolation, no histogram buckets): the
p-th percentile is the smallest sample such that at least p % of samples are <= it.  Milliseconds in
summaries are rounded to 0.001 ms, percentages to 0.01.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from workbench.history import Recording, RequestRecord, StateSample
from workbench.spec.scenario import Scenario, ScenarioError

__all__ = [
    "Verdict",
    "admissions",
    "check_convergence",
    "check_envelope",
    "check_token_loss",
    "client_errors",
    "default_slack_s",
    "failover_times",
    "latency_percentiles",
    "max_window_excess",
    "percentile",
    "summarize",
    "throughput",
]


@dataclass
class Verdict:
    """The outcome of one check: ``ok``, why not (one line per problem) and the measured figures."""

    ok: bool
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty); p in [0, 100]."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _scenario(rec: Recording) -> Scenario | None:
    try:
        return Scenario.from_dict(rec.scenario) if rec.scenario else None
    except (ScenarioError, TypeError):
        return None


def _run_seconds(rec: Recording, scenario: Scenario | None) -> float:
    """The run's length: the load's planned duration (the run clock starts with the load), else the
    recorded end, else the span of the requests.  The recorded end also counts the drain and the final
    scrape after the load stopped, so it would inflate the envelope."""
    if scenario is not None:
        return scenario.duration_s
    if rec.ended_s is not None and rec.ended_s > 0:
        return float(rec.ended_s)
    return max((r.end_s for r in rec.requests), default=0.0)


# ----------------------------------------------------------------------------- envelope
def admissions(rec: Recording, source: str = "auto") -> dict[str, list[tuple[float, int]]]:
    """Per key, the (run-clock time, cost) of every admission, sorted by time.

    ``audit`` takes the nodes' audit trails (grant time on the node: exact, and it also counts
    tokens whose reply was lost); ``client`` takes the send time of every admitted request;
    ``auto`` uses the audit trails when there are any.
    """
    if source not in ("auto", "audit", "client"):
        raise ValueError(f"source must be auto, audit or client, not {source!r}")
    out: dict[str, list[tuple[float, int]]] = defaultdict(list)
    if source == "audit" or (source == "auto" and rec.audit):
        base = rec.started_wall
        for ev in rec.audit:
            out[ev.key].append((ev.ts - base, ev.cost))
    else:
        for r in rec.requests:
            if r.admitted:
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


def check_envelope(rec: Recording, *, tolerance_tokens: float = 0.0, slack_s: float = 0.0,
                   source: str = "auto") -> Verdict:
    """Every key's admissions in every window [s, t] must stay <= B + R (t - s).

    A window may exceed by ``tolerance_tokens + R * slack_s`` (``slack_s``: staleness the mode allows,
    e.g. a couple of gossip intervals).  Over-admission % of a key = admitted / (B + R T) - 1 over the
    run length T; the run figure sums only the keys' excesses, so one key cannot hide another.
    """
    scenario = _scenario(rec)
    if scenario is None:
        return Verdict(False, ["no valid scenario in the recording: limits unknown"], {})
    run_s = _run_seconds(rec, scenario)
    if source == "auto":
        source = "audit" if rec.audit else "client"
    by_key = admissions(rec, source)
    keys = sorted(set(by_key) | {r.key for r in rec.requests})
    reasons: list[str] = []
    per_key: dict[str, dict[str, Any]] = {}
    admitted_total = envelope_total = excess_total = 0.0
    worst = -math.inf
    for key in keys:
        limit = scenario.limit_for(key)
        events = by_key.get(key, [])
        admitted = float(sum(c for _t, c in events))
        if limit is None:
            if events:
                reasons.append(f"key {key!r}: {admitted:g} tokens admitted but no limit matches it")
            continue
        envelope = limit.burst + limit.rate * max(run_s, events[-1][0] if events else 0.0)
        excess, s, t = max_window_excess(events, limit.rate, limit.burst)
        allowed = tolerance_tokens + limit.rate * slack_s
        per_key[key] = {"admitted": admitted, "envelope": envelope,
                        "over_admission_pct": round((admitted / envelope - 1) * 100, 2),
                        "worst_excess": round(excess, 3), "worst_window_s": [round(s, 6), round(t, 6)]}
        admitted_total += admitted
        envelope_total += envelope
        excess_total += max(0.0, admitted - envelope)
        worst = max(worst, excess)
        if excess > allowed + 1e-6:  # float noise of R·t is not over-admission
            reasons.append(f"key {key!r}: {excess:.1f} tokens over B + R·(t-s) in [{s:.3f}s, {t:.3f}s] "
                           f"(allowed {allowed:.1f}; rate {limit.rate:g}/s, burst {limit.burst:g})")
    over_pct = round(excess_total / envelope_total * 100, 2) if envelope_total else 0.0
    figures = {"admitted_tokens": admitted_total, "envelope_tokens": envelope_total,
               "over_admission_pct": over_pct, "worst_excess_tokens": None if worst == -math.inf else round(worst, 3),
               "run_s": run_s, "keys": per_key, "source": source}
    return Verdict(not reasons, reasons, figures)


# ----------------------------------------------------------------------------- token loss
def check_token_loss(rec: Recording, *, inflight_s: float = 0.25) -> Verdict:
    """Every admitted reply is audited exactly once, and every node's counters match its audit trail.

    Per node and key, the count a node holds for itself (its last /v1/state, its current generation)
    must equal the audited cost of that generation.  Events within ``inflight_s`` before or after the
    snapshot may not be committed yet; such a gap is reported as unverified, not as loss.
    """
    reasons: list[str] = []
    audit_ids = Counter(ev.request_id for ev in rec.audit if ev.request_id)
    audit_cost = {ev.request_id: ev.cost for ev in rec.audit if ev.request_id}
    admitted = [r for r in rec.requests if r.admitted]
    no_id = sum(1 for r in admitted if not r.request_id)
    missing = [r.request_id for r in admitted if r.request_id and r.request_id not in audit_ids]
    # A node killed after auditing a grant but before answering: the router retried the request
    # elsewhere under the same id.  The tokens were spent twice (both are in the envelope), the client
    # got one answer; that is an orphaned grant at a kill, reported, not a lost token.
    kills = [(rec.started_wall + f.t_s, f.target) for f in rec.faults if f.action in ("kill", "pause")]
    node_events: dict[str, list[Any]] = defaultdict(list)
    for ev in rec.audit:
        if ev.request_id and audit_ids[ev.request_id] > 1:
            node_events[ev.request_id].append(ev)
    orphaned: list[str] = []
    duplicated: list[str] = []
    for rid, events in sorted(node_events.items()):
        nodes = {ev.node for ev in events}
        died = [ev for ev in events if any(abs(t - ev.ts) <= inflight_s and target in (ev.node, ev.region)
                                           for t, target in kills)]
        if len(nodes) == len(events) and len(events) - len(died) <= 1 and died:
            orphaned.append(rid)
        else:
            duplicated.append(rid)
    cost_mismatch = [r.request_id for r in admitted if r.request_id in audit_cost
                     and audit_ids[r.request_id] == 1 and audit_cost[r.request_id] != r.cost]
    if missing:
        reasons.append(f"{len(missing)} admitted replies have no audit event (e.g. {missing[:3]})")
    if duplicated:
        reasons.append(f"{len(duplicated)} request ids are audited more than once (e.g. {duplicated[:3]})")
    if cost_mismatch:
        reasons.append(f"{len(cost_mismatch)} audited costs differ from the request's (e.g. {cost_mismatch[:3]})")

    audited: dict[tuple[str, str, int], list[tuple[float, int]]] = defaultdict(list)
    for ev in rec.audit:
        audited[(ev.node, ev.key, ev.gen)].append((ev.ts, ev.cost))
    last: dict[str, StateSample] = {}
    for s in rec.states:
        if s.node not in last or s.t_s >= last[s.node].t_s:
            last[s.node] = s
    answered_ids = {r.request_id for r in admitted}
    mismatched: list[str] = []
    unverified: list[str] = []
    for node, sample in sorted(last.items()):
        for key, entries in sorted(sample.counts.items()):
            if node not in entries:
                continue
            gen, count = entries[node]
            events = audited.get((node, key, gen), [])
            total = sum(c for _t, c in events)
            settled = sum(c for t, c in events if t <= sample.wall - inflight_s)
            where = f"{node} key {key!r} gen {gen}: counter {count}, audited {total}"
            if count > total or count < settled:
                mismatched.append(where)
            elif count != total:
                unverified.append(where + " (events near or after its last snapshot)")
    if mismatched:
        reasons.append(f"{len(mismatched)} node counters disagree with their audit trail: " + "; ".join(mismatched[:3]))
    silent = sorted({ev.node for ev in rec.audit} - set(last))
    figures = {"admitted_replies": len(admitted), "audit_events": len(rec.audit), "missing": len(missing),
               "duplicated": len(duplicated), "orphaned_at_kill": len(orphaned),
               "cost_mismatch": len(cost_mismatch), "mismatched": len(mismatched),
               "unverified": unverified, "replies_without_request_id": no_id, "nodes_without_state": silent,
               "unanswered_grants": sum(1 for rid in audit_ids if rid not in answered_ids),
               "token_loss": len(missing) + len(duplicated) + len(cost_mismatch) + len(mismatched)}
    return Verdict(not reasons, reasons, figures)


# ----------------------------------------------------------------------------- convergence
def check_convergence(rec: Recording, *, within_intervals: float = 2.0) -> Verdict:
    """After the last heal, every live node learns every other node's entries within N gossip intervals.

    A heal is a ``heal`` fault or the timed end of a partition (``end_partition``).
    For each pair (A, B): B's own entries in its first snapshot after the heal are the reference; A
    has converged on B at its first snapshot whose view of B is at least that.  Snapshots are discrete,
    so A learnt it between its previous snapshot and that one: the check fails only when even the
    earlier bound is late.  ``convergence_ms`` is the upper bound, from the heal.
    """
    scenario = _scenario(rec)
    heals = [f.t_s for f in rec.faults if f.action in ("heal", "end_partition")]
    if not heals:
        return Verdict(True, [], {"heal_s": None, "convergence_ms": None})
    if scenario is None:
        return Verdict(False, ["no valid scenario in the recording: gossip interval unknown"], {})
    heal = max(heals)
    bound_s = within_intervals * scenario.topology.gossip_interval_ms / 1000.0
    by_node: dict[str, list[StateSample]] = defaultdict(list)
    for s in sorted(rec.states, key=lambda s: s.t_s):
        by_node[s.node].append(s)
    before = {n: [s for s in xs if s.t_s < heal] for n, xs in by_node.items()}
    after = {n: [s for s in xs if s.t_s >= heal] for n, xs in by_node.items()}
    live = sorted(n for n, xs in after.items() if xs)
    reasons: list[str] = []
    worst_upper = worst_lower = 0.0
    for b in live:
        ref = after[b][0]
        own = {k: e[b] for k, e in ref.counts.items() if b in e}
        for a in live:
            if a == b:
                continue
            prev_t = before[a][-1].t_s if before[a] else heal
            caught = None
            for s in after[a]:
                if all(s.counts.get(k, {}).get(b, (-1, -1)) >= e for k, e in own.items()):
                    caught = s
                    break
                prev_t = s.t_s
            if caught is None:
                reasons.append(f"{a} never caught up with {b}'s counts of {ref.t_s:.3f}s after the heal at {heal:.3f}s")
                continue
            worst_upper = max(worst_upper, caught.t_s - heal)
            lower = max(0.0, prev_t - ref.t_s)
            worst_lower = max(worst_lower, lower)
            if lower > bound_s:
                reasons.append(f"{a} learnt {b}'s counts at least {lower * 1000:.0f} ms after {b} had them "
                               f"(allowed {bound_s * 1000:.0f} ms = {within_intervals:g} gossip intervals)")
    figures = {"heal_s": heal, "nodes": live, "convergence_ms": _ms(worst_upper * 1000),
               "propagation_lower_bound_ms": _ms(worst_lower * 1000), "allowed_ms": _ms(bound_s * 1000)}
    if len(live) < 2:
        figures["note"] = "fewer than two nodes sampled after the heal"
    return Verdict(not reasons, reasons, figures)


# ----------------------------------------------------------------------------- failover
_DOWN = {"kill": "restart", "pause": "resume"}


def _region_outages(rec: Recording, scenario: Scenario, actions: Iterable[str]) -> list[tuple[str, float, float]]:
    """(region, when its last node went down, when one came back or +inf) from the applied faults."""
    topo, down_actions = scenario.topology, set(actions)
    down: set[str] = set()
    open_: dict[str, float] = {}
    out = []
    for f in sorted(rec.faults, key=lambda f: f.t_s):
        try:
            nodes = topo.resolve(f.target) if f.target else ()
        except KeyError:
            continue
        if f.action in down_actions:
            down |= set(nodes)
        elif f.action in {_DOWN[a] for a in down_actions if a in _DOWN}:
            down -= set(nodes)
        else:
            continue
        for region in topo.regions:
            dead = set(topo.nodes_of(region)) <= down
            if dead and region not in open_:
                open_[region] = f.t_s
            elif not dead and region in open_:
                out.append((region, open_.pop(region), f.t_s))
    out += [(region, t, math.inf) for region, t in open_.items()]
    return sorted(out, key=lambda x: x[1])


def _served(r: RequestRecord) -> bool:
    return 200 <= r.status < 300 or r.status == 429


def failover_times(rec: Recording, *, actions: Sequence[str] = ("kill",)) -> dict[str, Any]:
    """Per region outage: time from death to its clients' first served reply from another region.

    A client is a (home region, key) pair.  Its failover time runs from the moment it first needed
    service after the death (the death, or its first later request) to its first reply served (2xx
    or 429) by another region, before the region came back.  ``p50/p99/max`` are over all clients
    of all outages; ``region_ms`` is death -> first such reply of any client.
    """
    scenario = _scenario(rec)
    empty = {"p50": None, "p99": None, "max": None, "outages": [], "unserved_clients": 0}
    if scenario is None:
        return empty
    by_home: dict[str, list[RequestRecord]] = defaultdict(list)
    for r in rec.requests:
        by_home[r.home_region].append(r)
    all_ms: list[float] = []
    outages, unserved = [], 0
    for region, death, back in _region_outages(rec, scenario, actions):
        need: dict[str, float] = {}
        served: dict[str, float] = {}
        for r in by_home.get(region, []):
            if r.end_s < death or r.intended_s >= back:
                continue
            need[r.key] = min(need.get(r.key, math.inf), max(death, r.intended_s))
            if _served(r) and r.answered_region and r.answered_region != region and r.end_s < back:
                served[r.key] = min(served.get(r.key, math.inf), r.end_s)
        clients = {k: (served[k] - need[k]) * 1000 for k in served}
        all_ms += clients.values()
        unserved += len(set(need) - set(served))
        first = min(served.values(), default=None)
        outages.append({"region": region, "death_s": death, "back_s": None if back == math.inf else back,
                        "region_ms": None if first is None else _ms((first - death) * 1000),
                        "clients": len(need), "unserved_clients": len(set(need) - set(served)),
                        "clients_ms": {k: _ms(v) for k, v in sorted(clients.items())}})
    all_ms.sort()
    return {"p50": _ms(percentile(all_ms, 50)), "p99": _ms(percentile(all_ms, 99)),
            "max": _ms(all_ms[-1] if all_ms else None), "outages": outages, "unserved_clients": unserved}


# ----------------------------------------------------------------------------- client-side figures
def client_errors(rec: Recording) -> dict[str, Any]:
    """Replies a client would see as failures: connection errors (status 0) and non-2xx non-429."""
    errors = [r for r in rec.requests if not _served(r)]
    retried = [r for r in rec.requests if r.retried_from]
    return {"total": len(errors), "requests": len(rec.requests),
            "retried": len(retried), "retried_errors": sum(1 for r in retried if not _served(r)),
            "rate": round(len(errors) / len(rec.requests), 6) if rec.requests else 0.0,
            "by_status": {str(k): v for k, v in sorted(Counter(r.status for r in errors).items())},
            "by_error": dict(Counter(r.error or str(r.status) for r in errors).most_common(10)),
            "first_s": min((r.intended_s for r in errors), default=None)}


def latency_percentiles(requests: Iterable[RequestRecord], percentiles: Sequence[float] = (50, 95, 99), *,
                        measure: str = "latency", include_errors: bool = False) -> dict[str, Any]:
    """Exact nearest-rank percentiles in ms; keys ``p50`` ... plus ``max`` and ``count``.

    ``latency`` counts from the intended send time (what a user waits, including generator lag and
    queueing); ``service`` from the actual send.  Connection errors are left out unless asked.
    """
    attr = {"latency": "latency_ms", "service": "service_ms"}[measure]
    values = sorted(getattr(r, attr) for r in requests if include_errors or r.status != 0)
    out: dict[str, Any] = {f"p{p:g}": _ms(percentile(values, p)) for p in percentiles}
    out["max"] = _ms(values[-1] if values else None)
    out["count"] = len(values)
    return out


def throughput(rec: Recording) -> dict[str, Any]:
    """Replies per second over the load's span (first intended send to last reply)."""
    reqs = rec.requests
    if not reqs:
        return {"throughput_rps": 0.0, "ok_rps": 0.0, "admitted_tokens_per_s": 0.0, "span_s": 0.0, "requests": 0}
    span = max(r.end_s for r in reqs) - min(r.intended_s for r in reqs)
    answered = sum(1 for r in reqs if r.status != 0)
    ok = sum(1 for r in reqs if r.admitted)
    tokens = sum(r.cost for r in reqs if r.admitted)
    per = (lambda n: round(n / span, 3)) if span > 0 else (lambda n: 0.0)
    return {"throughput_rps": per(answered), "ok_rps": per(ok), "admitted_tokens_per_s": per(tokens),
            "span_s": round(span, 6), "requests": len(reqs)}


# ----------------------------------------------------------------------------- summary
DELIVERY_ALLOWANCE_S = 0.05  # a gossip message's trip: HTTP, event-loop scheduling, merge (measured ~5-40 ms)


def default_slack_s(scenario: Scenario | None) -> float:
    """Staleness eventual mode allows: what a node admits before its peers learn of it, about two
    gossip intervals plus one delivery, plus any latency the scenario adds to links."""
    if scenario is None:
        return 0.0
    added = max((f.ms + f.jitter_ms for f in scenario.faults if f.action == "latency"), default=0.0)
    return 2 * scenario.topology.gossip_interval_ms / 1000.0 + DELIVERY_ALLOWANCE_S + added / 1000.0


def summarize(rec: Recording, *, envelope_slack_s: float | None = None, tolerance_tokens: float = 0.0,
              convergence_intervals: float = 2.0, max_client_errors: int | None = None,
              max_failover_ms: float | None = None, require_complete: bool = True) -> dict[str, Any]:
    """The run's summary (the keys of ``workbench drill --json``) and whether every invariant held.

    Invariants: the envelope (with ``envelope_slack_s``, default :func:`default_slack_s`: the
    staleness eventual mode allows), no token loss, convergence after heal, a complete run; and, when
    given, at most ``max_client_errors`` errors and failover p99 within ``max_failover_ms``.
    """
    scenario = _scenario(rec)
    if envelope_slack_s is None:
        envelope_slack_s = default_slack_s(scenario)
    env = check_envelope(rec, tolerance_tokens=tolerance_tokens, slack_s=envelope_slack_s)
    loss = check_token_loss(rec)
    conv = check_convergence(rec, within_intervals=convergence_intervals)
    fo = failover_times(rec)
    errs = client_errors(rec)
    lat = latency_percentiles(rec.requests, (50, 95, 99))
    thr = throughput(rec)
    checks = {"envelope": env.ok, "token_loss": loss.ok, "convergence": conv.ok,
              "complete": rec.complete or not require_complete}
    reasons = [f"envelope: {r}" for r in env.reasons] + [f"token loss: {r}" for r in loss.reasons]
    reasons += [f"convergence: {r}" for r in conv.reasons]
    if not rec.complete:
        reasons.append(f"run incomplete: {rec.incomplete_reason or 'no reason recorded'}")
    if max_client_errors is not None:
        checks["client_errors"] = errs["total"] <= max_client_errors
        if not checks["client_errors"]:
            reasons.append(f"client errors: {errs['total']} > {max_client_errors} ({errs['by_error']})")
    if max_failover_ms is not None:
        p99 = fo["p99"]
        checks["failover"] = fo["unserved_clients"] == 0 and (p99 is None or p99 <= max_failover_ms)
        if not checks["failover"]:
            reasons.append(f"failover: p99 {p99} ms (allowed {max_failover_ms:g}), "
                           f"{fo['unserved_clients']} clients never served elsewhere")
    generator = rec.extra.get("generator") or {}
    if generator.get("valid") is False:
        reasons.append("figures distorted: the load generator fell behind its schedule ("
                       + "; ".join(generator.get("invalid_reasons") or []) + ")")
    return {
        "generator_valid": generator.get("valid"),
        "generator_lag_p99_ms": (generator.get("lag_ms") or {}).get("p99"),
        "admitted_tokens": env.figures.get("admitted_tokens", 0.0),
        "envelope_tokens": env.figures.get("envelope_tokens", 0.0),
        "over_admission_pct": env.figures.get("over_admission_pct", 0.0),
        "failover_ms": {"p50": fo["p50"], "p99": fo["p99"], "max": fo["max"]},
        "client_errors": errs["total"],
        "retried_requests": errs["retried"],
        "retried_errors": errs["retried_errors"],
        "token_loss": loss.figures.get("token_loss", 0),
        "throughput_rps": thr["throughput_rps"],
        "latency_ms": {"p50": lat["p50"], "p95": lat["p95"], "p99": lat["p99"]},
        "invariants_ok": all(checks.values()),
        "reasons": reasons,
        "checks": checks,
        "worst_window_excess_tokens": env.figures.get("worst_excess_tokens"),
        "envelope_slack_s": envelope_slack_s,
        "convergence_ms": conv.figures.get("convergence_ms"),
        "complete": rec.complete,
        "requests": len(rec.requests),
    }
