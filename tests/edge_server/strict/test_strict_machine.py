"""A hypothesis state machine over a whole strict cluster (4 nodes, 3 regions, 3 voters).

Rules: take (also with a pause between take and answer, and with the audit write still under way
while anything else happens), gossip rounds, delivery in any order,
loss, duplication, long delays, partitions of any shape, heal, crash, restart with or without the
data directory, a voter restart from its saved ledger or with none, clock drift within rho, and time
passing.  After every step:

* the envelope: the tokens the cluster admitted in every window ``[s, t]`` of true time never exceed
  ``B + R * (t - s)`` -- no allowance (1e-6 is float rounding);
* the rights the live nodes account for never exceed ``B``, nor do the rights in existence by the
  ground truth (held, reserved, and given but still creditable, from every incarnation's state);
* the live nodes' floating shares, each on its own clock, add up to at most 1;
* merge of the live nodes' views is commutative, associative and idempotent;
* a delta survives encode / decode unchanged.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings, target
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edge_server.strict.memcluster import SECRET, MemCluster, Pending
from edge_server.strict.rights import merge_key
from edge_server.strict.settings import StrictSettings
from edge_server.strict.wire import decode, encode
from edge_server.token_bucket import Limit

REGIONS = {"a": ["a1", "a2"], "b": ["b1"], "c": ["c1"]}
NODES = [n for ns in REGIONS.values() for n in ns]
LIMITS = {"k": Limit(50.0, 20.0), "hot": Limit(200.0, 5.0)}
KEYS = sorted(LIMITS)
RHO = 1e-3
EPS = 1e-6  # float rounding only


def limit_for(key: str) -> Limit | None:
    return LIMITS.get(key)


class StrictCluster(RuleBasedStateMachine):
    @initialize(alpha=st.sampled_from([0.0, 0.25, 1.0]), seed=st.integers(0, 2**16))
    def start(self, alpha: float, seed: int) -> None:
        s = StrictSettings(alpha=alpha, lease_ms=200, rho=RHO, gossip_interval_ms=20)
        self.c = MemCluster(REGIONS, limit_for, s, seed=seed,
                            latency=lambda x, y: 0.0 if x == y else 0.005)
        self.best: dict[str, float] = {}
        self.writing: list[Pending] = []  # spent, audit write under way, not yet answered
        self.busy(60, set(NODES), False)  # faults hit a cluster that runs: leases held, rights moving

    def teardown(self) -> None:
        for label, value in getattr(self, "best", {}).items():
            target(value, label=label)  # steer the search toward the bounds
    # ------------------------------------------------------------- load and time

    @rule(node=st.sampled_from(NODES), key=st.sampled_from(KEYS), n=st.integers(1, 30), cost=st.integers(1, 3))
    def take(self, node: str, key: str, n: int, cost: int) -> None:
        for _ in range(n):
            self.c.take(node, key, min(cost, int(LIMITS[key].burst)))

    @rule(node=st.sampled_from(NODES), key=st.sampled_from(KEYS), pause=st.floats(0.001, 0.5))
    def take_paused(self, node: str, key: str, pause: float) -> None:
        self.c.take(node, key, 1, pause=pause)

    @rule(node=st.sampled_from(NODES), key=st.sampled_from(KEYS), n=st.integers(1, 5))
    def start_writes(self, node: str, key: str, n: int) -> None:
        """Requests whose rights are spent and whose audit write is still under way: every other rule
        (a long pause, gossip, other nodes' requests, a crash) may run before they are answered."""
        for _ in range(n):
            pending = self.c.begin(node, key, 1)
            if pending is not None:
                self.writing.append(pending)

    @rule(data=st.data())
    def finish_write(self, data: st.DataObject) -> None:
        if self.writing:
            self.c.answer(self.writing.pop(data.draw(st.integers(0, len(self.writing) - 1), label="write")))

    @rule(steps=st.integers(1, 40), hot=st.sets(st.sampled_from(NODES), min_size=1), shuffle=st.booleans())
    def busy(self, steps: int, hot: set[str], shuffle: bool) -> None:
        """Normal operation: rounds, deliveries and demand at ``hot`` nodes, 10 ms at a time."""
        for i in range(steps):
            if i % 2 == 0:
                self.c.round()
            self.c.deliver_due(shuffle=shuffle)
            for node in sorted(hot):
                for key in KEYS:
                    for _ in range(3):
                        self.c.take(node, key)
            self.c.advance(0.01)

    @rule(dt=st.floats(0.0, 0.4))
    def advance(self, dt: float) -> None:
        self.c.advance(dt)

    @rule(proc=st.sampled_from(NODES + [MemCluster.voter_of(r) for r in REGIONS]), drift=st.floats(-RHO, RHO))
    def drift(self, proc: str, drift: float) -> None:
        self.c.set_drift(proc, drift)

    # ------------------------------------------------------------- network

    @rule()
    def gossip(self) -> None:
        self.c.round()

    @rule(shuffle=st.booleans())
    def deliver(self, shuffle: bool) -> None:
        self.c.deliver_due(shuffle=shuffle)

    @precondition(lambda self: self.c.queue)
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.c.queue) - 1))
        del self.c.queue[i]

    @precondition(lambda self: self.c.queue)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.c.queue) - 1))
        self.c.queue.append(self.c.queue[i])

    @precondition(lambda self: self.c.queue)
    @rule(data=st.data(), delay=st.floats(0.0, 2.0))
    def delay(self, data: st.DataObject, delay: float) -> None:
        """Holds a message back (reordering across rounds; an old transfer landing late)."""
        i = data.draw(st.integers(0, len(self.c.queue) - 1))
        self.c.queue[i].deliver_at = self.c.now + delay

    @rule(side=st.sets(st.sampled_from(sorted(REGIONS)), min_size=1, max_size=2))
    def partition(self, side: set[str]) -> None:
        rest = set(REGIONS) - side
        self.c.cut |= {frozenset((a, b)) for a in side for b in rest}

    @rule()
    def heal(self) -> None:
        self.c.cut.clear()

    # ------------------------------------------------------------- processes

    @rule(node=st.sampled_from(NODES))
    def crash(self, node: str) -> None:
        self.c.crash(node)

    @rule(node=st.sampled_from(NODES), keep_data=st.booleans())
    def restart(self, node: str, keep_data: bool) -> None:
        self.c.restart(node, keep_data)

    @rule(region=st.sampled_from(sorted(REGIONS)), keep_ledger=st.booleans())
    def restart_voter(self, region: str, keep_ledger: bool) -> None:
        self.c.restart_voter(MemCluster.voter_of(region), keep_ledger)

    # ------------------------------------------------------------- invariants

    @invariant()
    def envelope_holds(self) -> None:
        self.best["envelope excess"] = max(self.best.get("envelope excess", -1e9), self.c.max_excess())
        for key, env in self.c.envelopes.items():
            assert env.max_excess <= EPS, (key, env.max_excess)

    @invariant()
    def cluster_holds_at_most_burst(self) -> None:
        for key, limit in LIMITS.items():
            held = sum(t.outstanding(key, self.c.local(n)) for n, t in self.c.tables.items() if t is not None)
            assert held <= limit.burst + EPS, (key, held)

    @invariant()
    def rights_in_existence_at_most_burst(self) -> None:
        for key, limit in LIMITS.items():
            assert self.c.potential(key) <= limit.burst + EPS, (key, self.c.potential(key))

    @invariant()
    def floating_shares_sum_to_at_most_one(self) -> None:
        self.best["sum of floating shares"] = max(self.best.get("sum of floating shares", 0.0), self.c.phi_total())
        assert self.c.phi_total() <= 1 + EPS, self.c.phi_total()

    @invariant()
    def merge_is_a_semilattice(self) -> None:
        live = [t for t in self.c.tables.values() if t is not None and "k" in t.keys()]
        if len(live) < 3:
            return
        a, b, c = (t.rights("k") for t in live[:3])
        assert merge_key(a, b) == merge_key(b, a)
        assert merge_key(merge_key(a, b), c) == merge_key(a, merge_key(b, c))
        assert merge_key(a, a) == a
        assert merge_key(merge_key(a, b), b) == merge_key(a, b)

    @invariant()
    def wire_round_trip(self) -> None:
        for node, t in self.c.tables.items():
            if t is None:
                continue
            peer = next(n for n in NODES if n != node)
            upto, entries = t.delta_for(peer)
            data, sig = encode(SECRET, "strict_delta", t.actor, 1, (upto, entries))
            msg = decode(SECRET, data, sig, nodes=NODES)
            assert msg.body == (upto, entries)
            return


StrictCluster.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestStrictCluster = StrictCluster.TestCase
