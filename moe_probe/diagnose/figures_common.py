"""Helpers shared by the report figures: step bucketing, JSON-plain lists, colours."""

from __future__ import annotations

import math

import numpy as np
import plotly.express as px

MAX_POINTS = 400
"""Longest line a figure draws per trace: longer series are averaged in consecutive buckets."""
MAX_COLUMNS = 80
"""Step columns of a heat map (load, cosine): keeps a 50k-step run's report a few MB."""
COLORS = px.colors.qualitative.Plotly


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def bucket(steps: np.ndarray, values: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Average consecutive rows (axis 0) into at most `max_points` buckets; a bucket is labelled
    with its first step. Short series come back unchanged, so values equal the store's."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=float)
    n = steps.size
    if n <= max_points:
        return steps, values
    b = math.ceil(n / max_points)
    pad = (-n) % b
    v = np.concatenate([values, np.full((pad, *values.shape[1:]), np.nan)])
    v = v.reshape(-1, b, *values.shape[1:])
    with np.errstate(invalid="ignore"), _quiet():
        out = np.nanmean(v, axis=1)
    return steps[::b], out


def plain(a, digits: int = 4) -> list:
    """Plain JSON list (NaN -> None, rounded): plotly would otherwise base64-encode numpy arrays,
    and rounding keeps heat maps small without changing what a reader sees."""
    arr = np.asarray(a, dtype=float)
    r = np.round(arr, digits).astype(object)
    r[~np.isfinite(arr)] = None
    return r.tolist()


def steps_list(s) -> list[int]:
    return [int(x) for x in np.asarray(s)]


class _quiet:
    """Silence numpy's "mean of empty slice" for all-NaN buckets (they stay NaN, as they should)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def nanmean(a, axis):
    with _quiet():
        return np.nanmean(np.asarray(a, dtype=float), axis=axis)
