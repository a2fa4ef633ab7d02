"""Over-admission over time: the excess over the limit envelope of the worst window ending at each moment.

Cumulative admitted tokens next to ``B + R·t`` hide over-admission: 13 tokens over on 4,000 is a
line's width.  What the envelope check judges is, for every window ``[s, t]``,
``admitted[s, t] - (B + R·(t - s))``; plotting, for each bin of the run clock, the worst window that
*ends* in that bin shows when and by how much the limit was exceeded (above 0) and how much headroom
was left (below 0), next to the allowance the checker grants (``R · slack``).

Two forms, one definition (:func:`workbench.check.checker.max_window_excess`'s running minimum):
:func:`excess_over_time` per key from a recording (audit trail when there is one: exact grant times),
and :class:`BinnedExcess` incrementally from the live tracker's per-bin cumulative tokens, at bin
resolution (windows start and end on bin edges), for live charts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from workbench.check import checker
from workbench.history import Recording
from workbench.spec.scenario import Scenario, ScenarioError

__all__ = ["BinnedExcess", "excess_over_time"]


def _scenario(rec: Recording) -> Scenario | None:
    try:
        return Scenario.from_dict(rec.scenario) if rec.scenario else None
    except (ScenarioError, TypeError):
        return None


def _key_series(events: Sequence[tuple[float, int]], rate: float, burst: float, bin_s: float,
                n_bins: int) -> list[float]:
    """Per bin, the worst ``admitted[s, t] - B - R (t - s)`` over windows ending in the bin (at its
    events, or at its end when it has none)."""
    out: list[float] = []
    low, prefix, i = math.inf, 0.0, 0
    for b in range(n_bins):
        end = (b + 1) * bin_s
        worst = -math.inf
        while i < len(events) and events[i][0] < end:
            t, cost = events[i]
            low = min(low, prefix - rate * t)
            prefix += cost
            worst = max(worst, prefix - rate * t - low - burst)
            i += 1
        at_end = prefix - rate * end - min(low, prefix - rate * end) - burst
        out.append(round(max(worst, at_end), 3))
    return out


def excess_over_time(rec: Recording, *, bin_s: float = 0.5, max_keys: int = 5) -> dict[str, Any]:
    """``{"t_s", "keys": {key: [excess per bin]}, "allowance_tokens", "keys_total", "source"}``.

    The ``max_keys`` keys with the largest worst excess are kept (``keys_total`` says how many there
    were); ``allowance_tokens`` is what the checker lets a window exceed by (``R`` of the first limit
    times the default slack).  Bins end at ``bin_s, 2·bin_s, ...`` up to the run's length.
    """
    scenario = _scenario(rec)
    run_s = scenario.duration_s if scenario is not None else float(rec.ended_s or 0.0)
    source = "audit" if rec.audit else "client"
    by_key = checker.admissions(rec, source)
    n_bins = max(1, math.ceil(run_s / bin_s))
    series: dict[str, list[float]] = {}
    if scenario is not None:
        for key, events in by_key.items():
            limit = scenario.limit_for(key)
            if limit is not None:
                series[key] = _key_series(events, limit.rate, limit.burst, bin_s, n_bins)
    kept = sorted(series, key=lambda k: max(series[k], default=-math.inf), reverse=True)[:max_keys]
    rate = scenario.limits[0].rate if scenario is not None and scenario.limits else 0.0
    return {"t_s": [round((i + 1) * bin_s, 3) for i in range(n_bins)], "keys": {k: series[k] for k in kept},
            "keys_total": len(series), "source": source,
            "allowance_tokens": round(rate * checker.default_slack_s(scenario), 3)}


class BinnedExcess:
    """The same figure, fed bin by bin from cumulative admitted tokens and the cumulative envelope.

    The live tracker's envelope is ``K·(B + R·t)`` over the ``K`` keys seen, so a window ``(t_j, t_k]``
    is allowed ``E_k - E_j + K·B`` and ``K·B = E_k - K·R·t_k``; :meth:`extend` returns, per new bin,
    ``max over j < k`` of ``(P_k - P_j) - (E_k - E_j) - K·B`` (``j = -1``: the run's start).
    """

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.low = 0.0  # min over windows' starts of (P_j - (E_j - K·B)); the start has P = 0, E - KB = 0

    def extend(self, t_s: Sequence[float], admitted: Sequence[float], envelope: Sequence[float]) -> list[float]:
        out = []
        for t, p, e in zip(t_s, admitted, envelope, strict=True):
            keys = e / (self.burst + self.rate * t) if self.burst + self.rate * t > 0 else 1.0
            kb = keys * self.burst
            out.append(round(p - (e - kb) - self.low - kb, 3))
            self.low = min(self.low, p - (e - kb))
        return out
