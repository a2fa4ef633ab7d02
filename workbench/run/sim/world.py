"""One simulated run: nodes, network, router, load and faults on virtual time, recorded as a history.

The router is modelled as in a drill: each client has a home region and goes to the nearest region (by
the topology's latency matrix) whose node passed the last health check (every ``health_interval_ms``;
a node is healthy when it is up and ready).  A request that reaches a killed node is refused and
retried once on the next healthy node (loopback sends an instant reset); one that reaches a paused
node stalls for a second and fails (nothing answers).  On the check route a denial is a 200 with
``allowed: false``; on the invoke route a 429 (the skill itself is not simulated: an admitted request
takes the skill's median latency).

Audit event and state sample times in the history are the TRUE virtual time (``EPOCH`` + run time),
not the node's skewed clock, so the checks over the history are exact even under clock skew.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

from edge_server.gossip import probe_interval_s
from edge_server.strict.settings import StrictSettings
from edge_server.strict.table import StrictTable
from edge_server.token_bucket import BucketTable, Limit
from workbench.history import CUT_AT_END, AuditEvent, FaultRecord, Recording, RequestRecord, StateSample
from workbench.run.sim.clock import EPOCH, Clocks, Scheduler
from workbench.run.sim.network import Network
from workbench.run.sim.node import SimNode, TableFactory
from workbench.run.sim.schedule import UNDONE, SimFault
from workbench.run.sim.strict_node import StrictSimNode, strict_settings_for, voter_id
from workbench.spec.scenario import ROUTER, Scenario

__all__ = ["SECRET", "STATE_EVERY_S", "World", "run_world"]

SECRET = b"simulated-cluster-secret"
STATE_EVERY_S = 1.0  # how often every node's /v1/state is sampled into the history
STALL_S = 1.0  # a request sent to a paused node fails after this long


class World:
    """Everything one run needs; :meth:`run` returns the :class:`Recording`."""

    def __init__(self, scenario: Scenario, faults: Sequence[SimFault], *,
                 table_factory: TableFactory = BucketTable, secret: bytes = SECRET,
                 strict_table: type[StrictTable] = StrictTable,
                 strict_settings: StrictSettings | None = None) -> None:
        self.scenario = scenario
        self.faults = list(faults)
        self.secret = secret
        topo = scenario.topology
        self.topo = topo
        self.node_ids = topo.node_ids
        self.gossip_s = topo.gossip_interval_ms / 1000.0
        self.push_timeout_s = max(0.5, 10 * self.gossip_s)  # edge_server.gossip's client timeout
        self.probe_s = probe_interval_s(self.gossip_s)  # and its probes' period and timeout
        self.sched = Scheduler()
        self.clocks = Clocks(self.sched, list(self.node_ids))
        seed = scenario.seed
        self.net = Network(self.sched, random.Random(seed * 3 + 1), self.node_ids)
        self.load_rng = random.Random(seed * 3 + 2)
        self._limits = {x.pattern: Limit(x.rate, x.burst) for x in scenario.limits}
        self._limit_cache: dict[str, Limit | None] = {}
        self.nodes: dict[str, Any] = {}
        self._strict = scenario.mode == "strict"
        self.table_name = "StrictTable" if scenario.mode == "strict" else table_factory.__name__
        if scenario.mode == "strict":
            self.table_name = strict_table.__name__
            self._strict_nodes(scenario, strict_table, strict_settings)
        else:
            self.nodes = {nid: SimNode(self, nid, topo.region_of(nid), [p for p in self.node_ids if p != nid],
                                       table_factory) for nid in self.node_ids}
        self.healthy = dict.fromkeys(self.node_ids, False)
        regions = topo.regions
        self._order = {home: sorted(regions, key=lambda r, h=home: (topo.latency_ms[h].get(r, 0.0) if r != h else -1.0))
                       for home in regions}
        self._rr = {r: itertools.cycle(topo.nodes_of(r)) for r in regions}
        self.requests: list[RequestRecord] = []
        self.audit: list[AuditEvent] = []
        self.fault_records: list[FaultRecord] = []
        self.states: list[StateSample] = []

    def _strict_nodes(self, scenario: Scenario, table_cls: type[StrictTable],
                      settings: StrictSettings | None) -> None:
        """Strict mode: one voter per region on its first node, a drift within rho per node.

        ``settings`` (default :func:`strict_settings_for` the topology) lets a study sweep alpha and
        the lease; its gossip interval must be the topology's, which sets the simulated rounds.
        """
        topo = self.topo
        settings = settings or strict_settings_for(topo.gossip_interval_ms)
        if settings.gossip_interval_ms != topo.gossip_interval_ms:
            raise ValueError(f"strict settings' gossip_interval_ms {settings.gossip_interval_ms:g} is not the "
                             f"topology's {topo.gossip_interval_ms:g}")
        self.strict_settings = settings
        voters = {voter_id(r): topo.nodes_of(r)[0] for r in topo.regions}
        rng = random.Random(scenario.seed * 3 + 3)
        rho = settings.rho
        for i, nid in enumerate(self.node_ids):
            pick = rng.random()
            drift = rho if pick < 0.125 else -rho if pick < 0.25 else rng.uniform(-rho, rho)
            self.nodes[nid] = StrictSimNode(self, nid, topo.region_of(nid), [p for p in self.node_ids if p != nid],
                                            settings=settings, voters=voters, drift=drift, table_cls=table_cls,
                                            mono_base=1000.0 + 7.0 * i + rng.uniform(0, 5))

    # ------------------------------------------------------------------ the core's view
    def limit_for(self, key: str) -> Limit | None:
        try:
            return self._limit_cache[key]
        except KeyError:
            spec = self.scenario.limit_for(key)
            limit = None if spec is None else self._limits[spec.pattern]
            self._limit_cache[key] = limit
            return limit

    def granted(self, node: SimNode, key: str, cost: int, gen: int, request_id: str) -> None:
        seq = node.audit_seq
        self.audit.append(AuditEvent(seq, f"{node.id}:{seq}", key, cost, node.id, node.region,
                                     EPOCH + self.sched.now, request_id, gen))

    # ------------------------------------------------------------------ run
    def run(self) -> Recording:
        sc = self.scenario
        at = self.sched.at
        for node in self.nodes.values():
            node.start()
        self._health()
        for step, f in enumerate(self.faults):
            at(f.at_s, self._apply, f, step)
            if f.duration_s > 0 and f.action in UNDONE:
                at(f.at_s + f.duration_s, self._undo, f, step)
        at(STATE_EVERY_S, self._sample)
        self._start_load()
        self.sched.run_until(sc.duration_s)
        if self._strict:
            for node in self.nodes.values():
                node.abandon()
        self._sample(final=True)
        refused = {nid: dict(n.refused) for nid, n in self.nodes.items() if n.refused}
        net = self.net
        extra: dict[str, Any] = {
            "engine": "simulation", "table": self.table_name,
            "network": {"sent": net.sent, "delivered": net.delivered, "dropped": net.dropped,
                        "duplicated": net.duplicated, "reordered": net.reordered},
            "gossip_refused": refused, "boots": {nid: n.boots for nid, n in self.nodes.items()},
            "final_node_states": {nid: n.state for nid, n in self.nodes.items()},
            "sim_faults": [f.to_dict() for f in self.faults if f.sim_only],
        }
        if self._strict:
            extra["revoked_after_write"] = {nid: n.revoked_after_write for nid, n in self.nodes.items()}
        self.sched.clear()  # the queue and the nodes refer back to the world: let it be freed at once
        self.nodes = {}
        return Recording(scenario=sc.to_dict(), requests=self.requests, faults=self.fault_records,
                         states=self.states, audit=self.audit, started_wall=EPOCH, ended_s=sc.duration_s,
                         complete=True, extra=extra, version="sim")

    def _health(self) -> None:
        for nid, node in self.nodes.items():
            self.healthy[nid] = node.ready() and self.net.router_reaches(nid)
        self.sched.after(self.scenario.health_interval_ms / 1000.0, self._health)

    def _sample(self, final: bool = False) -> None:
        t = self.sched.now
        for nid, node in self.nodes.items():
            view = node.sample()
            if view is not None:
                self.states.append(StateSample(round(t, 6), nid, EPOCH + t, *view))
        if not final:
            self.sched.after(STATE_EVERY_S, self._sample)

    # ------------------------------------------------------------------ load
    def _start_load(self) -> None:
        load = self.scenario.load
        regions = self.topo.regions
        weights = ([float(load.region_weights.get(r, 0.0)) for r in regions] if load.region_weights
                   else [1.0] * len(regions))
        self._home_cum = list(itertools.accumulate(weights))
        self._tenants = load.tenant_names()
        if load.key_dist == "zipf":
            kw = [1.0 / (i + 1) ** load.zipf_s for i in range(len(self._tenants))]
        else:
            kw = [1.0] * len(self._tenants)
        self._key_cum = list(itertools.accumulate(kw))
        self._rand = self.load_rng.random
        self._rate = load.rate_rps
        self._poisson = load.arrival == "poisson"
        self._cost = load.cost
        self._admit_s = self.scenario.skill.median_ms / 1000.0
        self._invoke = load.route == "invoke"
        self._route = load.route
        # the router's preference per home region: its regions nearest first, each with its nodes
        self._cands = {home: [self.topo.nodes_of(r) for r in self._order[home]] for home in regions}
        self._rr_at = {nodes: 0 for cands in self._cands.values() for nodes in cands}
        if load.mode == "open":
            self.sched.at(self._gap(), self._arrive)
        else:
            for _ in range(load.users):
                self.sched.at(self._rand() * 0.01, self._user)

    def _gap(self) -> float:
        return self.load_rng.expovariate(self._rate) if self._poisson else 1.0 / self._rate

    def _pick(self) -> tuple[str, str]:
        rand = self._rand
        cum = self._home_cum
        home = self.topo.regions[bisect.bisect_right(cum, rand() * cum[-1])] if len(cum) > 1 else self.topo.regions[0]
        kc = self._key_cum
        if len(kc) == 1:
            return home, self._tenants[0]
        return home, self._tenants[bisect.bisect_right(kc, rand() * kc[-1])]

    def _arrive(self) -> None:
        """One open-loop arrival (``_pick`` and ``_gap`` inlined: this runs for every request)."""
        rand = self._rand
        cum, regions = self._home_cum, self.topo.regions
        home = regions[bisect.bisect_right(cum, rand() * cum[-1])] if len(cum) > 1 else regions[0]
        kc, tenants = self._key_cum, self._tenants
        key = tenants[bisect.bisect_right(kc, rand() * kc[-1])] if len(kc) > 1 else tenants[0]
        self._serve(home, key)
        sched = self.sched
        gap = self.load_rng.expovariate(self._rate) if self._poisson else 1.0 / self._rate
        sched.at(sched.now + gap, self._arrive)

    def _user(self) -> None:
        home, key = self._pick()
        rec = self._serve(home, key, self._user_answered)
        if rec is not None:
            self._user_answered(rec)

    def _user_answered(self, rec: RequestRecord) -> None:
        pause = (rec.end_s - rec.start_s) + self.scenario.load.think_ms / 1000.0
        self.sched.after(max(pause - (self.sched.now - rec.start_s), 0.001), self._user)

    def _answer_later(self, node: StrictSimNode, t: float, home: str, key: str, cost: int, retried_from: str,
                      then: Callable[[RequestRecord], None] | None) -> None:
        """A strict node answers a grant once its audit write is done (a pause holds it): record the
        request when the answer comes, or as a timeout once the client would have given up."""
        def reply(status: int, allowed: bool | None, error: str, rid: str) -> None:
            now = self.sched.now
            if status == 0 or now - t > STALL_S:  # a reset, the client's timeout, or the run's end
                timed_out = now - t > STALL_S
                error = "timeout" if timed_out else error or f"{CUT_AT_END} (answer held by a pause)"
                rec = RequestRecord(t, t, t + STALL_S if timed_out else now, home, node.region, node.id, key, cost,
                                    0, error, route=self._route, retried_from=retried_from)
            else:
                rec = self._answered(t, now, home, node, key, cost, status, allowed, error, rid, retried_from)
            self.requests.append(rec)
            if then is not None and not rec.cut_at_end:
                then(rec)
        node.decide(key, cost, reply)

    def _answered(self, t: float, now: float, home: str, node: Any, key: str, cost: int, status: int,
                  allowed: bool | None, error: str, rid: str, retried_from: str) -> RequestRecord:
        """The record of a request a node answered at ``now``."""
        end = now + (self._admit_s if allowed else 0.001)
        if self._invoke:  # the skill route: a denial is a 429, an answer carries no "allowed"
            status = 429 if allowed is False else status
            return RequestRecord(t, t, end, home, node.region, node.id, key, cost, status, error,
                                 rid if allowed else "", "invoke", None, retried_from)
        return RequestRecord(t, t, end, home, node.region, node.id, key, cost, status, error,
                             rid if allowed else "", "check", allowed, retried_from)

    def _serve(self, home: str, key: str,
               then: Callable[[RequestRecord], None] | None = None) -> RequestRecord | None:
        """Route one request as the router would (see the module docstring) and record it.  None when
        a strict node answers later (``then`` gets the record then)."""
        t = self.sched.now
        cost = self._cost
        healthy = self.healthy
        retried_from = ""
        for nodes in self._cands[home]:
            count = len(nodes)
            first = 0
            if count > 1:
                first = self._rr_at[nodes]
                self._rr_at[nodes] = (first + 1) % count
            for j in range(count):
                nid = nodes[(first + j) % count]
                if not healthy[nid] or nid == retried_from:
                    continue
                node = self.nodes[nid]
                state = node.state
                if state == "up":
                    if self._strict:
                        self._answer_later(node, t, home, key, cost, retried_from, then)
                        return None
                    status, allowed, error, rid = node.decide(key, cost)
                    rec = self._answered(t, t, home, node, key, cost, status, allowed, error, rid, retried_from)
                    self.requests.append(rec)
                    return rec
                healthy[nid] = False  # passive ejection
                if state == "paused" or retried_from:
                    rec = RequestRecord(t, t, t + (STALL_S if state == "paused" else 0.001), home, "", "", key,
                                        cost, 0, "timeout" if state == "paused" else "connection refused",
                                        route=self._route, retried_from=retried_from)
                    self.requests.append(rec)
                    return rec
                retried_from = nid  # a reset on connect: the router retries once on the next node
        rec = RequestRecord(t, t, t + 0.001, home, "", "", key, cost, 503 if not retried_from else 0,
                            "no_healthy_region" if not retried_from else "connection refused",
                            route=self._route, retried_from=retried_from)
        self.requests.append(rec)
        return rec

    # ------------------------------------------------------------------ faults
    def _nodes_of(self, name: str) -> set[str]:
        return set(self.topo.resolve(name)) if name != ROUTER else set()

    def _emit(self, action: str, target: str, **detail: Any) -> None:
        self.fault_records.append(FaultRecord(round(self.sched.now, 6), action, target, dict(detail)))

    def _links(self, f: SimFault) -> list[Any]:
        if not f.link:
            return self.net.select(None, None)
        return self.net.select(self._nodes_of(f.link[0]), self._nodes_of(f.link[1]))

    def _apply(self, f: SimFault, step: int) -> None:
        a, net = f.action, self.net
        label = "<->".join(f.link) if f.link else "all links"
        if a in ("kill", "pause", "resume", "restart", "restart_wiped", "skew"):
            for nid in sorted(self._nodes_of(f.target)):
                node = self.nodes[nid]
                if a == "kill":
                    node.kill()
                elif a == "pause":
                    node.pause()
                elif a == "resume":
                    node.resume()
                elif a == "skew":
                    self.clocks.set_offset(nid, f.ms / 1000.0)
                else:
                    node.start(wiped=a == "restart_wiped")
            self._emit(a, f.target, **({"ms": f.ms} if a == "skew" else {}))
        elif a == "partition":
            groups = [set().union(*(self._nodes_of(m) for m in g)) for g in f.groups]
            router_in = next((i for i, g in enumerate(f.groups) if ROUTER in g), None)
            net.cut(step, *net.partition_pairs(groups, router_in))
            self._emit("partition", "|".join(",".join(g) for g in f.groups), groups=[list(g) for g in f.groups])
        elif a == "blackhole":
            nodes = self._nodes_of(f.target)
            net.cut(step, *net.blackhole_pairs(nodes))
            self._emit("blackhole", f.target, nodes=sorted(nodes))
        elif a == "heal":
            net.heal()
            self._emit("heal", "")
        elif a in ("latency", "loss", "duplicate", "reorder"):
            for link in self._links(f):
                if a == "latency":
                    link.added_s, link.jitter_s = f.ms / 1000.0, f.jitter_ms / 1000.0
                elif a == "loss":
                    link.loss_pct = f.pct
                elif a == "duplicate":
                    link.dup_pct = f.pct
                else:
                    link.reorder_pct, link.reorder_s = f.pct, f.ms / 1000.0
            detail = {"latency": {"ms": f.ms, "jitter_ms": f.jitter_ms}, "reorder": {"pct": f.pct, "ms": f.ms}}
            self._emit(a, label, **detail.get(a, {"pct": f.pct}))

    def _undo(self, f: SimFault, step: int) -> None:
        if f.action in ("partition", "blackhole"):
            self.net.uncut(step)
        else:
            for link in self._links(f):
                if f.action == "latency":
                    link.added_s = link.jitter_s = 0.0
                elif f.action == "loss":
                    link.loss_pct = 0.0
                elif f.action == "duplicate":
                    link.dup_pct = 0.0
                else:
                    link.reorder_pct = link.reorder_s = 0.0
        label = f.target if f.action == "blackhole" else "<->".join(f.link) if f.link else "all links"
        self._emit(f"end_{f.action}", label)


def run_world(scenario: Scenario, faults: Sequence[SimFault], *,
              table_factory: TableFactory = BucketTable, strict_table: type[StrictTable] = StrictTable,
              strict_settings: StrictSettings | None = None) -> Recording:
    """Simulate ``scenario`` with ``faults`` (already in :func:`~workbench.run.sim.schedule.normalize`
    order) and return its history.  ``scenario.mode`` picks the core: ``table_factory`` (eventual) or
    ``strict_table`` (strict, with ``strict_settings`` or the simulator's defaults)."""
    return World(scenario, faults, table_factory=table_factory, strict_table=strict_table,
                 strict_settings=strict_settings).run()
