"""Shrinking a failing schedule: delta debugging over its fault list, then smaller values per fault.

``fails(scenario, faults)`` must be deterministic (the simulator is); every candidate is a whole
schedule re-simulated from scratch, so the result fails for the same reason the original did, only
with fewer and milder faults.  The number of simulations is capped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from workbench.run.sim.schedule import SimFault, normalize, with_faults
from workbench.spec.scenario import Scenario

__all__ = ["Shrunk", "shrink", "with_faults"]

Predicate = Callable[[Scenario, list[SimFault]], bool]


@dataclasses.dataclass
class Shrunk:
    scenario: Scenario
    faults: list[SimFault]
    runs: int  # simulations spent
    original_faults: int


def shrink(scenario: Scenario, faults: Sequence[SimFault], fails: Predicate, *, max_runs: int = 200) -> Shrunk:
    """A 1-minimal (within ``max_runs``) failing sub-schedule of ``faults``, with simplified values."""
    runs = 0

    def test(candidate: list[SimFault]) -> bool:
        nonlocal runs
        runs += 1
        ordered = normalize(candidate)
        return fails(with_faults(scenario, ordered), ordered)

    current = normalize(faults)
    n = 2
    while len(current) >= 1 and runs < max_runs:
        chunk = max(1, len(current) // n)
        subsets = [current[i:i + chunk] for i in range(0, len(current), chunk)]
        reduced = False
        for i in range(len(subsets)):
            if runs >= max_runs:
                break
            complement = [f for j, s in enumerate(subsets) if j != i for f in s]
            if test(complement):
                current, n, reduced = complement, max(n - 1, 2), True
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(current), 2 * n)
    # milder values: halve durations, delays, percentages and skews while it still fails
    for i in range(len(current)):
        for field in ("duration_s", "ms", "pct", "jitter_ms"):
            for _ in range(4):
                value = getattr(current[i], field)
                if runs >= max_runs or not value or (field == "pct" and value <= 1):
                    break
                candidate = list(current)
                candidate[i] = dataclasses.replace(current[i], **{field: round(value / 2, 3)})
                if not test(candidate):
                    break
                current = candidate
    current = normalize(current)
    return Shrunk(with_faults(scenario, current), current, runs, len(faults))
