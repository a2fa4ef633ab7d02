"""Client-visible errors, the error budget, and whether the history holds every request that was sent.

An *error* is a request the system did not answer as designed: no HTTP answer (status 0: refused,
reset, timed out, or never sent because the generator was full) or any status other than 2xx and 429.
A 429, and a 200 that says ``allowed: false``, are the limiter answering: not errors.

A request *cut at the end* (:data:`~workbench.history.records.CUT_AT_END`: still in flight when the
generator stopped waiting, after its drain or on a stop) is neither: the run's end cut it off before
its own timeout, so it says nothing about the system.  It is counted apart (``cut_at_end``), left out
of the budget's requests, and kept as an unknown outcome for the counter check (it may have been
granted).  The generator drains up to the request timeout, so a run that ends normally cuts none
unless its drain was set shorter.

The budget is a share of the requests judged (default 0.1 %), a setting of the verdict and not of the
scenario, so one scenario can be judged against several budgets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from workbench.check.verdict import NOTHING_MEASURED, Verdict, served
from workbench.history import Recording, RequestRecord

__all__ = [
    "DEFAULT_ERROR_BUDGET_PCT",
    "NEVER_SENT_PREFIXES",
    "check_complete",
    "check_error_budget",
    "client_errors",
    "error_budget_state",
    "is_error",
    "never_sent",
    "unknown_outcome",
]

DEFAULT_ERROR_BUDGET_PCT = 0.1  # percent of all requests

# Errors that prove the request never reached a server (so no token can have been granted for it):
# the generator's own overflow, and its clients' connect errors (refused, no route, DNS).
NEVER_SENT_PREFIXES = ("max_inflight reached", "ClientConnectorError", "ClientConnectorDNSError",
                       "ClientProxyConnectionError", "LeanConnectError")
_UNKNOWN_STATUSES = (502, 504)  # the router's "upstream broken / timed out": the node may have granted


def is_error(r: RequestRecord) -> bool:
    """Counted against the error budget: no answer, or a status other than 2xx and 429 (a request cut
    at the run's end is not: see the module docstring)."""
    return not served(r) and not r.cut_at_end


def never_sent(r: RequestRecord) -> bool:
    """A status-0 record whose error proves nothing was delivered to a server."""
    return r.status == 0 and r.error.startswith(NEVER_SENT_PREFIXES)


def unknown_outcome(r: RequestRecord) -> bool:
    """Sent, but the client cannot know whether tokens were granted (Jepsen's indeterminate op).

    Status 0 after the request may have been delivered (timeout, reset, disconnect, cut at the run's
    end while waiting), and the router's 502 / 504 (it lost the node mid-request).
    """
    return (r.status == 0 and not never_sent(r)) or r.status in _UNKNOWN_STATUSES


def error_budget_state(errors: int, requests: int, budget_pct: float) -> tuple[bool, float, int]:
    """``(within, rate_pct, allowed)``: the one rule the live view and the verdict both apply.

    ``allowed`` is floor(budget_pct % of requests); the run is within budget when errors <= allowed.
    """
    allowed = int(requests * budget_pct / 100.0 + 1e-9)
    rate = round(errors / requests * 100.0, 4) if requests else 0.0
    return errors <= allowed, rate, allowed


def client_errors(rec: Recording | Iterable[RequestRecord]) -> dict[str, Any]:
    """Every error, by status and by error code (or exception), with the retried requests beside;
    ``judged`` = requests not cut at the end (the budget's denominator)."""
    requests = list(rec.requests if isinstance(rec, Recording) else rec)
    errors = [r for r in requests if is_error(r)]
    retried = [r for r in requests if r.retried_from]
    cut = sum(1 for r in requests if r.cut_at_end)
    return {"total": len(errors), "requests": len(requests), "judged": len(requests) - cut, "cut_at_end": cut,
            "retried": len(retried), "retried_errors": sum(1 for r in retried if is_error(r)),
            "timeouts": sum(1 for r in errors if r.status == 0 and r.error.startswith("timeout")),
            "unknown_outcome": sum(1 for r in requests if unknown_outcome(r)),
            "rate": round(len(errors) / (len(requests) - cut), 6) if len(requests) > cut else 0.0,
            "by_status": {str(k): v for k, v in sorted(Counter(r.status for r in errors).items())},
            "by_error": dict(Counter(_error_label(r) for r in errors).most_common(10)),
            "first_s": min((r.intended_s for r in errors), default=None)}


def _error_label(r: RequestRecord) -> str:
    """The error code, or the exception's class (its message names ports and varies per request)."""
    if not r.error:
        return str(r.status)
    return r.error.split(":", 1)[0] if r.status == 0 else r.error


def check_error_budget(rec: Recording, *, budget_pct: float = DEFAULT_ERROR_BUDGET_PCT) -> Verdict:
    """At most ``budget_pct`` % of the judged requests are errors; over budget names the counts."""
    if budget_pct < 0:
        raise ValueError(f"error budget must be a percentage >= 0, not {budget_pct!r}")
    errs = client_errors(rec)
    within, rate, allowed = error_budget_state(errs["total"], errs["judged"], budget_pct)
    cut = errs["cut_at_end"]
    figures = {**errs, "budget_pct": budget_pct, "allowed_errors": allowed, "rate_pct": rate,
               "looked_at": f"{errs['judged']} requests" + (f" ({cut} more cut at the run's end, not judged)"
                                                            if cut else "")}
    if not errs["judged"]:
        return Verdict(False, [f"{NOTHING_MEASURED}: no request recorded"
                               + (f" that the run's end did not cut off ({cut} cut)" if cut else "")], figures)
    if within:
        return Verdict(True, [], figures)
    return Verdict(False, [f"{errs['total']} errors in {errs['judged']} requests ({rate:g} %) > budget "
                           f"{budget_pct:g} % ({allowed} allowed); by status {errs['by_status']}, "
                           f"by error {errs['by_error']}"], figures)


def check_complete(rec: Recording, *, require_complete: bool = True) -> Verdict:
    """The run ended normally and the history holds every request the generator sent.

    The generator's own count (``extra["generator"]["sent"]``) is compared with the recorded requests
    that were sent (all but the ones never sent); fewer recorded than sent, or none at all, is an
    incomplete history whatever the other checks say about it.
    """
    reasons: list[str] = []
    recorded = sum(1 for r in rec.requests if not r.error.startswith("max_inflight reached"))
    generator = rec.extra.get("generator") or {}
    sent = generator.get("sent")
    if not rec.requests:
        reasons.append(f"{NOTHING_MEASURED}: no request recorded"
                       + (f" (the generator sent {sent})" if sent else ""))
    elif isinstance(sent, int) and recorded < sent:
        reasons.append(f"the generator sent {sent} requests but only {recorded} were recorded")
    if require_complete and not rec.complete:
        reasons.append(f"run incomplete: {rec.incomplete_reason or 'no reason recorded'}")
    figures = {"recorded": recorded, "generator_sent": sent, "complete": rec.complete,
               "looked_at": f"{len(rec.requests)} request records"
                            + (f" against the generator's count of {sent}" if sent is not None else
                               " (no generator count recorded)")}
    return Verdict(not reasons, reasons, figures)
