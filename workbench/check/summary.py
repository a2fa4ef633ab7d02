"""The run's summary: every check's verdict and figures in one dict (``workbench drill --json``).

Checks (all in ``checks``, all must hold for ``invariants_ok``): ``envelope`` (audit trails),
``envelope_counter`` (clients only, unknown outcomes counted as admitted), ``token_loss`` (three
sources), ``convergence`` (after every heal and restart; not applicable without one), ``failover``
(every outage; not applicable without one), ``error_budget``, ``complete`` (the run ended normally
and the history holds every request sent), and ``client_errors`` when a maximum is given.  Every
check says what it looked at in ``checked``; a check that had nothing to look at fails.
"""

from __future__ import annotations

from typing import Any

from workbench.check.convergence import check_convergence
from workbench.check.envelope import check_envelope, check_envelope_counter, default_slack_s
from workbench.check.errors import DEFAULT_ERROR_BUDGET_PCT, check_complete, check_error_budget
from workbench.check.failover import DEFAULT_STALL_S, check_failover
from workbench.check.latency import latency_percentiles, throughput
from workbench.check.tokens import check_token_loss
from workbench.check.verdict import Verdict, scenario_of
from workbench.history import Recording

__all__ = ["summarize"]


def _outage_brief(o: dict[str, Any]) -> dict[str, Any]:
    """An outage's figures without the per-client list (which grows with the tenants)."""
    return {k: v for k, v in o.items() if k != "clients_ms"}


def summarize(rec: Recording, *, envelope_slack_s: float | None = None, tolerance_tokens: float = 0.0,
              convergence_intervals: float = 2.0, max_convergence_ms: float | None = None,
              max_client_errors: int | None = None,
              max_failover_ms: float | None = None, require_complete: bool = True,
              error_budget_pct: float = DEFAULT_ERROR_BUDGET_PCT, stall_s: float = DEFAULT_STALL_S) -> dict[str, Any]:
    """The run's summary and whether every check held (see the module docstring).

    ``envelope_slack_s`` defaults to :func:`default_slack_s` (the staleness eventual mode allows);
    ``error_budget_pct`` is the share of requests that may be errors (default 0.1 %);
    ``max_convergence_ms`` replaces the convergence bound (gossip intervals + one delivery);
    ``max_failover_ms`` bounds the failover p99 over clients; ``stall_s`` is the latency past which a
    request during an outage counts as stalled.
    """
    scenario = scenario_of(rec)
    if envelope_slack_s is None:
        envelope_slack_s = default_slack_s(scenario)
    verdicts: dict[str, Verdict] = {
        "envelope": check_envelope(rec, tolerance_tokens=tolerance_tokens, slack_s=envelope_slack_s),
        "envelope_counter": check_envelope_counter(rec, tolerance_tokens=tolerance_tokens, slack_s=envelope_slack_s),
        "token_loss": check_token_loss(rec),
        "convergence": check_convergence(rec, within_intervals=convergence_intervals, max_ms=max_convergence_ms),
        "failover": check_failover(rec, max_failover_ms=max_failover_ms, stall_s=stall_s),
        "error_budget": check_error_budget(rec, budget_pct=error_budget_pct),
    }
    labels = {"envelope": "envelope", "envelope_counter": "envelope (unknown outcomes counted as admitted)",
              "token_loss": "token loss", "convergence": "convergence", "failover": "failover",
              "error_budget": "errors", "complete": "incomplete", "client_errors": "client errors"}
    errs = verdicts["error_budget"].figures
    if max_client_errors is not None:
        ok = errs["total"] <= max_client_errors
        verdicts["client_errors"] = Verdict(ok, [] if ok else [
            f"{errs['total']} > {max_client_errors} (by status {errs['by_status']}, by error {errs['by_error']})"],
            {"looked_at": f"{errs['requests']} requests"})
    verdicts["complete"] = check_complete(rec, require_complete=require_complete)  # last: its reason ends the list
    checks = {name: v.ok for name, v in verdicts.items()}
    reasons = [f"{labels[name]}: {r}" for name, v in verdicts.items() for r in v.reasons]
    generator = rec.extra.get("generator") or {}
    if generator.get("valid") is False:
        reasons.append("figures distorted: the load generator fell behind its schedule ("
                       + "; ".join(generator.get("invalid_reasons") or []) + ")")
    env, counter = verdicts["envelope"].figures, verdicts["envelope_counter"].figures
    loss = verdicts["token_loss"].figures
    conv, fo = verdicts["convergence"].figures, verdicts["failover"].figures
    lat = latency_percentiles(rec.requests, (50, 95, 99))
    thr = throughput(rec)
    return {
        "generator_valid": generator.get("valid"),
        "generator_lag_p99_ms": (generator.get("lag_ms") or {}).get("p99"),
        "generator_sent": generator.get("sent"),
        "admitted_tokens": env.get("admitted_tokens", 0.0),
        "envelope_tokens": env.get("envelope_tokens", 0.0),
        "over_admission_pct": env.get("over_admission_pct"),
        "over_admitted_keys_pct": env.get("over_admitted_keys_pct"),
        "envelope_allowance": env.get("allowance"),
        "envelope_counter": {k: counter.get(k) for k in ("lower_bound_tokens", "upper_bound_tokens",
                                                          "unknown_outcome_requests", "worst_excess_tokens")},
        "failover_ms": {"p50": fo.get("p50"), "p99": fo.get("p99"), "max": fo.get("max")},
        "failover": {k: fo.get(k) for k in ("clients", "unserved_clients", "failed_requests", "timed_out_requests",
                                            "stalled_requests", "by_kind", "applicable")}
                    | {"outages": [_outage_brief(o) for o in fo.get("outages", [])], "stall_s": stall_s},
        "client_errors": errs["total"],
        "errors": {k: errs[k] for k in ("total", "requests", "rate_pct", "budget_pct", "allowed_errors", "by_status",
                                        "by_error", "timeouts", "unknown_outcome", "judged", "cut_at_end")},
        "error_budget_pct": error_budget_pct,
        "retried_requests": errs["retried"],
        "retried_errors": errs["retried_errors"],
        "token_loss": loss.get("token_loss", 0),
        "token_sources": {k: loss.get(k) for k in (
            "admitted_replies", "audit_events", "peer_views_compared", "answered_without_audit", "double_grants",
            "orphaned_at_kill", "unanswered_grants", "cost_mismatch", "peer_view_ahead", "peer_view_behind")},
        "throughput_rps": thr["throughput_rps"],
        "latency_ms": {"p50": lat["p50"], "p95": lat["p95"], "p99": lat["p99"]},
        "latency": lat,
        "invariants_ok": all(checks.values()),
        "reasons": reasons,
        "checks": checks,
        "checked": {name: v.figures.get("looked_at", "") for name, v in verdicts.items()},
        "worst_window_excess_tokens": env.get("worst_excess_tokens"),
        "envelope_slack_s": envelope_slack_s,
        "convergence_ms": conv.get("convergence_ms"),
        "convergence": {k: conv.get(k) for k in ("applicable", "convergence_p50_ms", "convergence_max_ms",
                                                 "allowed_ms", "note")}
                       | {"events": len(conv.get("events") or [])},
        "complete": rec.complete,
        "requests": len(rec.requests),
    }
