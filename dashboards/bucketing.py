"""Reduce long step series to what a screen can show without lying about extremes.

Lines keep, per bucket, the points where the minimum and the maximum occur (in step order), so a
spike or a collapse is drawn at its exact height and step at any zoom; heatmaps average each bucket
(a cell cannot show two values) and say so in their title.
"""

from __future__ import annotations

import numpy as np

TARGET_BUCKETS = 1500
"""~1-2k buckets of the visible range: a plot is at most a few thousand pixels wide."""


def bucket_size(n: int, target: int = TARGET_BUCKETS) -> int:
    return max(1, -(-n // target))


def minmax_line(steps: np.ndarray, values: np.ndarray, target: int = TARGET_BUCKETS):
    """(x, y) of a 1-D series with at most 2·target points; exact min and max of every bucket.

    NaN rows are skipped (a component a layer lacks is NaN); an all-NaN bucket leaves a gap.
    """
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    n = len(steps)
    b = bucket_size(n, target)
    if b == 1:
        return steps, values
    nb = -(-n // b)
    pad = nb * b - n
    v = np.concatenate([values, np.full(pad, np.nan)]).reshape(nb, b)
    finite = np.isfinite(v)
    has = finite.any(axis=1)
    imin = np.where(finite, v, np.inf).argmin(axis=1)
    imax = np.where(finite, v, -np.inf).argmax(axis=1)
    base = np.arange(nb) * b
    first = np.minimum(imin, imax)
    second = np.maximum(imin, imax)
    xs = np.stack([base + first, base + second], axis=1)
    keep = np.stack([has, has & (second != first)], axis=1)
    pos = xs[keep]
    return steps[pos], values[pos]


def mean_columns(steps: np.ndarray, values_SX: np.ndarray, target: int = TARGET_BUCKETS):
    """Bucket-mean along the step axis of a (step, X) block → (bucket start steps, (nb, X), size).

    NaN rows (no tokens of a modality at a step) are left out of their bucket's mean; an all-NaN
    bucket stays NaN. The last bucket may be shorter than the others."""
    steps = np.asarray(steps)
    v = np.asarray(values_SX, dtype=np.float64)
    n = len(steps)
    b = bucket_size(n, target)
    if b == 1:
        return steps, v, 1
    full = n // b
    # Full buckets are a reshape of the block (no copy for a contiguous float64 one); the short
    # last one is averaged apart, instead of padding the whole block with NaN (a copy, then
    # nanmean's masked copies: ~4x the time of a plain mean on a 50k-step × 64-expert block).
    parts = [_bucket_mean(v[:full * b].reshape((full, b) + v.shape[1:]))]
    if full * b < n:
        parts.append(_bucket_mean(v[full * b:][None]))
    return steps[::b], np.concatenate(parts, axis=0), b


def _bucket_mean(v_NB):
    """Mean over axis 1 of (bucket, step in bucket, ...), NaN left out; an all-NaN bucket is
    NaN (0/0). np.errstate, unlike warnings filters, is safe in the server's threads."""
    with np.errstate(invalid="ignore"):
        if not np.isnan(v_NB).any():
            return v_NB.mean(axis=1)
        finite = ~np.isnan(v_NB)
        return np.where(finite, v_NB, 0.0).sum(axis=1) / finite.sum(axis=1)
