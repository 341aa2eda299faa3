"""Reduce long step series to what a screen can show without lying about extremes.

Lines keep, per bucket, the points where the minimum and the maximum occur (in step order), so a
spike or a collapse is drawn at its exact height at any zoom; heatmaps average each bucket (a cell
cannot show two values) and say so in their title.

`minmax_line` / `mean_columns` bucket rows in memory (series without rollup levels); `Pieces` /
`bucket` / `Buckets` are the arithmetic of `dashboards.data.read_buckets`, which builds buckets
from rollup windows and rows alike (window stats combine exactly: min of minima, max of maxima,
count-weighted mean, sums).
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
    rows as one with levels draws from its windows. The rounding up leaves between target/2 and
    target buckets (e.g. 500k rows, target 1500: 334 → 512 rows, 977 buckets)."""
    b = bucket_size(n, target)
    f = max((f for f in ROLLUP_FACTORS if f <= b), default=1)
    return f * -(-b // f)


_FIELDS = ("row0", "step", "min", "max", "mean", "count", "sum", "min_step", "max_step")


@dataclass(frozen=True)
class Pieces:
    """Consecutive stretches of rows of one variable, in row order, each inside one bucket (what
    `bucket` reduces): rollup windows, or rows already reduced per bucket (`of_rows`).
    `row0`: first row index of each piece (window w of level f starts at row w·f); `step`: its
    first step. Rates: `min`, `max`, `mean` (of the finite rows), `count` (finite rows) and the
    steps of the min and max (`min_step`, `max_step`; a window's: its first step); counts: `sum`.
    Arrays are (piece, *dims)."""
    row0: np.ndarray
    step: np.ndarray
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    mean: np.ndarray | None = None
    count: np.ndarray | None = None
    sum: np.ndarray | None = None
    min_step: np.ndarray | None = None
    max_step: np.ndarray | None = None

    @classmethod
    def of_windows(cls, w0: int, factor: int, steps, *, sum=None, stats=None) -> "Pieces":
        """Windows w0, w0+1, … of a level (`stats`: (window, stat, …) in ROLLUP_STATS order)."""
        rows, steps = np.arange(w0, w0 + len(steps)) * factor, np.asarray(steps)
        if stats is None:
            return cls(rows, steps, sum=sum)
        at = np.broadcast_to(steps.reshape(-1, *[1] * (stats.ndim - 2)), stats[:, 0].shape)
        return cls(rows, steps, min=stats[:, 0], max=stats[:, 1], mean=stats[:, 2],
                   count=stats[:, 3], min_step=at, max_step=at)

    @classmethod
    def of_rows(cls, row0: int, steps, values, size: int, *, counts: bool) -> "Pieces":
        """Rows row0, row0+1, … reduced to one piece per bucket of `size` rows they touch:
        blocks of whole buckets are reshaped, not copied, and reduced along the rows."""
        n, parts = len(steps), []
        head = min(n, -row0 % size)
        full = (n - head) // size * size
        for a, b, m in ((0, head, head), (head, head + full, size), (head + full, n, n - head - full)):
            if b > a:
                parts.append(cls._reduce(row0 + a, steps[a:b], values[a:b], m, counts))
        if not parts:  # no rows: empty pieces of the right shapes
            parts.append(cls._reduce(row0, steps[:0], values[:0], 1, counts))
        return cls.concat(parts)

    @classmethod
    def _reduce(cls, row0, steps, v, m, counts) -> "Pieces":
        k, rest = len(steps) // m, v.shape[1:]
        x = v.reshape(k, m, *rest)
        rows, first = row0 + np.arange(k) * m, steps[::m][:k]
        if counts:
            return cls(rows, first, sum=x.sum(axis=1, dtype=np.float64 if v.dtype.kind == "f"
                                                  else np.int64))
        fin = np.isfinite(x)
        if fin.all():  # the usual case: no masked copies
            lo, hi, count = x.argmin(axis=1), x.argmax(axis=1), np.full((k, *rest), float(m))
            mean = x.mean(axis=1, dtype=np.float64)
        else:
            lo = np.where(fin, x, np.inf).argmin(axis=1)
            hi = np.where(fin, x, -np.inf).argmax(axis=1)
            count = fin.sum(axis=1).astype(np.float64)
            mean = np.full(count.shape, np.nan)
            np.divide(np.where(fin, x, 0.0).sum(axis=1, dtype=np.float64), count, out=mean,
                      where=count > 0)
        at = np.broadcast_to(steps.reshape(k, m, *[1] * len(rest)), x.shape)

        def pick(a, i):  # (k, m, …)[bucket, i, …]; an all-NaN bucket picks a NaN row
            return np.take_along_axis(a, i[:, None], axis=1)[:, 0]
        return cls(rows, first, min=pick(x, lo), max=pick(x, hi), mean=mean, count=count,
                   min_step=pick(at, lo), max_step=pick(at, hi))

    @staticmethod
    def concat(parts: list["Pieces"]) -> "Pieces":
        if len(parts) == 1:
            return parts[0]
        return Pieces(*(None if getattr(parts[0], f) is None
                        else np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


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
    if not n:  # an empty range: empty arrays of the right shapes
        return Buckets(p.step, size, **meta, min=p.min, max=p.max, min_step=p.min_step,
                       max_step=p.max_step, mean=p.mean, count=p.count, sum=p.sum)
    starts = np.flatnonzero(np.r_[True, bid[1:] != bid[:-1]])
    step = p.step[starts]
    if p.sum is not None:
        return Buckets(step, size, **meta, sum=np.add.reduceat(p.sum, starts, axis=0))
    which = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))  # piece → bucket
    pos = np.arange(n).reshape(-1, *([1] * (p.min.ndim - 1)))

    def extreme(ufunc, v, at):
        ext = ufunc.reduceat(v, starts, axis=0)
        first = np.minimum.reduceat(np.where(v == ext[which], pos, n), starts, axis=0)
        at = np.concatenate([at, np.full((1, *at.shape[1:]), -1)])  # -1: an all-NaN bucket
        return ext, np.take_along_axis(at, first, axis=0)  # the first piece holding it

    mn, mn_step = extreme(np.fmin, p.min, p.min_step)
    mx, mx_step = extreme(np.fmax, p.max, p.max_step)
    count = np.add.reduceat(p.count, starts, axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # NaN·0 of empty pieces, left out by the where
        total = np.add.reduceat(np.where(p.count > 0, p.mean * p.count, 0.0), starts, axis=0,
                                dtype=np.float64)
    mean = np.full(count.shape, np.nan)
    np.divide(total, count, out=mean, where=count > 0)
    return Buckets(step, size, **meta, min=mn, max=mx, min_step=mn_step, max_step=mx_step,
                   mean=mean, count=count)
