"""The strict-vs-eventual sweep on the simulator: a setting's alpha reaches the simulated nodes, strict
mode stays inside the plain envelope where eventual mode does not, and the figures draw its rows."""

from __future__ import annotations

import dataclasses

import pytest

from edge_server.strict.settings import StrictSettingsError
from workbench.run.simulate import simulate
from workbench.spec.scenario import Scenario
from workbench.ui import strict_study

BASE = {"duration_s": 6.0, "regions": 3, "rate": 100.0, "burst": 100.0, "load_rps": 400.0,
        "gossip_interval_ms": 20.0, "route": "check", "mode": "strict", "seed": 1}


@pytest.fixture(scope="module")
def study() -> dict:
    partition = Scenario.build(name="p", partition_at_s=2.0, partition_groups="eu|us,ap", heal_at_s=4.0, **BASE)
    loss = Scenario.build(name="l", kill_region_at_s=2.0, kill_region="eu", **BASE)
    return strict_study.strict_sweep(partition, loss, [200.0], [0.0, 0.5], schedules=0, show=(200.0, 0.5))


def test_strict_stays_in_the_envelope_and_eventual_does_not(study: dict) -> None:
    assert len(study["rows"]) == 2
    for row in study["rows"]:
        assert row["within_envelope"], row
        assert row["cut_total_share"] <= 1.25  # R plus at most the burst spread over the 2 s cut
    eventual = study["eventual"]
    assert eventual["partition_excess_tokens"] > 0 and not eventual["within_envelope"]
    assert eventual["cut_total_share"] > 1.5  # each of the two sides spends the whole rate


def test_alpha_is_what_a_cut_off_side_keeps(study: dict) -> None:
    none, half = study["rows"]
    assert none["alpha"] == 0.0 and half["alpha"] == 0.5
    assert none["cut_minority_share"] == 0.0  # no pinned share: fenced to nothing
    assert half["minority_pinned_share"] == pytest.approx(0.5 / 3, abs=1e-4)
    assert 0.5 * half["minority_pinned_share"] < half["cut_minority_share"] <= 1.1 * half["minority_pinned_share"]
    assert half["loss_share_after"] < none["loss_share_after"]  # a lost region takes its pinned share along


def test_figures_draw_the_rows(study: dict) -> None:
    rows, eventual = study["rows"], study["eventual"]
    assert len(strict_study.safety_availability_figure(rows, eventual).data) == 2 * (len(rows) + 1)
    assert strict_study.cost_figure(rows, eventual).data
    series = study["series"]
    modes = strict_study.modes_figure({m: series[m]["partition"] for m in ("eventual", "strict")})
    assert {t.name for t in modes.data} >= {"side eu", "side us+ap", "all sides", "envelope B + R·t"}
    assert strict_study.loss_figure({m: series[m]["loss"] for m in ("eventual", "strict")}, 100.0).data


def test_bad_settings_are_refused() -> None:
    with pytest.raises(StrictSettingsError, match=r"strict\.lease_ms"):
        strict_study.point_settings(20.0, 40.0, 0.2)
    with pytest.raises(StrictSettingsError, match=r"strict\.alpha"):
        strict_study.point_settings(20.0, 500.0, 1.5)
    sc = Scenario.build(name="x", **BASE)
    with pytest.raises(ValueError, match="gossip_interval_ms"):
        simulate(sc, strict_settings=strict_study.point_settings(50.0, 500.0, 0.2))
    with pytest.raises(ValueError, match="no partition"):
        strict_study.strict_sweep(sc, dataclasses.replace(sc), [500.0], [0.2])
