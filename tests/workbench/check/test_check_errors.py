"""A verdict that counts errors: the error budget, and histories that hold fewer requests than were sent."""

from __future__ import annotations

import subprocess
import sys

from check_histories import audited_run, request

from workbench.check import check_complete, check_error_budget, summarize
from workbench.history import CUT_AT_END
from workbench.spec.scenario import Scenario

SCEN = Scenario.build(rate=100, burst=100, duration_s=10)
NODES = ("eu-1", "us-1", "ap-1")


def clean(n: int = 1000) -> object:
    return audited_run(SCEN, [(i * 0.009, "tenant-0000", NODES[i % 3]) for i in range(n)], final_nodes=NODES)


def test_429_and_allowed_false_are_not_errors() -> None:
    rec = clean()
    rec.requests += [request(1.0, "eu", "eu-1", status=429)] * 50
    rec.requests += [request(2.0, "eu", "eu-1", allowed=False)] * 50
    v = check_error_budget(rec)
    assert v.ok and v.figures["total"] == 0 and v.figures["requests"] == 1100
    assert summarize(rec)["invariants_ok"], summarize(rec)["reasons"]


def test_errors_over_the_default_budget_fail_with_counts_by_status_and_error() -> None:
    rec = clean()
    rec.requests.append(request(3.0, "eu", "", status=503, error="no_healthy_region"))
    assert check_error_budget(rec).ok  # 1 of 1001: within 0.1 %
    rec.requests.append(request(3.1, "eu", "", status=0, error="timeout after 5.0 s"))
    v = check_error_budget(rec)
    assert not v.ok and v.figures["allowed_errors"] == 1
    assert "2 errors in 1002 requests" in v.reasons[0]
    assert "'503': 1" in v.reasons[0] and "'0': 1" in v.reasons[0] and "no_healthy_region" in v.reasons[0]
    s = summarize(rec)
    assert not s["invariants_ok"] and not s["checks"]["error_budget"]
    assert s["errors"]["by_error"] == {"no_healthy_region": 1, "timeout after 5.0 s": 1}
    assert summarize(rec, error_budget_pct=1.0)["checks"]["error_budget"]  # the setting, not the scenario


def test_a_run_with_every_request_failing_never_passes() -> None:
    rec = clean(0)
    rec.requests = [request(i * 0.01, "eu", "", status=503, error="no_healthy_region") for i in range(500)]
    s = summarize(rec)
    assert not s["invariants_ok"] and not s["checks"]["error_budget"]


def test_a_history_with_fewer_requests_than_the_generator_sent_is_incomplete() -> None:
    rec = clean(100)
    rec.extra["generator"] = {"sent": 100, "valid": True}
    assert check_complete(rec).ok
    rec.extra["generator"]["sent"] = 32_534  # the records of a second generator process were lost
    v = check_complete(rec)
    assert not v.ok and "sent 32534 requests but only 100 were recorded" in v.reasons[0]
    assert not summarize(rec)["checks"]["complete"]


def test_a_history_with_no_request_is_incomplete_and_nothing_passes() -> None:
    rec = clean(0)
    rec.extra["generator"] = {"sent": 32_534}
    s = summarize(rec)
    assert not s["invariants_ok"]
    assert not s["checks"]["complete"] and not s["checks"]["error_budget"] and not s["checks"]["envelope"]
    assert any("nothing measured" in r and "32534" in r for r in s["reasons"])
    assert s["checked"]["error_budget"] == "0 requests"


def test_the_cli_takes_an_error_budget_and_refuses_a_bad_one(tmp_path) -> None:
    cmd = [sys.executable, "-m", "workbench.cli", "drill", "--out", str(tmp_path / "r")]
    for bad in ("-1", "150", "lots"):
        done = subprocess.run([*cmd, "--error-budget", bad], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "--error-budget" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


def cut(t: float, home: str = "eu") -> object:
    """A request still in flight when the generator stopped waiting at the run's end."""
    return request(t, home, "", status=0, took=2.0,
                   error=f"{CUT_AT_END}: no answer within the 2 s drain after the sending window")


def test_requests_cut_at_the_end_are_not_errors_but_stay_unknown_outcomes() -> None:
    rec = clean()
    rec.requests += [cut(9.9) for _ in range(30)]  # 3 % of the requests: far over the budget as errors
    v = check_error_budget(rec)
    assert v.ok, v.reasons
    assert v.figures["total"] == 0 and v.figures["cut_at_end"] == 30
    assert v.figures["judged"] == 1000 and v.figures["requests"] == 1030
    assert "30 more cut at the run's end" in v.figures["looked_at"]
    s = summarize(rec)
    assert s["invariants_ok"], s["reasons"]
    assert s["errors"]["cut_at_end"] == 30 and s["client_errors"] == 0
    # Jepsen's counter rule: each may have been granted, so the upper bound counts them
    assert s["errors"]["unknown_outcome"] == 30
    assert s["envelope_counter"]["unknown_outcome_requests"] == 30
    counter = s["envelope_counter"]
    assert counter["upper_bound_tokens"] == counter["lower_bound_tokens"] + 30
    # a real timeout within the drain is still an error
    rec.requests += [request(9.8, "eu", "", status=0, error="timeout after 5.0 s")] * 2
    v = check_error_budget(rec)
    assert not v.ok and "2 errors in 1002 requests" in v.reasons[0]


def test_a_run_whose_every_request_was_cut_measured_nothing() -> None:
    rec = clean(0)
    rec.requests = [cut(i * 0.01) for i in range(50)]
    v = check_error_budget(rec)
    assert not v.ok and "nothing measured" in v.reasons[0] and "50 cut" in v.reasons[0]
    assert not summarize(rec)["invariants_ok"]


def test_a_cut_request_is_neither_failed_nor_stalled_in_an_outage() -> None:
    from check_histories import recording, traffic

    from workbench.check import check_failover
    from workbench.history import FaultRecord

    scen = Scenario.build(rate=100, burst=100, duration_s=4, nodes_per_region=1)
    rec = recording(scen, [FaultRecord(1.0, "kill", "us")])
    traffic(rec, "us", lambda t: "us-1" if t < 1.0 else (None if t < 1.05 else "eu-1"), start=0.0, end=4.0)
    key = "tenant-0009"  # a client that sends before the kill, is cut off, then served elsewhere
    rec.requests += [request(0.5, "us", "us-1", key=key), request(2.0, "us", "eu-1", key=key)]
    before = check_failover(rec).figures
    rec.requests.append(cut(1.5, "us"))
    rec.requests[-1].key = key
    after = check_failover(rec).figures
    assert after["clients"] == before["clients"] == 2
    assert (after["failed_requests"], after["stalled_requests"]) == (before["failed_requests"],
                                                                    before["stalled_requests"])
    assert before["stalled_requests"] == 0  # without the rule the cut request (2 s) would be stalled
