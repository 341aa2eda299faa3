"""Time-series helpers shared by the detectors: smoothing, sustained windows, phases."""

from __future__ import annotations

import numpy as np
import pandas as pd


def running_median(x_S: np.ndarray, width: int) -> np.ndarray:
    """Centred running median along the step axis, NaN-aware (NaN rows stay NaN)."""
    if width <= 1:
        return np.asarray(x_S, dtype=float)
    s = pd.Series(np.asarray(x_S, dtype=float))
    out = s.rolling(width, center=True, min_periods=1).median().to_numpy().copy()
    out[np.isnan(s.to_numpy())] = np.nan
    return out


def first_window(mask_S: np.ndarray, window: int) -> int | None:
    """Index of the first row of the first run of `window` consecutive True rows, else None."""
    window = max(1, int(window))
    run = 0
    for i, m in enumerate(np.asarray(mask_S, dtype=bool)):
        run = run + 1 if m else 0
        if run >= window:
            return i - window + 1
    return None


def sustained(x_S: np.ndarray, above: float | None = None, below: float | None = None, *,
              window: int, smooth: int) -> int | None:
    """First row of the first `window`-long stretch where the smoothed series is beyond a bound.

    NaN rows (modality absent from a step) break a stretch: absence is not evidence."""
    s = running_median(x_S, smooth)
    with np.errstate(invalid="ignore"):
        mask = (s > above) if above is not None else (s < below)
    return first_window(mask & ~np.isnan(s), window)


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
