"""What a limiter still admits through a fault: admitted tokens per region and per side, against R.

Safety is judged by :mod:`workbench.check.envelope` (every window under ``B + R (t - s)``).  These
functions measure the other half of the strict-vs-eventual trade: how much of the rate the cluster
still serves while it is cut or after it lost a region, and how long it takes to get it back.  They
read the history only (the nodes' audit trails when there are any: grant time and the granting
node's region, exactly; otherwise the clients' admitted requests by answering region), so the same
figures come out of a real drill and of ``workbench simulate``.

Everything is binned on the run clock (``bin_s``, 0.1 s by default): a rate is tokens per second in a
bin, a share is a mean rate over ``[a, b)`` divided by R, and a recovery time is found by sliding a
``window`` over the bins, so its resolution is ``bin_s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from workbench.history import Recording
from workbench.spec.scenario import Scenario

__all__ = [
    "partition_sides",
    "promised_bound",
    "rate_share",
    "region_rates",
    "side_label",
    "sides_cumulative",
    "time_to_rate",
]


def partition_sides(scenario: Scenario) -> list[tuple[str, ...]]:
    """The sides of the scenario's first partition: its groups of regions, plus the regions no group
    names as one more side (a drill keeps those together).  No partition: one side, every region."""
    regions = tuple(scenario.topology.regions)
    split = next((f for f in scenario.faults if f.action == "partition"), None)
    if split is None:
        return [regions]
    sides = [tuple(r for r in g if r in regions) for g in split.groups]
    sides = [s for s in sides if s]
    rest = tuple(r for r in regions if all(r not in s for s in sides))
    return sides + ([rest] if rest else [])


def side_label(side: Sequence[str]) -> str:
    return "+".join(side)


def split_window(scenario: Scenario) -> tuple[float, float] | None:
    """``(start, end)`` of the first partition on the run clock: its heal, its duration or the run's end."""
    split = next((f for f in scenario.faults if f.action == "partition"), None)
    if split is None:
        return None
    heal = next((f.at_s for f in scenario.faults if f.action == "heal" and f.at_s >= split.at_s), None)
    end = heal if heal is not None else (split.at_s + split.duration_s if split.duration_s else scenario.duration_s)
    return split.at_s, min(end, scenario.duration_s)


def _grants(rec: Recording) -> list[tuple[float, str, str, int]]:
    """(run-clock time, region, key, cost) of every admission: audit trail first, else the clients."""
    if rec.audit:
        base = rec.started_wall
        return [(ev.ts - base, ev.region, ev.key, ev.cost) for ev in rec.audit]
    return [(r.start_s, r.answered_region, r.key, r.cost) for r in rec.requests if r.admitted]


def _n_bins(scenario: Scenario, bin_s: float) -> int:
    if not bin_s > 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s!r}")
    return max(1, math.ceil(scenario.duration_s / bin_s - 1e-9))


def region_rates(rec: Recording, scenario: Scenario, bin_s: float = 0.1) -> dict[str, Any]:
    """``{"bin_s", "t_s": [bin starts], "regions": {region: [admitted tokens/s per bin]}}``.

    Every region of the topology has a row (zeros when it admitted nothing); grants after the run's
    end fall in the last bin.
    """
    n = _n_bins(scenario, bin_s)
    rows = {r: [0.0] * n for r in scenario.topology.regions}
    for t, region, _key, cost in _grants(rec):
        if region in rows and t >= 0:
            rows[region][min(n - 1, int(t / bin_s))] += cost / bin_s
    return {"bin_s": bin_s, "t_s": [round(i * bin_s, 6) for i in range(n)], "regions": rows}


def rate_share(series: dict[str, Any], regions: Sequence[str], a: float, b: float, rate: float) -> float | None:
    """Mean admitted tokens/s of ``regions`` over the bins in ``[a, b)``, as a share of ``rate``."""
    bin_s = series["bin_s"]
    lo, hi = round(a / bin_s), min(len(series["t_s"]), round(b / bin_s))
    if hi <= lo or rate <= 0:
        return None
    total = sum(sum(series["regions"][r][lo:hi]) for r in regions)
    return round(total / (hi - lo) / rate, 4)


def time_to_rate(series: dict[str, Any], regions: Sequence[str], since: float, goal: float,
                 window: float = 0.2) -> float | None:
    """Seconds after ``since`` until the mean rate of ``regions`` over a sliding ``window`` first
    reaches ``goal`` tokens/s (measured at the window's end); None when it never does."""
    bin_s = series["bin_s"]
    width = max(1, round(window / bin_s))
    totals = [sum(series["regions"][r][i] for r in regions) for i in range(len(series["t_s"]))]
    start = round(since / bin_s)
    for i in range(start, len(totals) - width + 1):
        if sum(totals[i:i + width]) / width >= goal - 1e-9:
            return round((i + width) * bin_s - since, 3)
    return None


def promised_bound(scenario: Scenario, t_s: Sequence[float], keys: int = 1) -> list[float]:
    """What each mode promises for admitted[0, t] of ``keys`` keys of the first limit.

    ``strict``: the plain envelope ``B + R t``.  ``eventual``: each of the k sides of the partition
    may spend the whole rate alone, so ``B + R t + (k - 1) R (time cut so far)``, plus the staleness
    every run has (two gossip intervals of rate, as :func:`workbench.ui.studies.partition_findings`).
    """
    limit = scenario.limits[0]
    base = [keys * (limit.burst + limit.rate * t) for t in t_s]
    if scenario.mode == "strict":
        return [round(v, 3) for v in base]
    window = split_window(scenario)
    sides = len(partition_sides(scenario))
    staleness = 2 * scenario.topology.gossip_interval_ms / 1000 * limit.rate
    out = []
    for t, v in zip(t_s, base, strict=True):
        cut = 0.0 if window is None else max(0.0, min(t, window[1]) - window[0])
        out.append(round(v + keys * ((sides - 1) * limit.rate * cut + staleness), 3))
    return out


def sides_cumulative(rec: Recording, scenario: Scenario, bin_s: float = 0.1) -> dict[str, Any]:
    """Cumulative admitted tokens per side of the partition (and in total) at each bin's end, beside
    the envelope ``B + R t`` and the mode's promised bound (:func:`promised_bound`).

    Returns ``{"t_s", "sides": {label: [...]}, "total", "envelope", "bound", "rate_per_s":
    {label: [tokens/s per bin]}, "split": (start, end) | None, "mode", "keys"}``.
    """
    regional = region_rates(rec, scenario, bin_s)
    sides = partition_sides(scenario)
    t_end = [round((i + 1) * bin_s, 6) for i in range(len(regional["t_s"]))]
    rate_per_s: dict[str, list[float]] = {}
    cumulative: dict[str, list[float]] = {}
    for side in sides:
        label = side_label(side)
        rates = [sum(regional["regions"][r][i] for r in side) for i in range(len(t_end))]
        rate_per_s[label] = [round(x, 3) for x in rates]
        run, acc = [], 0.0
        for x in rates:
            acc += x * bin_s
            run.append(round(acc, 3))
        cumulative[label] = run
    total = [round(sum(c[i] for c in cumulative.values()), 3) for i in range(len(t_end))]
    keys = max(1, len({key for _t, _r, key, _c in _grants(rec)}))
    limit = scenario.limits[0]
    return {"t_s": t_end, "sides": cumulative, "total": total, "rate_per_s": rate_per_s,
            "envelope": [round(keys * (limit.burst + limit.rate * t), 3) for t in t_end],
            "bound": promised_bound(scenario, t_end, keys), "split": split_window(scenario),
            "mode": scenario.mode, "keys": keys, "rate": limit.rate, "burst": limit.burst}
