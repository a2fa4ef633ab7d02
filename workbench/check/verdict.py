"""What every check shares: the :class:`Verdict`, the percentile rule, and how a history is read.

A check is a pure function of a :class:`~workbench.history.Recording` (no I/O, no clock).  Its verdict
says whether it held, why not (one line per problem), the figures it measured and what it looked at
(``figures["looked_at"]``), so a reader can tell a pass from a check that had nothing to check:
"nothing measured" is always a failure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_server.strict.transfers import SPEND_DELAY_S
from workbench.history import Recording, RequestRecord
from workbench.spec.scenario import Scenario, ScenarioError

__all__ = [
    "NOTHING_MEASURED",
    "Verdict",
    "ms",
    "percentile",
    "run_seconds",
    "scenario_of",
    "served",
    "spend_publication_delay_s",
]

NOTHING_MEASURED = "nothing measured"


@dataclass
class Verdict:
    """The outcome of one check: ``ok``, why not (one line per problem) and the measured figures."""

    ok: bool
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty); p in [0, 100].

    The p-th percentile is the smallest sample such that at least p % of the samples are <= it: no
    interpolation, so every figure is a value that was measured.
    """
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ms(value: float | None) -> float | None:
    """Milliseconds as summaries show them: rounded to 0.001 ms (None stays None)."""
    return None if value is None else round(value, 3)


def scenario_of(rec: Recording) -> Scenario | None:
    """The recording's scenario, or None when it has none or it does not validate."""
    try:
        return Scenario.from_dict(rec.scenario) if rec.scenario else None
    except (ScenarioError, TypeError):
        return None


def spend_publication_delay_s(scenario: Scenario | None) -> float:
    """How much later than a grant its spend may reach the peers' views beyond the gossip itself: a strict
    node publishes a key's spends up to ``SPEND_DELAY_S`` after the first of them (only it ever spends
    its rights, so the views are for reading); an eventual node with its next round (0)."""
    return SPEND_DELAY_S if scenario is not None and scenario.mode == "strict" else 0.0


def run_seconds(rec: Recording, scenario: Scenario | None) -> float:
    """The run's length: the load's planned duration (the run clock starts with the load), else the
    recorded end, else the span of the requests.  The recorded end also counts the drain and the final
    scrape after the load stopped, so it would inflate the envelope."""
    if scenario is not None:
        return scenario.duration_s
    if rec.ended_s is not None and rec.ended_s > 0:
        return float(rec.ended_s)
    return max((r.end_s for r in rec.requests), default=0.0)


def served(r: RequestRecord) -> bool:
    """The system answered the request as designed: a 2xx, or a 429 (the limiter said no)."""
    return 200 <= r.status < 300 or r.status == 429
