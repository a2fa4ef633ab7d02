"""Failover, per outage, from the fault's time, for every client the outage affected.

A *client* is a (home region, key) pair.  An outage (see :mod:`workbench.check.outages`) affects
every client of the outage's regions that had a request in its window: sent before the outage
ended and answered (or failed) after it began.  For each such client the clock starts at the fault's
time and stops at the client's first success (2xx, or 429: the limiter answered) from a node that was
healthy when it answered.  Every request of that client in between is counted: *failed* (no answer or
an error status; *timed out* is a subset), *stalled* (answered only after the outage ended, or slower
than ``stall_s``).  A client served only by the outage's own nodes once they came back did not fail
over; a client never served is unserved.  An outage with no affected client measured nothing and
fails.  :class:`FailoverTracker` is fed faults and requests one at a time, so the live view and the
verdict compute the same figures.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from workbench.check.errors import is_error
from workbench.check.outages import OUTAGE_ACTIONS, Outage, OutageLog
from workbench.check.verdict import NOTHING_MEASURED, Verdict, ms, percentile, scenario_of, served
from workbench.history import FaultRecord, Recording, RequestRecord
from workbench.spec.scenario import Topology

__all__ = ["DEFAULT_STALL_S", "FailoverTracker", "check_failover", "failover_times", "judge_failover", "tracker_for"]

DEFAULT_STALL_S = 1.0  # a request answered slower than this during an outage counts as stalled


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    xs = sorted(values)
    return {"p50": ms(percentile(xs, 50)), "p99": ms(percentile(xs, 99)), "max": ms(xs[-1] if xs else None)}


class FailoverTracker:
    """Outages and the requests that may bear on them, fed as they happen; :meth:`figures` judges."""

    def __init__(self, topology: Topology, *, stall_s: float = DEFAULT_STALL_S) -> None:
        self.log = OutageLog(topology)
        self.stall_s = stall_s
        self._kept: dict[str, list[RequestRecord]] = defaultdict(list)  # home region -> requests

    def fault(self, f: FaultRecord) -> None:
        self.log.add(f)

    def request(self, r: RequestRecord) -> None:
        """Keep a request if an outage of its home region had begun by the time it ended."""
        if any(r.home_region in o.regions and o.start_s <= r.end_s for o in self.log.outages):
            self._kept[r.home_region].append(r)

    def _healthy(self, r: RequestRecord) -> bool:
        if r.node:
            return not self.log.down(r.node, r.end_s)
        return bool(r.answered_region) and not self.log.region_down(r.answered_region, r.end_s)

    def _outage(self, o: Outage) -> dict[str, Any]:
        by_client: dict[tuple[str, str], list[RequestRecord]] = defaultdict(list)
        for region in o.regions:
            for r in self._kept.get(region, []):
                if r.end_s >= o.start_s:
                    by_client[(r.home_region, r.key)].append(r)
        clients_ms: dict[str, float] = {}
        failed = timed_out = stalled = unserved = recovered = 0
        first_served = math.inf
        for (home, key), reqs in sorted(by_client.items()):
            if not any(r.intended_s < o.end_s for r in reqs):
                continue  # its requests all came after the outage: not affected
            reqs.sort(key=lambda r: r.end_s)
            success = next((r for r in reqs if served(r) and self._healthy(r)), None)
            stop = success.end_s if success is not None else math.inf
            for r in reqs:
                if r.intended_s > stop or r.cut_at_end:  # cut off by the run's end: neither failed nor stalled
                    continue
                if is_error(r):
                    failed += 1
                    timed_out += r.status == 0 and r.error.startswith("timeout")
                elif (r.intended_s < o.end_s <= r.end_s) or r.latency_ms > self.stall_s * 1000:
                    stalled += 1
            name = key if len(o.regions) == 1 else f"{home}/{key}"
            if success is None:
                unserved += 1
                continue
            if success.node in o.nodes or (not success.node and success.answered_region in o.regions
                                           and stop >= o.end_s):
                recovered += 1  # served only once the outage's own nodes were back
            clients_ms[name] = (stop - o.start_s) * 1000
            first_served = min(first_served, stop)
        n_clients = len(clients_ms) + unserved
        return {
            "kind": o.kind, "target": o.target, "region": o.target, "regions": list(o.regions),
            "nodes": sorted(o.nodes), "death_s": o.start_s, "back_s": None if o.end_s == math.inf else o.end_s,
            "clients": n_clients, "served_clients": len(clients_ms) - recovered,
            "served_after_recovery": recovered, "unserved": unserved,
            "unserved_clients": unserved + recovered,  # never served elsewhere
            "failed_requests": failed, "timed_out_requests": timed_out, "stalled_requests": stalled,
            "region_ms": None if first_served == math.inf else ms((first_served - o.start_s) * 1000),
            **{f"{k}_ms": v for k, v in _stats(list(clients_ms.values())).items()},
            "clients_ms": {k: ms(v) for k, v in sorted(clients_ms.items())},
        }

    def figures(self, kinds: Iterable[str] = OUTAGE_ACTIONS) -> dict[str, Any]:
        """Per outage, per kind and over all: p50 / p99 / max of client failover times, clients,
        failed, timed-out and stalled requests, unserved clients."""
        wanted = set(kinds)
        outages = [self._outage(o) for o in self.log.outages if o.kind in wanted]
        all_ms = [v for o in outages for v in o["clients_ms"].values()]
        by_kind: dict[str, dict[str, Any]] = {}
        for kind in sorted({o["kind"] for o in outages}):
            mine = [o for o in outages if o["kind"] == kind]
            by_kind[kind] = {"outages": len(mine), **_stats([v for o in mine for v in o["clients_ms"].values()]),
                             **{k: sum(o[k] for o in mine) for k in (
                                 "clients", "served_after_recovery", "unserved", "unserved_clients",
                                 "failed_requests", "timed_out_requests", "stalled_requests")}}
        total = {k: sum(o[k] for o in outages) for k in (
            "clients", "unserved_clients", "failed_requests", "timed_out_requests", "stalled_requests")}
        return {**_stats(all_ms), "outages": outages, "by_kind": by_kind, **total}


def tracker_for(rec: Recording, *, stall_s: float = DEFAULT_STALL_S) -> FailoverTracker | None:
    """A tracker fed with a whole recording (faults in time order, then requests by end time)."""
    scenario = scenario_of(rec)
    if scenario is None:
        return None
    tracker = FailoverTracker(scenario.topology, stall_s=stall_s)
    for f in sorted(rec.faults, key=lambda f: f.t_s):
        tracker.fault(f)
    for r in sorted(rec.requests, key=lambda r: r.end_s):
        tracker.request(r)
    return tracker


def failover_times(rec: Recording, *, actions: Sequence[str] = OUTAGE_ACTIONS,
                   stall_s: float = DEFAULT_STALL_S) -> dict[str, Any]:
    """The failover figures of the outages of the given kinds (see the module docstring)."""
    tracker = tracker_for(rec, stall_s=stall_s)
    if tracker is None:
        return {"p50": None, "p99": None, "max": None, "outages": [], "by_kind": {}, "clients": 0,
                "unserved_clients": 0, "failed_requests": 0, "timed_out_requests": 0, "stalled_requests": 0}
    return tracker.figures(actions)


def judge_failover(figures: dict[str, Any], *, planned: Iterable[str] = (), applied: Iterable[str] = (),
                   max_failover_ms: float | None = None) -> Verdict:
    """The verdict on failover figures (shared by :func:`check_failover` and the live view)."""
    reasons: list[str] = []
    outages = figures["outages"]
    for action in sorted(set(planned) - set(applied)):
        reasons.append(f"the scenario plans a {action} but none was applied: {NOTHING_MEASURED}")
    for o in outages:
        label = f"{o['kind']} {o['target']} at {o['death_s']:.3f}s"
        if not o["clients"]:
            reasons.append(f"{label}: {NOTHING_MEASURED} (no client of {', '.join(o['regions'])} "
                           "sent a request during it)")
        if o["unserved"]:
            reasons.append(f"{label}: {o['unserved']} of {o['clients']} clients never served again")
        if o["served_after_recovery"]:
            reasons.append(f"{label}: {o['served_after_recovery']} of {o['clients']} clients served only "
                           "when the outage ended (never by a healthy node elsewhere)")
    if max_failover_ms is not None:
        p99 = figures["p99"]
        if not outages:
            reasons.append(f"a failover bound of {max_failover_ms:g} ms was set but no outage happened: "
                           f"{NOTHING_MEASURED}")
        elif p99 is not None and p99 > max_failover_ms:
            reasons.append(f"p99 {p99} ms > allowed {max_failover_ms:g} ms")
    figures = {**figures, "applicable": bool(outages) or max_failover_ms is not None,
               "looked_at": (f"{len(outages)} outages, {figures['clients']} affected clients"
                             if outages else "no outage in the fault records (not applicable)")}
    return Verdict(not reasons, reasons, figures)


def check_failover(rec: Recording, *, max_failover_ms: float | None = None,
                   stall_s: float = DEFAULT_STALL_S) -> Verdict:
    """Every outage measured something; every affected client was served again by a healthy node
    elsewhere; and, when given, the p99 over clients is within ``max_failover_ms``."""
    scenario = scenario_of(rec)
    if scenario is None:
        return Verdict(False, ["no valid scenario in the recording: topology unknown"], {})
    planned = {f.action for f in scenario.faults if f.action in ("kill", "pause", "blackhole")}
    applied = {f.action for f in rec.faults}
    return judge_failover(failover_times(rec, stall_s=stall_s), planned=planned, applied=applied,
                          max_failover_ms=max_failover_ms)

