"""The failover benchmark's measurement code on one short real drill: it yields every field it reports.

This checks the shape, not the targets (a shared test machine cannot promise 300 ms): one kill drill
of a few seconds through ``benchmarks/bench_failover.py``'s own functions, so a change in the drill,
checker or recorder that breaks the benchmark shows up in the test run rather than in the next full run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_failover.py"


def _bench() -> ModuleType:
    """Load the benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_failover", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_one_kill_drill_produces_every_failover_and_capacity_field(tmp_path: Path):
    bench = _bench()
    scenario = bench.scenario_for("kill", "check", seed=11, duration_s=4.5, fault_at_s=2.0)
    result, counters = await bench.drill(scenario, tmp_path / "run")
    row = bench.failover_figures(result, counters, "kill")
    for key in ("failover_ms", "clients_ms", "region_ms", "unserved_clients", "client_errors", "errors_by_kind",
                "router_retries", "retried_ok", "retried_failed", "inflight_not_retried", "generator"):
        assert key in row, key
    assert row["clients_ms"], "the killed region's clients were served elsewhere"
    assert row["failover_ms"]["p99"] is not None
    assert counters.scrapes > 0 and row["router_retries"] is not None  # the router's /metrics was read

    cap = bench.capacity_bins(result.recording, bench.KILLED, bench.GLOBAL_RATE)
    n = len(cap["bin_start_ms"])
    assert n == len(cap["survivor_pct_of_R"]) == len(cap["all_tokens"]) > 0
    assert 0 in cap["bin_start_ms"]
    assert cap["first_second_pct_of_R"] > 0 and cap["before_kill_all_pct_of_R"] > 0
    cap["route"] = "check"

    kill = bench.summarize_failover([row])
    assert kill["failover_ms"]["clients"] == len(row["clients_ms"])
    assert set(kill) >= {"region_ms", "by_route", "retried_failed", "inflight_not_retried", "other_errors"}
    summary = bench.summarize_capacity([cap])
    assert summary["first_second_pct_of_R"]["per_drill"] == [cap["first_second_pct_of_R"]]
    figure = json.loads(bench.capacity_figure([cap], bench.GLOBAL_RATE).to_json())
    assert len(figure["data"]) == 2 and figure["layout"]["xaxis"]["title"]["text"]
