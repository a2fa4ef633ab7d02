"""Latency and throughput as the clients saw them, errors included.

Every request counts in the percentiles at the time it took: an error or a timeout is a wait the
user had, so leaving it out would make an outage look fast.  The counts of errors and timeouts are
given beside the percentiles so a reader sees how many of the samples were failures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from workbench.check.errors import is_error
from workbench.check.verdict import ms, percentile
from workbench.history import Recording, RequestRecord

__all__ = ["latency_percentiles", "throughput"]


def latency_percentiles(requests: Iterable[RequestRecord], percentiles: Sequence[float] = (50, 95, 99), *,
                        measure: str = "latency", include_errors: bool = True) -> dict[str, Any]:
    """Exact nearest-rank percentiles in ms: ``p50`` ..., ``max``, ``count``, ``errors``, ``timeouts``.

    ``latency`` counts from the intended send time (what a user waits, including generator lag and
    queueing); ``service`` from the actual send.  ``include_errors=False`` keeps only answered
    requests (status != 0), for comparisons with tools that drop failures; the verdict never does.
    """
    attr = {"latency": "latency_ms", "service": "service_ms"}[measure]
    chosen = [r for r in requests if include_errors or r.status != 0]
    values = sorted(getattr(r, attr) for r in chosen)
    out: dict[str, Any] = {f"p{p:g}": ms(percentile(values, p)) for p in percentiles}
    out["max"] = ms(values[-1] if values else None)
    out["count"] = len(values)
    out["errors"] = sum(1 for r in chosen if is_error(r))
    out["timeouts"] = sum(1 for r in chosen if r.status == 0 and r.error.startswith("timeout"))
    return out


def throughput(rec: Recording) -> dict[str, Any]:
    """Replies per second over the load's span (first intended send to last reply)."""
    reqs = rec.requests
    if not reqs:
        return {"throughput_rps": 0.0, "ok_rps": 0.0, "admitted_tokens_per_s": 0.0, "span_s": 0.0, "requests": 0}
    span = max(r.end_s for r in reqs) - min(r.intended_s for r in reqs)
    answered = sum(1 for r in reqs if r.status != 0)
    ok = sum(1 for r in reqs if r.admitted)
    tokens = sum(r.cost for r in reqs if r.admitted)
    per = (lambda n: round(n / span, 3)) if span > 0 else (lambda n: 0.0)
    return {"throughput_rps": per(answered), "ok_rps": per(ok), "admitted_tokens_per_s": per(tokens),
            "span_s": round(span, 6), "requests": len(reqs)}
