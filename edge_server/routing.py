"""The router's routing table and its rules of evidence: where a client goes, and when a node leaves
or rejoins rotation.  No I/O: time comes from the clock given, results come in as values, so every
rule is tested with a manual clock (``tests/edge_server/test_router.py``).

Why the rules are what they are (``docs/router.md`` is the long form): the worst outage a front door
can cause is the one it inflicts on itself -- overloaded, it sees every node as slow, ejects them all
and answers ``no_healthy_region`` while every region is fine.  So

* only *evidence* takes a node out: refused, unreachable or reset (hard: the process is not serving),
  ``fall`` timed-out checks in a row, or ``timeout_eject_count`` timed-out tries in a row on a node that
  had answered; a slow connect only demotes a node, and a timeout judged while our own loop lagged
  counts for nothing;
* :meth:`RoutingTable.take_out` is the one way out of rotation, and it never leaves more than
  ``max_ejected_share`` of the nodes out: past that, the node stays in, demoted below clean nodes;
* with fewer than ``panic_threshold`` of the nodes in rotation (start-up, nodes rising after a
  restart), nodes out of rotation *without* failure evidence take traffic as if they were in;
* as a last resort any node without hard evidence is used: ``no_healthy_region`` is answered only
  when every node refused or reset its connections.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from edge_server.config import ClusterConfig, NodeSpec
from edge_server.router_health import HARD, CheckResult, NodeHealth
from edge_server.router_metrics import RouterMetrics

__all__ = ["RoutingTable"]

log = logging.getLogger("edge_server.router")

COUNTERS = ("forwarded", "retried", "failed", "shed", "ejections", "ejections_refused", "ejections_swapped",
            "no_healthy",
            "overload_shed", "panic_picks", "last_resort_picks", "checks_late", "retry_budget_exhausted",
            "lagged_timeouts", "checks_slow", "not_written", "invoke_tries_cancelled",
            "hedges_deferred", "double_grants", "hedge_orphaned_grants")


class RoutingTable:
    """Nodes, regions nearest first, health state and the ejection cap of one router."""

    def __init__(self, config: ClusterConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        rc = self.rc = config.router
        self.clock = clock
        self.nodes = {n.id: NodeHealth(n) for n in config.nodes}
        self.regions = {r.name: tuple(self.nodes[n.id] for n in r.nodes) for r in config.regions}
        self.default_region = config.regions[0].name
        self.order = {home: self._order(home) for home in self.regions}
        self._rr = {name: itertools.count() for name in self.regions}
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.metrics = RouterMetrics()
        self.max_out = math.floor(rc.max_ejected_share * len(self.nodes) + 1e-9)  # nodes out at once, at most
        self._panic_below = rc.panic_threshold * len(self.nodes)
        self._refusal_logged: dict[str, float] = {}
        self.loop_lag_s = 0.0  # recent lag of our own loop (set by the router's lag watch)
        self._lag_due = math.inf  # when the lag watch should wake up next
        # Out-of-turn health check of a node (set by the router to its checker's check_soon).
        self.probe: Callable[[NodeSpec], None] | None = None

    def _order(self, home: str) -> tuple[str, ...]:
        """Regions nearest first from ``home``; a missing entry falls back to the reverse direction."""
        lat = self.rc.latency_ms
        index = {name: i for i, name in enumerate(self.regions)}

        def distance(region: str) -> float:
            if region == home:
                return 0.0
            return lat.get(home, {}).get(region, lat.get(region, {}).get(home, math.inf))

        return tuple(sorted(self.regions, key=lambda r: (distance(r), index[r])))

    # ------------------------------------------------------------------------------ routing

    def in_panic(self, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return sum(1 for n in self.nodes.values() if n.healthy and now >= n.ejected_until) < self._panic_below

    def pick(self, home: str, exclude_region: str | None = None, exclude_node: NodeHealth | None = None,
             probe: bool = False) -> NodeHealth | None:
        """The next node for a client of ``home``: nearest region first, round-robin inside it, in tiers:

        1. in rotation with no failure evidence (in panic also: out of rotation with no evidence);
        2. in rotation with evidence (kept in by the cap, or one timeout so far), fewest failures first;
        3. last resort: any node without hard evidence, fewest failures first.

        ``probe``: only look (no turn taken, nothing counted), for :meth:`routing`.
        """
        now = self.clock()
        panic = self.in_panic(now)
        second: list[tuple[int, int, NodeHealth]] = []  # (failures in a row, region rank, node)
        third: list[tuple[int, int, NodeHealth]] = []
        for rank, region in enumerate(self.order[home]):
            if region == exclude_region:
                continue
            clean: list[NodeHealth] = []
            for n in self.regions[region]:
                if n is exclude_node:
                    continue
                usable = n.healthy and now >= n.ejected_until
                if n.evidence is None and (usable or panic):
                    clean.append(n)
                elif usable:
                    second.append((n.fail + n.timeouts, rank, n))
                elif n.evidence not in HARD:
                    third.append((n.fail + n.timeouts, rank, n))
            if clean:
                node = clean[next(self._rr[region]) % len(clean)] if len(clean) > 1 and not probe else clean[0]
                if panic and not probe and not (node.healthy and now >= node.ejected_until):
                    self.counters["panic_picks"] += 1
                return node
        # Tiers 2 and 3: the fewest failures in a row first (a node the cap kept in after many
        # timeouts comes after one that timed out once), then the nearest region.
        tier = second or third
        if not tier:
            return None
        if tier is third and not probe:
            self.counters["last_resort_picks"] += 1
        best = min(t[:2] for t in tier)
        nodes = [t[2] for t in tier if t[:2] == best]
        if len(nodes) == 1 or probe:
            return nodes[0]
        return nodes[next(self._rr[nodes[0].spec.region]) % len(nodes)]

    def routing(self) -> dict[str, str | None]:
        """Where each home region's clients go right now."""
        out: dict[str, str | None] = {}
        for home in self.order:
            node = self.pick(home, probe=True)
            out[home] = node.spec.region if node is not None else None
        return out

    # ------------------------------------------------------------------------------ evidence

    def take_out(self, node: NodeHealth, reason: str, seconds: float, error: str | None = None) -> bool:
        """The one way out of rotation (checks, passive ejection, overload pauses), under the cap.

        ``overloaded`` only pauses traffic for ``seconds``; anything else also demands ``rise`` good
        checks.  Refused when it would leave more than ``max_ejected_share`` of the nodes out: the node
        stays in, demoted by its evidence, and the next evidence tries again.
        """
        now = self.clock()
        if reason != "overloaded":
            node.evidence = reason
            node.last_error = error or reason
        if node.usable(now):
            out = sum(1 for n in self.nodes.values() if not n.usable(now))
            if out + 1 > self.max_out and reason != "overloaded" and self._swap_back(now):
                out -= 1
            if out + 1 > self.max_out:
                self.counters["ejections_refused"] += 1
                self.metrics.ejections_refused.labels(node.spec.id, reason).inc()
                if now - self._refusal_logged.get(node.spec.id, -math.inf) >= 1.0:  # once a second at most
                    self._refusal_logged[node.spec.id] = now
                    log.warning("ejection refused by the cap", extra={"node": node.spec.id, "reason": reason,
                                                                      "out": out, "error": error})
                return False
        was_usable = node.usable(now)
        node.ejected_until = max(node.ejected_until, now + seconds)
        if reason != "overloaded":
            node.healthy = False
            node.ok = 0
            node.rise_needed = self.rc.rise
        if not was_usable:
            return True  # already out: the ejection is only extended, not counted again
        self.counters["ejections"] += 1
        self.metrics.ejections.labels(node.spec.id, reason).inc()
        log.warning("node out of rotation", extra={"node": node.spec.id, "reason": reason, "error": error,
                                                   "seconds": seconds})
        return True

    def _swap_back(self, now: float) -> bool:
        """The cap is full: put back the out-of-rotation node that has answered since it was taken out
        (no evidence left; most good checks), so that a node failing right now can take its place.
        Without this one false ejection on a busy machine would keep a dead node in rotation."""
        back = [n for n in self.nodes.values() if not n.usable(now) and n.evidence is None and n.ok > 0]
        if not back:
            return False
        node = max(back, key=lambda n: n.ok)
        node.healthy, node.ejected_until = True, now
        self.counters["ejections_swapped"] += 1
        log.info("node back in rotation to make room under the cap", extra={"node": node.spec.id,
                                                                             "checks_ok": node.ok})
        return True

    def apply_check(self, node: NodeHealth, result: CheckResult) -> None:
        """One active check result: hysteresis, the rules of evidence and the cap."""
        m = self.metrics
        if result.kind == "slow":  # unanswered for health_suspect_ms: demoted until an answer, no more
            m.health_results.labels(node.spec.id, "slow").inc()
            if result.started >= node.last_good_started and node.evidence is None:
                node.evidence = "check_slow"
                self.counters["checks_slow"] += 1
            return
        node.checks += 1
        m.health_results.labels(node.spec.id, result.kind).inc()
        if result.latency_ms is not None:
            m.health.labels(node.spec.id).observe(result.latency_ms / 1000)
        if result.kind == "late":  # the checker's own loop was late: no verdict
            self.counters["checks_late"] += 1
            return
        if result.good:
            node.last_good_started = max(node.last_good_started, result.started)
            node.last_latency_ms = result.latency_ms
            node.reason = result.reason
            node.ok += 1
            node.fail = 0
            node.timeouts = 0
            node.answered += 1
            node.evidence = None
            if not node.healthy and node.ok >= node.rise_needed:
                node.healthy = True
                log.info("node in rotation", extra={"node": node.spec.id, "checks_ok": node.ok})
            return
        if result.started < node.last_good_started:
            return  # an older check timing out after a newer one answered: stale
        node.ok = 0
        node.fail += 1
        node.reason = result.reason if result.kind == "down" else result.kind
        node.last_latency_ms = None
        if result.kind in HARD or result.kind == "down" or node.fail >= self.rc.fall:
            if node.healthy:
                self.take_out(node, "check_" + result.kind, 0.0, result.error)
            else:
                node.evidence = "check_" + result.kind
                node.last_error = result.error
            node.rise_needed = self.rc.rise
        else:
            node.evidence = "check_timeout"  # suspect: demoted, still in rotation

    def record_check(self, node: NodeHealth, good: bool, reason: str, latency_ms: float | None,
                     error: str | None = None, kind: str | None = None) -> None:
        """Apply a check result given as plain values (tests, tools)."""
        kind = kind or ("ok" if good else "down")
        self.apply_check(node, CheckResult(good, kind, reason, latency_ms, time.monotonic(), error))

    def current_lag(self) -> float:
        """The recent lag of our loop, or the lag right now when the lag watch is overdue (a stall that
        just ended: the timeouts it fired are judged before the watch has woken up to record it)."""
        return max(self.loop_lag_s, time.monotonic() - self._lag_due)

    def try_failed(self, node: NodeHealth, kind: str, error: str) -> None:
        """What one failed forwarding try (its :func:`~edge_server.router_health.classify` kind) says."""
        self.metrics.try_failures.labels(node.spec.id, kind).inc()
        if kind == "not_written":
            # A pooled connection the node had closed: an idle close or the node's death.  No evidence;
            # a check right away tells the two apart well before the next scheduled one.
            self.counters["not_written"] += 1
            if self.probe is not None:
                self.probe(node.spec)
            return
        if kind in HARD:
            self.take_out(node, kind, self.rc.eject_ms / 1000, error)
            return
        if kind in ("timeout", "connect_timeout"):
            # Demoted at once (its clients try the next region until an answer or a good check clears
            # it: cheap, and undone within a check interval), but ejected only for repeated timeouts
            # judged while our own loop was on time, and never for a slow connect.
            node.evidence = node.evidence or kind
            if kind == "connect_timeout":
                return
            if self.current_lag() > self.rc.check_try_timeout_ms / 2000:
                self.counters["lagged_timeouts"] += 1  # we were late ourselves: no evidence against it
                return
        node.timeouts += 1
        if node.timeouts >= self.rc.timeout_eject_count and node.answered:
            self.take_out(node, "timeouts", self.rc.eject_ms / 1000, error)

    def answered(self, node: NodeHealth) -> None:
        """The node answered a forwarded request: it serves."""
        node.answered += 1
        node.timeouts = 0
        if node.evidence is not None and node.usable(self.clock()):
            node.evidence = None

    def node_states(self, now: float) -> list[dict[str, Any]]:
        return [{"id": n.spec.id, "region": n.spec.region, "url": n.spec.url, "healthy": n.healthy,
                 "usable": n.usable(now), "ejected_for_ms": max(0.0, round((n.ejected_until - now) * 1000, 3)),
                 "ejected_until": n.ejected_until if n.ejected_until > now else None, "evidence": n.evidence,
                 "consecutive_ok": n.ok, "consecutive_fail": n.fail, "consecutive_timeouts": n.timeouts,
                 "checks": n.checks, "reason": n.reason, "last_check_ms": n.last_latency_ms,
                 "last_error": n.last_error} for n in self.nodes.values()]

    def refresh_gauges(self) -> None:
        now = self.clock()
        self.metrics.panic.set(1 if self.in_panic(now) else 0)
        self.metrics.in_rotation.set(sum(1 for n in self.nodes.values() if n.usable(now)))
        self.metrics.loop_lag.set(self.loop_lag_s)
