"""Time-series helpers shared by the detectors: phases, first and last values. (The sustained
stretches the routing detectors look for are :func:`moe_probe.diagnose.source.first_runs`.)"""

from __future__ import annotations

import numpy as np


def phases(n: int, fraction: float) -> tuple[slice, slice]:
    """Early and late row slices, each `fraction` of the run (at least one row, no overlap)."""
    k = max(1, int(round(n * fraction)))
    k = min(k, max(1, n // 2))
    return slice(0, k), slice(n - k, n)


def tail_mean(x_S: np.ndarray, k: int) -> float:
    x = np.asarray(x_S, dtype=float)
    x = x[~np.isnan(x)]
    return float(np.mean(x[-max(1, k):])) if x.size else float("nan")


def first_valid(x_S: np.ndarray) -> float:
    x = np.asarray(x_S, dtype=float)
    x = x[~np.isnan(x)]
    return float(x[0]) if x.size else float("nan")
