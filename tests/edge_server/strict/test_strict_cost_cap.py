"""A cost no strict node can ever hold is refused up front: in the core as ``CostExceedsNodeCap``, over
HTTP as a 400 naming ``cost`` -- never a 429 that would have the client retry forever, never a 500.

A node holds at most its pinned cap plus the whole floating cap, ``(alpha * p_i + 1 - alpha) * B``,
so with 3 nodes and alpha 0.2 a cost above 0.867 B can never be granted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from procs import ClusterProcs, request

from edge_server.strict.settings import StrictSettings
from edge_server.strict.table import CostExceedsNodeCap, StrictTable
from edge_server.token_bucket import CostExceedsBurst, Limit

NODES = ["a1", "b1", "c1"]
LIMIT = Limit(10.0, 10.0)


def table(alpha: float) -> StrictTable:
    s = StrictSettings(alpha=alpha, lease_ms=200, rho=0.0, gossip_interval_ms=20)
    return StrictTable("a1", 1, NODES, ("v",), lambda key: LIMIT, s, now=0.0)


@pytest.mark.parametrize(("alpha", "cap"), [(0.2, 0.2 * 10 / 3 + 0.8 * 10), (1.0, 10 / 3), (0.0, 10.0)])
def test_a_cost_above_what_one_node_can_hold_is_refused_up_front(alpha: float, cap: float) -> None:
    t = table(alpha)
    over = int(cap) + 1
    if over <= LIMIT.burst:
        with pytest.raises(CostExceedsNodeCap) as err:
            t.take("k", over, 1.0)
        assert err.value.cap == pytest.approx(cap) and err.value.burst == LIMIT.burst
        assert isinstance(err.value, CostExceedsBurst)  # every caller that refuses a cost over the burst
    with pytest.raises(CostExceedsBurst) as err_burst:
        t.take("k", 11, 1.0)
    assert not isinstance(err_burst.value, CostExceedsNodeCap)  # over the burst itself: the plain error
    t.take("k", int(cap), 1.0)  # at the cap: decided (allowed or not), not refused


class _StrictOneNode(ClusterProcs):
    """A 3-region strict cluster of which only ``eu-1`` runs: refusing a cost needs no peer and no lease."""

    def config(self):  # type: ignore[no-untyped-def]
        return dataclasses.replace(super().config(), mode="strict")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_node_answers_a_cost_it_can_never_hold_with_a_400_naming_cost(tmp_path: Path) -> None:
    with _StrictOneNode(tmp_path, rate=10, burst=10, absent=["us-1", "ap-1"],
                        audit={"replicate": False}) as c:
        url = c.url("eu-1")
        before = c.state("eu-1")["audit_total_cost"]
        r = request(url, "POST", "/v1/limits/check", json={"key": "k", "cost": 9})  # cap 8.67 of burst 10
        assert r.status == 400, (r.status, r.body)
        assert r.headers.get("content-type", "").startswith("application/json")
        assert r.error["field"] == "cost" and r.error["code"] == "invalid_field"
        assert "strict mode" in r.error["message"] and "8.667" in r.error["message"]
        over = request(url, "POST", "/v1/limits/check", json={"key": "k", "cost": 11})
        assert over.status == 400 and over.error["field"] == "cost" and "burst 10" in over.error["message"]
        fits = request(url, "POST", "/v1/limits/check", json={"key": "k", "cost": 8})
        assert fits.status == 200 and fits.json()["allowed"] in (True, False)  # decided, not refused
        assert c.state("eu-1")["audit_total_cost"] == before + (8 if fits.json()["allowed"] else 0)
