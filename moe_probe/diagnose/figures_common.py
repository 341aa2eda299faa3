"""Helpers shared by the report figures: step bucketing, JSON-plain lists, colours."""

from __future__ import annotations

import base64
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


def plain(a, digits: int = 4) -> np.ndarray:
    """Rounded float array: rounding keeps heat maps small without changing what a reader sees.
    Arrays (not lists) because plotly validates lists element by element — seconds per report;
    the HTML writer turns them into plain JSON lists (NaN -> null), see :func:`to_json_value`."""
    return np.round(np.asarray(a, dtype=float), digits)


def steps_list(s) -> np.ndarray:
    return np.asarray(s, dtype=np.int64)


def plain_spec(o):
    """A figure's `to_plotly_json()` with plotly's base64 typed arrays ({dtype, bdata, shape},
    which plotly >= 6 makes from numpy arrays) turned back into arrays for :func:`to_json_value`."""
    if isinstance(o, dict):
        if "bdata" in o and "dtype" in o:
            a = np.frombuffer(base64.b64decode(o["bdata"]), dtype=np.dtype(o["dtype"]))
            shape = o.get("shape")
            if shape:
                a = a.reshape([int(x) for x in str(shape).split(",")] if isinstance(shape, str)
                              else shape)
            return a
        return {k: plain_spec(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain_spec(v) for v in o]
    return o


def to_json_value(o):
    """`json.dumps` default for figure specs: arrays as plain lists, NaN/inf as null (plotly's
    own JSON would base64-encode arrays, which a test or a reader cannot simply read back)."""
    if isinstance(o, np.ndarray):
        if o.dtype.kind == "f":
            r = o.astype(object)
            r[~np.isfinite(o)] = None
            return r.tolist()
        return o.tolist()
    if isinstance(o, np.generic):
        v = o.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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
