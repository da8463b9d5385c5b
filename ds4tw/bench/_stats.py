"""
The arithmetic of the benchmark, in one place so that every stack's
numbers are computed the same way (and unit-tested).

Decode rate is C{(n - 1) / (t_last - t_first)} over the arrival times of
n tokens: the first token's time belongs to TTFT (it includes the
prefill), so only the n - 1 intervals after it measure decoding. The raw
in-process numbers go through the same function with the times at which
each token was sampled.

Covered by tests/unit/test_bench.py.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from typing import Any


def decode_rate(times: Sequence[float]) -> float | None:
    """Tokens per second from per-token arrival times (None if < 2 tokens)."""
    if len(times) < 2:
        return None
    span = times[-1] - times[0]
    if span <= 0:
        return None
    return (len(times) - 1) / span


def gaps(times: Sequence[float], start: float | None = None) -> list[float]:
    """
    Silences between consecutive arrival times, in seconds; with C{start}
    (when the request was sent) the wait for the first byte counts too.
    """
    points = ([start] if start is not None else []) + sorted(times)
    return [b - a for a, b in itertools.pairwise(points)]


def ratio(value: float | None, reference: float | None) -> float | None:
    """C{value / reference}, or None when either is missing or zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """
    C{{n, median, mean, min, max, p90, values}} over the values that are
    not None; the statistics are None when there are none.
    """
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return {"n": 0, "median": None, "mean": None, "min": None, "max": None, "p90": None}
    return {
        "n": len(clean),
        "median": statistics.median(clean),
        "mean": statistics.fmean(clean),
        "min": min(clean),
        "max": max(clean),
        "p90": percentile(clean, 90),
        "values": clean,
    }


def median(values: Sequence[float | None]) -> float | None:
    result = summary(values)["median"]
    return None if result is None else float(result)
