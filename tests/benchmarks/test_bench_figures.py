"""The pure figure functions of the outage, capacity and audit soak benchmarks: what a stall, a
window's admitted share, a step's limiting factor and a soak's RSS band mean (docs/performance.md and
docs/audit.md quote them by these definitions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.bench_audit import soak_summary, soak_targets
from benchmarks.bench_capacity import limited_by, passes
from benchmarks.bench_outage import Outcome, R, recovery_s, strict_goal_per_s, window_figures
from benchmarks.bench_overload import skill_tail_probability, traced_timeouts


def _ok(t: float, admitted: bool = True) -> Outcome:
    return Outcome(t, t + 0.002, decided=True, admitted=admitted, degraded=False, error=False)


def test_stall_is_the_longest_span_without_a_decision_even_past_the_window() -> None:
    outcomes = [_ok(0.5 + i * 0.01) for i in range(50)]  # decisions until ~1.0 s
    # fault at 1.0: nothing decided until 3.5 s (past the window's end at 3.0); degraded admits don't count
    outcomes += [Outcome(1.0 + i * 0.01, 1.0 + i * 0.01, decided=False, admitted=True, degraded=True, error=False)
                 for i in range(100)]
    outcomes += [_ok(3.5 + i * 0.01) for i in range(10)]
    f = window_figures(outcomes, 1.0, 3.0)
    assert f["stall_ms"] == pytest.approx(2502, abs=5)
    assert f["admitted_without_limiter"] == 100
    assert f["admitted"] == 100 and f["limit_tokens"] == R * 2.0
    assert f["errors"] == 0


def test_strict_recovery_is_the_end_of_the_first_window_back_at_the_goal() -> None:
    """Admitted at 60 tokens/s for 2 s after a fault at 1 s, then at 95/s: the first 0.5 s window at the
    goal of 93.3/s ends about 2.5 s after the fault; never back before the end: None."""
    goal = strict_goal_per_s()
    assert goal == pytest.approx(R * (1 - 0.2 / 3))
    slow = [_ok(1.0 + i / 60) for i in range(120)]  # 1.0 .. 3.0 s at 60/s
    fast = [_ok(3.0 + i / 95) for i in range(95 * 3)]  # 3.0 .. 6.0 s at 95/s
    assert recovery_s(slow + fast, 1.0, 6.0, goal) == pytest.approx(2.5, abs=0.05)
    assert recovery_s(slow, 1.0, 3.0, goal) is None
    assert recovery_s([], 1.0, 3.0, goal) is None


def test_errors_and_admitted_share_count_only_the_window() -> None:
    outcomes = [_ok(t / 100, admitted=t % 2 == 0) for t in range(0, 400)]
    outcomes += [Outcome(2.5, 7.5, decided=False, admitted=False, degraded=False, error=True)]
    f = window_figures(outcomes, 1.0, 3.0)
    assert f["requests"] == 201 and f["errors"] == 1
    assert f["admitted"] == 100 and f["admitted_pct_of_limit"] == 50.0
    assert f["slowest_request_ms"] == pytest.approx(5000.0)
    assert f["stall_ms"] < 30  # decisions kept coming every 10 ms


def _step(**kw: object) -> dict:
    base = {"p95_ms": 3000.0, "error_pct": 0.0, "served": 100, "errors_by_code": {}, "machine_busy_pct": 40.0,
            "edge_cpu_pct_of_machine": 20.0, "generators_cpu_pct_of_machine": 10.0, "edge_rss_peak_mb": 200.0}
    return base | kw


def test_a_step_passes_below_5_s_and_0_1_percent_errors() -> None:
    assert passes(_step())
    assert not passes(_step(p95_ms=5000.0))
    assert not passes(_step(error_pct=0.2))
    assert not passes(_step(served=0))
    assert not passes(_step(p95_ms=None))


def test_what_limited_a_step_is_named_from_its_figures() -> None:
    assert limited_by(_step(p95_ms=6000.0, machine_busy_pct=97.0)).startswith("CPU")
    assert limited_by(_step(p95_ms=6000.0)).startswith("skill latency")
    assert limited_by(_step(error_pct=1.0, errors_by_code={"0 ClientConnectorError": 9})).startswith("sockets")
    assert limited_by(_step(error_pct=1.0, errors_by_code={"503 overloaded": 9})).startswith("edge shedding")
    busy = limited_by(_step(error_pct=70.0, machine_busy_pct=99.0, errors_by_code={"502 upstream_unreachable": 9}))
    assert busy.startswith("CPU") and "upstream_unreachable" in busy


def test_a_soak_band_counts_only_samples_after_the_warm_up_against_their_baseline() -> None:
    rss = [100.0, 200.0, 150.0, 151.0, 149.0, 150.0, 162.0, 150.0, 141.0]  # a sample every 10 s
    samples = [{"t_s": 10.0 * i, "rss_mb": {"eu-1": r}} for i, r in enumerate(rss)]
    f = soak_summary(samples, ["eu-1"], warmup_s=20)["eu-1"]
    assert f["samples"] == 7  # the two warm-up samples (100 and 200 MB) are left out
    assert f["baseline_mb"] == 150.0  # median of the samples at 20, 30 and 40 s (the 30 s after warm-up)
    assert (f["min_mb"], f["max_mb"], f["max_minus_min_mb"]) == (141.0, 162.0, 21.0)
    assert f["max_distance_from_baseline_mb"] == 12.0
    band, around = soak_targets({"eu-1": f})
    assert band["met"] is False and around["met"] is False


def test_a_504_is_joined_with_its_node_skill_call_by_request_id(tmp_path: Path) -> None:
    router = {"msg": "request timed out", "request_id": "rt-1", "route": "/v1/skills/{skill}/invoke",
              "continued_by": "eu-1", "loop_lag_ms": 3.0}
    other = {**router, "request_id": "rt-2", "continued_by": None}
    (tmp_path / "router.log").write_text("not json, request timed out\n" + "\n".join(
        json.dumps(d) for d in (router, other)) + "\n")
    (tmp_path / "eu-1.log").write_text(json.dumps({"msg": "skill call outlived its caller", "request_id": "rt-1",
                                                   "skill_s": 10.2, "skill_drawn_ms": 10150.0}) + "\n")
    traced = traced_timeouts(tmp_path)
    assert [(t["request_id"], t["node"], t["skill_s"], t["skill_drawn_ms"]) for t in traced] == [
        ("rt-1", "eu-1", 10.2, 10150.0), ("rt-2", None, None, None)]
    assert traced_timeouts(tmp_path / "missing") == []


def test_the_reference_skill_tail_is_its_lognormal() -> None:
    assert skill_tail_probability(4.0) == pytest.approx(0.01)  # its p99
    assert skill_tail_probability(1.5) == pytest.approx(0.5)  # its median
    assert 3e-6 < skill_tail_probability(10.0) < 4e-6
