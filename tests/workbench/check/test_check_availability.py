"""Availability figures from a history: rates per region and per side, shares of R, recovery times,
and each mode's promised bound, on hand-built histories whose answers are known."""

from __future__ import annotations

import pytest
from check_histories import audited_run

from workbench.check.availability import (
    partition_sides,
    promised_bound,
    rate_share,
    region_rates,
    sides_cumulative,
    time_to_rate,
)
from workbench.spec.scenario import Scenario

CUT = {"partition_at_s": 2.0, "partition_groups": "eu|us,ap", "heal_at_s": 4.0}


def scenario(mode: str = "eventual", **kw: object) -> Scenario:
    return Scenario.build(rate=10.0, burst=5.0, duration_s=6.0, regions=3, gossip_interval_ms=20.0, mode=mode,
                          **kw)


def grants_every(step: float, node: str, start: float, end: float) -> list[tuple[float, str, str]]:
    n = round((end - start) / step)
    return [(start + step * i, "tenant-0000", node) for i in range(n)]


def test_sides_are_the_groups_and_the_rest() -> None:
    assert partition_sides(scenario(**CUT)) == [("eu",), ("us", "ap")]
    assert partition_sides(scenario(partition_at_s=1.0, partition_groups="eu", heal_at_s=2.0)) == [
        ("eu",), ("us", "ap")]
    assert partition_sides(scenario()) == [("eu", "us", "ap")]


def test_rates_shares_and_recovery_time() -> None:
    sc = scenario()
    # eu: 10 tokens/s for the whole run; us: nothing until 3 s, then 20 tokens/s
    rec = audited_run(sc, grants_every(0.1, "eu-1", 0.0, 6.0) + grants_every(0.05, "us-1", 3.0, 6.0),
                      final_nodes=("eu-1", "us-1"))
    series = region_rates(rec, sc, bin_s=0.1)
    assert len(series["t_s"]) == 60 and set(series["regions"]) == {"eu", "us", "ap"}
    assert sum(series["regions"]["ap"]) == 0
    assert rate_share(series, ["eu"], 0.0, 6.0, 10.0) == pytest.approx(1.0)
    assert rate_share(series, ["eu", "us"], 3.0, 6.0, 10.0) == pytest.approx(3.0)
    assert rate_share(series, ["eu"], 2.0, 2.0, 10.0) is None  # an empty window
    # the eu+us rate first reaches 25/s over 200 ms once us has run for 200 ms; ap never does
    assert time_to_rate(series, ["eu", "us"], 2.0, 25.0, window=0.2) == pytest.approx(1.2)
    assert time_to_rate(series, ["ap"], 0.0, 1.0) is None
    with pytest.raises(ValueError, match="bin_s"):
        region_rates(rec, sc, bin_s=0.0)


def test_promised_bound_per_mode() -> None:
    t = [1.0, 3.0, 5.0]
    # strict: the plain envelope B + R t
    assert promised_bound(scenario("strict", **CUT), t) == [15.0, 35.0, 55.0]
    # eventual: + (k-1) R (time cut so far) + two gossip intervals of rate (0.4 tokens)
    assert promised_bound(scenario("eventual", **CUT), t) == [15.4, 45.4, 75.4]
    assert promised_bound(scenario("eventual"), t, keys=2) == [30.8, 70.8, 110.8]


def test_sides_cumulative_counts_each_side_and_the_total() -> None:
    sc = scenario("eventual", **CUT)
    rec = audited_run(sc, grants_every(0.1, "eu-1", 0.0, 6.0) + grants_every(0.1, "ap-1", 0.0, 6.0),
                      final_nodes=("eu-1", "ap-1"))
    got = sides_cumulative(rec, sc, bin_s=0.5)
    assert list(got["sides"]) == ["eu", "us+ap"]
    assert got["t_s"][-1] == 6.0 and got["sides"]["eu"][-1] == pytest.approx(60)
    assert got["total"][-1] == pytest.approx(120) and got["rate_per_s"]["us+ap"][3] == pytest.approx(10)
    assert got["envelope"][-1] == 65.0 and got["bound"][-1] == pytest.approx(65.0 + 20.0 + 0.4)
    assert got["split"] == (2.0, 4.0) and got["keys"] == 1 and got["mode"] == "eventual"
