"""Summaries of measured delays: the figures every timing scenario prints."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary(milliseconds: Sequence[float]) -> dict[str, float]:
    """Min, median, p99 and max of ``milliseconds``, rounded to a tenth."""
    ordered = sorted(milliseconds)
    return {
        "min": round(ordered[0], 1),
        "p50": round(statistics.median(ordered), 1),
        "p99": round(_percentile(ordered, 0.99), 1),
        "max": round(ordered[-1], 1),
    }
