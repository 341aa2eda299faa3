"""Reduce long step series to what a screen can show without lying about extremes.

Lines keep, per bucket, the points where the minimum and the maximum occur (in step order), so a
spike or a collapse is drawn at its exact height and step at any zoom; heatmaps average each bucket
(a cell cannot show two values) and say so in their title.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_probe.store.schema import ROLLUP_FACTORS

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


# ------------------------------------------------------------------ buckets of rows and windows
def bucket_rows(n: int, target: int = TARGET_BUCKETS) -> int:
    """Rows per bucket for `n` visible rows: at least `bucket_size`, rounded up to a whole
    multiple of the coarsest rollup factor that fits (schema ROLLUP_FACTORS). The size does not
    depend on which levels a store has, so a store without levels draws the same buckets from its
    rows as one with levels draws from its windows."""
    b = bucket_size(n, target)
    f = max((f for f in ROLLUP_FACTORS if f <= b), default=1)
    return f * -(-b // f)


@dataclass(frozen=True)
class Pieces:
    """Consecutive rows and/or rollup windows of one variable, in row order (what `bucket`
    reduces). `row0`: first row index of each piece (window w of level f starts at row w·f);
    `step`: its first step. Rates: `min`, `max`, `mean`, `count` (finite rows) per piece, a row
    being a piece with min = max = mean = its value; counts: `sum` only."""
    row0: np.ndarray
    step: np.ndarray
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    mean: np.ndarray | None = None
    count: np.ndarray | None = None
    sum: np.ndarray | None = None

    @classmethod
    def of_rows(cls, row0: int, steps, values, *, counts: bool) -> "Pieces":
        rows = np.arange(row0, row0 + len(steps))
        if counts:
            return cls(rows, steps, sum=values)
        return cls(rows, steps, min=values, max=values, mean=values,
                   count=np.isfinite(values).astype(np.float64))

    @staticmethod
    def concat(parts: list["Pieces"]) -> "Pieces":
        if len(parts) == 1:
            return parts[0]
        return Pieces(*(None if getattr(parts[0], f) is None
                        else np.concatenate([getattr(p, f) for p in parts])
                        for f in ("row0", "step", "min", "max", "mean", "count", "sum")))


@dataclass(frozen=True)
class Buckets:
    """One variable over a step range, reduced to buckets of `size` rows aligned on row indices
    that are multiples of `size` (the first and last bucket are cut at the range's edges).

    Rates: per bucket, `min` and `max` (exact: min of window minima, max of window maxima) with
    `min_step`/`max_step`, the step where they occur — exact when read from rows, else the first
    step of the window holding them (within `factor` rows); `mean` of the finite rows (a
    count-weighted mean of window means) and their `count`. Counts: `sum`. Arrays are
    (bucket, *dims) with `coords` the labels of `dims`; `read` counts what was read: rows, and
    windows per level."""
    step: np.ndarray
    size: int
    factor: int
    dims: tuple
    coords: dict
    read: dict
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    min_step: np.ndarray | None = None
    max_step: np.ndarray | None = None
    mean: np.ndarray | None = None
    count: np.ndarray | None = None
    sum: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    def line(self, col=()) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the column `col` (indices into `dims`) as a line: each bucket's min and max
        in step order (one point when they coincide); an empty bucket is one NaN point at its
        first step, which plotly draws as a gap."""
        at = (slice(None), *np.atleast_1d(col).tolist())
        lo, hi, slo, shi = self.min[at], self.max[at], self.min_step[at], self.max_step[at]
        has = self.count[at] > 0
        lo_first = slo <= shi
        x1, y1 = np.where(lo_first, slo, shi), np.where(lo_first, lo, hi)
        x2, y2 = np.where(lo_first, shi, slo), np.where(lo_first, hi, lo)
        x1, y1 = np.where(has, x1, self.step), np.where(has, y1, np.nan)
        two = has & ((slo != shi) | (lo != hi))
        keep = np.stack([np.ones_like(has), two], axis=1)
        return np.stack([x1, x2], axis=1)[keep], np.stack([y1, y2], axis=1)[keep]


def bucket(p: Pieces, size: int, **meta) -> Buckets:
    """Reduce pieces (none straddling a multiple of `size` rows) to buckets of `size` rows."""
    bid = p.row0 // size
    n = len(bid)
    starts = np.flatnonzero(np.r_[True, bid[1:] != bid[:-1]]) if n else np.zeros(0, np.int64)
    step = p.step[starts]
    if not n:  # an empty range: empty arrays of the right shapes
        if p.sum is not None:
            return Buckets(step, size, **meta, sum=p.sum)
        at = np.zeros(p.min.shape, np.int64)
        return Buckets(step, size, **meta, min=p.min, max=p.max, min_step=at, max_step=at,
                       mean=p.mean, count=p.count)
    if p.sum is not None:
        return Buckets(step, size, **meta, sum=np.add.reduceat(p.sum, starts, axis=0))
    which = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))  # piece → bucket
    pos = np.arange(n).reshape(-1, *([1] * (p.min.ndim - 1)))
    steps_ext = np.r_[p.step, -1]

    def extreme(ufunc, v):
        ext = ufunc.reduceat(v, starts, axis=0)
        first = np.minimum.reduceat(np.where(v == ext[which], pos, n), starts, axis=0)
        return ext, steps_ext[first]  # first piece holding it (-1: an all-NaN bucket)

    mn, mn_step = extreme(np.fmin, p.min)
    mx, mx_step = extreme(np.fmax, p.max)
    count = np.add.reduceat(p.count, starts, axis=0)
    with np.errstate(invalid="ignore"):  # NaN·0 of empty pieces, left out by the where
        total = np.add.reduceat(np.where(p.count > 0, p.mean * p.count, 0.0), starts, axis=0)
    mean = np.full(count.shape, np.nan)
    np.divide(total, count, out=mean, where=count > 0)
    return Buckets(step, size, **meta, min=mn, max=mx, min_step=mn_step, max_step=mx_step,
                   mean=mean, count=count)
