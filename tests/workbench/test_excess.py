"""Excess over the envelope over time (workbench/check/excess.py) agrees with the envelope check."""

from __future__ import annotations

import random

import pytest

from workbench.check.envelope import max_window_excess
from workbench.check.excess import BinnedExcess, _key_series


@pytest.mark.parametrize("seed", range(20))
def test_the_worst_bin_is_the_checks_worst_window(seed: int):
    rng = random.Random(seed)
    rate, burst = rng.choice([(10.0, 5.0), (100.0, 100.0), (50.0, 1.0)])
    t, events = 0.0, []
    for _ in range(rng.randint(1, 400)):
        t += rng.expovariate(rate * rng.choice([0.5, 1.0, 2.0]))
        events.append((t, rng.choice([1, 1, 2])))
    n_bins = int(t / 0.5) + 2
    series = _key_series(events, rate, burst, 0.5, n_bins)
    best, _s, _t = max_window_excess(events, rate, burst)
    assert len(series) == n_bins
    assert max(series) == pytest.approx(best, abs=1e-3)


def test_a_burst_over_the_bucket_shows_in_its_bin_and_fades():
    # 20 tokens at once on a bucket of 10 refilling 10/s: 10 over in bin 0, then the excess decays
    series = _key_series([(0.1, 20)], 10.0, 10.0, 0.5, 4)
    assert series[0] == pytest.approx(10.0)
    assert series[1] < series[0] and series[-1] < 0


def test_binned_excess_from_cumulative_tokens():
    tracker = BinnedExcess(rate=10.0, burst=10.0)
    # one key: envelope 10 + 10 t; 30 tokens admitted by 1 s is 10 over; nothing more after
    out = tracker.extend([0.5, 1.0, 1.5], [10.0, 30.0, 30.0], [15.0, 20.0, 25.0])
    assert out[0] == pytest.approx(-5.0)
    assert out[1] == pytest.approx(10.0)
    assert out[2] == pytest.approx(5.0)  # the window (0, 1.5] holds 30 against 25
