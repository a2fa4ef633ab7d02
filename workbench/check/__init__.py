"""Judging a history: pure functions of a Recording, shared by the verdict and the live view.

One module per check: :mod:`~workbench.check.envelope`, :mod:`~workbench.check.tokens`,
:mod:`~workbench.check.convergence`, :mod:`~workbench.check.failover` (over
:mod:`~workbench.check.outages`), :mod:`~workbench.check.latency`, :mod:`~workbench.check.errors`;
:mod:`~workbench.check.summary` assembles them and :mod:`~workbench.check.live` keeps the same figures
while a run goes.  The exact definitions are in docs/checks.md.
"""

from workbench.check.convergence import check_convergence
from workbench.check.envelope import (
    DELIVERY_ALLOWANCE_S,
    admissions,
    allowance_inputs,
    check_envelope,
    check_envelope_counter,
    default_slack_s,
    max_window_excess,
)
from workbench.check.errors import (
    DEFAULT_ERROR_BUDGET_PCT,
    check_complete,
    check_error_budget,
    client_errors,
    is_error,
    unknown_outcome,
)
from workbench.check.failover import DEFAULT_STALL_S, FailoverTracker, check_failover, failover_times
from workbench.check.latency import latency_percentiles, throughput
from workbench.check.outages import Outage, OutageLog
from workbench.check.summary import summarize
from workbench.check.tokens import check_token_loss
from workbench.check.verdict import Verdict, percentile

__all__ = [
    "DEFAULT_ERROR_BUDGET_PCT",
    "DEFAULT_STALL_S",
    "DELIVERY_ALLOWANCE_S",
    "FailoverTracker",
    "Outage",
    "OutageLog",
    "Verdict",
    "admissions",
    "allowance_inputs",
    "check_complete",
    "check_convergence",
    "check_envelope",
    "check_envelope_counter",
    "check_error_budget",
    "check_failover",
    "check_token_loss",
    "client_errors",
    "default_slack_s",
    "failover_times",
    "is_error",
    "latency_percentiles",
    "max_window_excess",
    "percentile",
    "summarize",
    "throughput",
    "unknown_outcome",
]
