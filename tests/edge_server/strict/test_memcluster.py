"""The in-memory driver's own checks: the envelope checker catches an over-admission, and a quiet
cluster run through it admits and stays inside the envelope."""

from __future__ import annotations

import pytest

from edge_server.strict.memcluster import Envelope, MemCluster
from edge_server.strict.settings import StrictSettings
from edge_server.token_bucket import Limit


def test_the_envelope_checker_sees_every_window() -> None:
    env = Envelope(Limit(10.0, 5.0))
    for t in (0.0, 0.0, 0.0, 0.0, 0.0):
        env.admit(t, 1)
    assert env.max_excess == pytest.approx(0.0)  # the burst, exactly
    env.admit(0.1, 1)  # one refilled token after 100 ms: still exactly on the bound
    assert env.max_excess == pytest.approx(0.0)
    env.admit(0.1, 1)
    assert env.max_excess == pytest.approx(1.0)  # one too many
    late = Envelope(Limit(10.0, 5.0))
    late.admit(0.0, 1)
    late.admit(100.0, 6)  # a window that starts late: [100, 100] holds 6 > 5
    assert late.max_excess == pytest.approx(1.0)


def test_a_cluster_admits_and_holds_the_envelope() -> None:
    s = StrictSettings(alpha=0.2, lease_ms=200, rho=1e-3, gossip_interval_ms=20)
    c = MemCluster({"a": ["a1"], "b": ["b1"], "c": ["c1"]}, lambda _k: Limit(100.0, 20.0), s,
                   latency=lambda x, y: 0.0 if x == y else 0.01)

    def load(cl: MemCluster) -> None:
        cl.take("a1", "k")

    c.run(2.0, 0.002, load)
    assert c.admitted["a1"] > 0
    assert c.max_excess() <= 1e-6
    assert not c.wire_refused
    with pytest.raises(ValueError):
        c.set_drift("a1", 0.01)  # beyond rho
