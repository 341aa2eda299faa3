"""A group's rows for the detectors, read where needed, screened by its rollup levels.

The detectors look for the first stretch of ``window`` rows where a (smoothed) per-row series is
beyond a threshold. :func:`first_runs` finds it exactly as a scan of the whole smoothed series
does, reading only the rows the finest rollup level cannot rule out: a window whose rows cannot
be beyond the bound (its minimum capacity rate is above the collapse threshold), or that holds
too few rows that can (:func:`rows_beyond`) for its piece of any stretch (:func:`_candidates`),
is never read; the search stops at the first stretch. Without levels (``load_run(...,
levels=False)``, online diagnosis, hand-built Datasets) every row is read: the same code, so the
same answers.
"""

from __future__ import annotations


import numpy as np
import xarray as xr

from moe_probe.store.reader import level_agrees

_STAT_READ = 2048
"""Windows of a level's stats read at once (not twice the level in memory)."""

_ORDER = ("layer", "modality", "expert", "term", "component", "task", "metric")
"""The stored order of the dims after ``step`` (hand-built Datasets may differ)."""
BLOCK = 8192
"""Most rows read at once; a search reads 256 rows first and doubles (early onsets are cheap)."""
_FIRST = 256
_BATCH = (4096, 16384)
"""Rows a prefetch reads at most: the first (an early onset stays cheap), the later ones."""
_SHORT, _RECENT = 512, 8
"""Reads of at most this many rows are kept, the last few of them (see GroupSource.rows)."""
_STAT_BLOCK = 1024
"""Windows :func:`rows_beyond` works on at once (its float64 temporaries stay small)."""


class GroupSource:
    """One group's committed rows (``ds``, lazy) and its rollup levels ({factor: Dataset})."""

    def __init__(self, ds: xr.Dataset, levels: dict[int, xr.Dataset] | None = None):
        self.ds = ds
        self.n = int(ds.sizes["step"])
        self._cache: dict = {}
        levels = {f: lv for f, lv in (levels or {}).items() if lv.sizes.get("step", 0)}
        # a level whose windows do not name the rows' steps (see level_agrees) is left out
        self.levels = {f: lv for f, lv in sorted(levels.items())
                       if level_agrees(lv, f, self.n, self.steps.__getitem__)}
        self.rows_read = 0
        """Rows read so far (summed over calls): what the levels saved, for tests and benchmarks."""

    @property
    def steps(self) -> np.ndarray:
        if "steps" not in self._cache:
            self._cache["steps"] = self.ds["step"].values
        return self._cache["steps"]

    def rows(self, var: str, a: int, b: int, layer: int | None = None) -> np.ndarray:
        """Rows [a, b) of ``var`` in stored dim order (one ``layer`` selected first: the stored
        chunks of ``load`` hold one layer, so that read touches only its bytes). Served from the
        last prefetch or a recent short read when they hold them: the detectors ask for the
        same edge rows cell by cell (a read costs a store call however few rows it has)."""
        a, b = max(0, a), min(self.n, b)
        got = self._cache.get("prefetched")
        if got is not None and got[0] == (var, layer) and b > a:
            _, idx, x = got
            i = np.searchsorted(idx, a)
            if i + (b - a) <= idx.size and idx[i] == a and idx[i + b - a - 1] == b - 1:
                return x[i:i + b - a]
        recent = self._cache.setdefault("recent", [])
        for key, a0, x in recent:
            if key == (var, layer) and a0 <= a and b <= a0 + len(x):
                return x[a - a0:b - a0]
        self.rows_read += max(0, b - a)
        x = self._read(var, slice(a, max(a, b)), layer)
        if b - a <= _SHORT:
            x.flags.writeable = False  # served again: nobody may change it in place
            recent.insert(0, ((var, layer), a, x))
            del recent[_RECENT:]
        return x

    def prefetch(self, var: str, ranges, layer: int | None = None) -> None:
        """Read the rows of scattered ranges [a, b) in one go (each chunk decoded once);
        :meth:`rows` then serves any range inside one of them, until the next prefetch."""
        idx = np.unique(np.concatenate([np.arange(max(0, a), min(self.n, b)) for a, b in ranges]))
        self._cache.pop("prefetched", None)
        if idx.size:
            self.rows_read += idx.size
            x = self._read(var, idx, layer)
            x.flags.writeable = False  # served in pieces: nobody may change it in place
            self._cache["prefetched"] = ((var, layer), idx, x)

    def _read(self, var, step, layer):
        da = self.ds[var]
        if layer is not None:
            da = da.isel(layer=layer)
        da = da.isel(step=step)
        return da.transpose("step", *[d for d in _ORDER if d in da.dims]).values

    # ------------------------------------------------------------------ levels
    @property
    def factor(self) -> int | None:
        """Rows per window of the finest level (None: no levels, every row is read)."""
        return next(iter(self.levels), None)

    @property
    def covered(self) -> int:
        """Rows the finest level covers (rows past it are always read)."""
        f = self.factor
        return 0 if f is None else int(self.levels[f].sizes["step"]) * f

    def stat(self, var: str, stat: str) -> np.ndarray | None:
        """The finest level's ``stat`` of a rate, (windows, *dims); None where not stored."""
        key = ("stat", var)
        if key not in self._cache:  # every stat at once: a chunk of the level holds them all
            f = self.factor
            lv = None if f is None else self.levels[f]
            got = None
            if lv is not None and var in lv:
                da = lv[var].transpose("step", "stat", ...)
                # a stat contiguous (a cell's windows are read one by one), built a block of
                # windows at a time (not twice the level in memory)
                got = {str(k): np.empty((da.shape[0], *da.shape[2:]), da.dtype)
                       for k in da["stat"].values}
                for a in range(0, da.shape[0], _STAT_READ):
                    block = da.isel(step=slice(a, a + _STAT_READ)).values
                    for i, v in enumerate(got.values()):
                        v[a:a + len(block)] = block[:, i]
            self._cache[key] = got
        got = self._cache[key]
        return None if got is None else got.get(stat)

    def total(self, var: str, a: int, b: int, layer: int | None = None) -> np.ndarray:
        """Exact sum of a count over rows [a, b): whole windows of the coarsest levels that fit,
        rows at the edges. Pieces are read for every layer once and kept (detectors ask layer by
        layer for the same ranges)."""
        out, f_min = None, self.factor or 0
        for lo, hi, f in _pieces(a, b, [(f, int(lv.sizes["step"])) for f, lv in
                                        reversed(self.levels.items())]):
            if f == 1 and layer is not None and hi - lo <= f_min:  # a few rows at the edges:
                key = ("total", var, lo, hi, "every layer")  # every layer in one read, kept
                if key not in self._cache:
                    self._cache[key] = np.nansum(self.rows(var, lo, hi).astype(np.float64), 0)
                part = self._cache[key][layer]
            elif f == 1:  # rows: a block at a time, one layer (all of them would not fit)
                key = ("total", var, lo, hi, layer)
                if key not in self._cache:
                    self._cache[key] = sum(
                        np.nansum(self.rows(var, r, min(hi, r + BLOCK), layer)
                                  .astype(np.float64), axis=0) for r in range(lo, hi, BLOCK))
                part = self._cache[key]
            else:  # windows: every layer at once (small), kept for the next layer's question
                key = ("total", var, lo, hi, f)
                if key not in self._cache:
                    self._cache[key] = self.levels[f][var].isel(step=slice(lo, hi)).values \
                        .astype(np.float64).sum(axis=0)
                part = self._cache[key] if layer is None else self._cache[key][layer]
            out = part if out is None else out + part
        return out


def _pieces(a: int, b: int, levels: list[tuple[int, int]]):
    """[a, b) as (lo, hi, factor) pieces: windows of the coarsest level that fit, finer at the
    edges, factor 1 = rows. ``levels``: (factor, windows), coarsest first."""
    if a >= b:
        return []
    for i, (f, w) in enumerate(levels):
        lo, hi = -(-a // f), min(b // f, w)
        if lo < hi:
            rest = levels[i + 1:]
            return [*_pieces(a, lo * f, rest), (lo, hi, f), *_pieces(hi * f, b, rest)]
    return [(a, b, 1)]


def rows_beyond(src: GroupSource, var: str, *, above=None, below=None, quantum: float = 0.0):
    """(windows, *dims) upper bound on the rows of each window of the finest level whose ``var``
    is beyond the bound, from its min, max, mean and count; None without that level.

    Rows above t: sum >= k·t' + (count - k)·min with t' = max(t, quantum) (``quantum``: the least
    positive value, for a series of fractions k/E), so k <= count·(mean - min) / (t' - min);
    and for t >= 0, k <= the rows above 0 (the ``positive`` stat)."""
    st = [src.stat(var, s) for s in ("min", "max", "mean", "count", "positive")]
    if any(v is None for v in st):
        return None
    out = np.empty(st[0].shape, np.int32)
    for a in range(0, len(out), _STAT_BLOCK):  # a block of windows at a time: small temporaries
        lo, hi, mean, count, pos = (np.asarray(v[a:a + _STAT_BLOCK], np.float64) for v in st)
        # a float32 mean is the float64 one rounded once: widen the gap by more than that
        eps = 1e-6 * (np.abs(mean) + np.abs(lo) + np.abs(hi))
        with np.errstate(invalid="ignore", divide="ignore"):
            if above is not None:
                t = max(above, quantum) if above >= 0 else above
                k = np.where(lo > above, count, count * (mean - lo + eps) / (t - lo))
                k = np.where(hi > above, k, 0)
                if above >= 0:
                    k = np.minimum(k, pos)
            else:
                k = np.where(hi < below, count, count * (hi - mean + eps) / (hi - below))
                k = np.where(lo < below, k, 0)
        k = np.ceil(np.nan_to_num(k, nan=0.0, posinf=np.inf) * (1 + 1e-9) + 1e-6)
        k = np.where(np.isfinite(k), k, count)
        out[a:a + _STAT_BLOCK] = np.minimum(k, count)
    return out


# ---------------------------------------------------------------------- the search
def running_median(x_RC: np.ndarray, width: int) -> np.ndarray:
    """Centred running median down each column, NaN-aware, NaN rows stay NaN: pandas'
    ``rolling(width, center=True, min_periods=1).median()`` (window [i - w//2, i + (w-1)//2])."""
    x = np.asarray(x_RC, dtype=np.float64)
    if width <= 1:
        return x
    pad = [np.full((n, *x.shape[1:]), np.nan) for n in (width // 2, (width - 1) // 2)]
    s = np.sort(np.lib.stride_tricks.sliding_window_view(
        np.concatenate([pad[0], x, pad[1]]), width, axis=0), axis=-1)
    k = np.isfinite(s).sum(-1)
    lo = np.take_along_axis(s, (np.maximum(k - 1, 0) // 2)[..., None], -1)[..., 0]
    hi = np.take_along_axis(s, (k // 2)[..., None], -1)[..., 0]
    out = (lo + hi) / 2
    out[np.isnan(x) | (k == 0)] = np.nan
    return out


def median_beyond(x_RC: np.ndarray, width: int, *, above=None, below=None,
                  rows: slice = slice(None)) -> np.ndarray:
    """Where :func:`running_median` of ``x_RC`` is beyond the bound (never at NaN), for the
    ``rows`` wanted (the others are context: their medians see fewer rows), mostly
    without taking a median: of k finite values, the median is beyond iff more than k/2 of them
    are (odd k: the middle one; even k: both middle ones, the mean of two beyond a bound being
    beyond it too), and it is not if fewer than k/2 are. Only even k with exactly k/2 beyond
    (never with the default odd width and no NaN) takes the median itself."""
    x = np.asarray(x_RC, dtype=np.float64)
    ok = np.isfinite(x)
    with np.errstate(invalid="ignore"):
        b = ((x > above) if above is not None else (x < below)) & ok
    if not ok.all() and np.isinf(x).any():  # the median's own handling of inf: take it
        s = running_median(x, width)
        with np.errstate(invalid="ignore"):
            return (((s > above) if above is not None else (s < below)) & ~np.isnan(s))[rows]
    w = max(1, width)
    lo, hi = w // 2, (w - 1) // 2  # rows each side that a row's median sees

    def window_sum(v):  # rows of v set in each row's median rows: w shifted sums (w is small)
        p = np.zeros((v.shape[0] + w - 1, *v.shape[1:]), np.int32)
        p[lo:lo + v.shape[0]] = v
        return sum(p[d:d + v.shape[0]] for d in range(w))

    k, c, ok = window_sum(ok)[rows], window_sum(b)[rows], ok[rows]
    out = (2 * c > k) & ok
    tie = (2 * c == k) & (k > 0) & ok
    r, c = np.nonzero(tie)
    if r.size > 64:
        s = running_median(x, width)[rows]
    elif r.size:  # a few (a truncated window at the series' ends): those medians alone
        s = np.full(tie.shape, np.nan)
        r0 = np.arange(x.shape[0])[rows][r]
        for i, j, i0 in zip(r, c, r0):
            s[i, j] = running_median(x[max(0, i0 - lo):i0 + hi + 1, j], width)[min(i0, lo)]
    if r.size:
        with np.errstate(invalid="ignore"):
            out |= tie & ((s > above) if above is not None else (s < below))
    return out


def _candidates(src: GroupSource, n: int, beyond_WC, *, window: int, smooth: int,
                nan_free: bool = False):
    """(windows, cells) bool: the windows of the finest level where a ``window``-row stretch of
    a cell's smoothed series can be beyond the bound (``beyond_WC``: rows of each window that
    can be, :func:`rows_beyond`); rows past the level's windows always can. None: every row.

    A stretch's rows are never NaN (a NaN row breaks it), so any w consecutive rows of it are
    the whole of one median's rows (of the row in their middle), of which at most w//2 are not
    beyond: the stretch holds at least :func:`_least` rows beyond, and so does each piece of it
    that falls in one window, of its own rows. With ``nan_free`` (the series is never NaN) the
    same holds of the ``window + w - 1`` rows its medians see, away from the series' ends. A
    stretch shorter than w needs one row beyond among those rows. A window that no stretch
    meeting these touches is never read."""
    f, cov = src.factor, min(src.covered, n)
    if beyond_WC is None or f is None:
        return None
    w = max(1, smooth)
    n_win = -(-n // f)
    n_cells = beyond_WC.shape[1]
    tail = np.array([min(f, n - i * f) for i in range(cov // f, n_win)], dtype=np.int64)
    pad = -(-(window + w) // f) + 1  # windows the rows a stretch's medians see can touch
    # rows before the first and past the last row hold none
    k = np.concatenate([np.zeros((pad, n_cells), np.int64), beyond_WC[:cov // f],
                        np.repeat(tail[:, None], n_cells, 1),
                        np.zeros((pad, n_cells), np.int64)]).astype(np.int16)
    e = np.arange(f + 1)  # the longest piece of a stretch a window can hold
    piece = (np.searchsorted(_least(e, w), e, side="right") - 1).astype(np.int16)[k]
    starts = np.arange(n_win)
    inner = ~((starts * f < w) | ((starts + pad) * f > n - w))[:, None]
    rules = [(-(w // 2), window + w - 1, 1, None)] if window < w else \
        [(0, window, _least(window, w), None)] + \
        ([(-(w // 2), window + w - 1, _least(window + w - 1, w), inner)] if nan_free else [])
    keep = np.zeros((n_win + 2 * pad + 1, n_cells), dtype=np.int32)  # +1/-1 marks, a cumsum
    for o in range(f):  # a stretch starting o rows into window i
        ok = np.ones((n_win, n_cells), dtype=bool)
        for d0, rows, need, where in rules:  # its rows [o + d0, o + d0 + rows) of window i
            a0, b0 = o + d0, o + d0 + rows
            cuts = [(j, max(a0, j * f), min(b0, j * f + f))
                    for j in range(a0 // f, (b0 - 1) // f + 1)]
            got = sum(np.minimum(k[pad + j:pad + j + n_win], hi - lo) for j, lo, hi in cuts)
            hold = got >= need
            if need > 1:
                for j, lo, hi in cuts:
                    hold &= piece[pad + j:pad + j + n_win] >= hi - lo
            ok &= hold if where is None else hold | ~where
        # every window the rows such a stretch's medians see touch
        keep[pad + (o - w // 2) // f:][:n_win] += ok
        keep[pad + (o + window + (w - 1) // 2 - 1) // f + 1:][:n_win] -= ok
    return np.cumsum(keep, axis=0)[pad:pad + n_win] > 0


def _least(rows, w: int):
    """Fewest rows beyond among ``rows`` consecutive rows of a stretch (w <= rows of it): every
    w consecutive ones hold at most w//2 that are not."""
    free = w // 2
    return rows - (rows // w) * free - np.minimum(rows % w, free)


def _regions(keep_W: np.ndarray, f: int, n: int, gap: int = 512):
    """Row ranges of the windows in ``keep_W``; ranges closer than ``gap`` rows are one (a
    read costs about a store chunk anyway; with a prefetch, which decodes each chunk once, only
    the rows the search needs are worth the work)."""
    idx = np.flatnonzero(keep_W)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) * f > gap)
    return [(int(idx[i]) * f, min(n, (int(idx[j]) + 1) * f))
            for i, j in zip(np.r_[0, breaks + 1], np.r_[breaks, idx.size - 1])]


def first_runs(src: GroupSource, n: int, n_cells: int, values, beyond_WC=None, *, above=None,
               below=None, window: int, smooth: int, nan_free: bool = False,
               prefetch=None) -> list[int | None]:
    """Per cell, the first row of the first ``window`` consecutive rows where the running median
    (width ``smooth``) of its series is beyond the bound, NaN rows breaking a stretch; else None
    (a centred running median, then the first run of `window` rows, cell by cell).

    ``values(a, b) -> (b - a, n_cells)``: the series' rows [a, b), for ``n`` rows.
    ``beyond_WC``: per window of ``src``'s finest level and cell, at most how many rows are
    beyond the bound (:func:`rows_beyond`); None = unknown (every row is read). ``nan_free``:
    the series is never NaN (a sharper bound on the rows a stretch needs). ``prefetch(ranges)``:
    called with the ranges to be read when the levels left only a few scattered rows."""
    window = max(1, int(window))
    h = max(1, smooth)  # rows each side that a row's median can see (and then some)
    onset = np.full(n_cells, -1, dtype=np.int64)
    keep = _candidates(src, n, beyond_WC, window=window, smooth=smooth, nan_free=nan_free)
    f = src.factor
    regions = [(0, n)] if keep is None else \
        _regions(keep.any(axis=1), f, n, 512 if prefetch is None else f)
    ends = np.cumsum([b - a for a, b in regions])
    batch_end, cap = 0, _BATCH[0]
    for ri, (r0, r1) in enumerate(regions):
        if prefetch is not None and ri >= batch_end:  # the next regions that fit: one read
            done = ends[ri - 1] if ri else 0
            batch_end = max(ri + 1, int(np.searchsorted(ends, done + cap, side="right")))
            if batch_end - ri > 1:
                prefetch([(max(0, a - h), min(n, b + h)) for a, b in regions[ri:batch_end]])
            cap = _BATCH[1]
        run = np.zeros(n_cells, dtype=np.int64)  # rows outside the regions are never beyond
        a, size = r0, _FIRST
        while a < r1 and (onset < 0).any():
            b = min(r1, a + size)
            size = min(BLOCK, 2 * size)
            lo, hi = max(0, a - h), min(n, b + h)
            active = onset < 0
            if keep is not None:  # cells found already may have been why this block is read
                live = active & keep[lo // f:(hi - 1) // f + 1].any(axis=0)
                if not live.any():
                    run[:] = 0
                    a = b
                    continue
            x = np.asarray(values(lo, hi), dtype=np.float64)[:, active]
            m = median_beyond(x, smooth, above=above, below=below, rows=slice(a - lo, b - lo))
            idx = np.arange(b - a)[:, None]
            last_false = np.maximum.accumulate(np.where(~m, idx, -1), axis=0)
            r = np.where(last_false < 0, run[active][None] + idx + 1, idx - last_false)
            hit = r >= window
            found = hit.any(axis=0)
            cells = np.flatnonzero(active)
            onset[cells[found]] = a + hit[:, found].argmax(axis=0) - window + 1
            run[cells] = r[-1]
            a = b
        if (onset >= 0).all():
            break
    return [None if o < 0 else int(o) for o in onset]


def _spans(n: int, windows, f, cov: int, last: bool):
    """Row spans to read, in search order: the given windows of the finest level, then the rows
    it does not cover; without levels, growing spans from the start (the end)."""
    if windows is None or f is None:
        spans, a, size = [], 0, _FIRST
        while a < n:
            spans.append((n - min(n, a + size), n - a) if last else (a, min(n, a + size)))
            a, size = a + size, min(BLOCK, 2 * size)
        return spans
    win = [(int(i) * f, int(i) * f + f) for i in windows]
    tail = [(a, min(n, a + BLOCK)) for a in range(cov, n, BLOCK)]
    return [*tail[::-1], *win] if last else [*win, *tail]


def series_edge(src: GroupSource, values, count_W=None, *, last: bool = False,
                n: int | None = None) -> float:
    """The first (``last``: the last) non-NaN value of a series (``values(a, b) -> (b - a,)``);
    ``count_W``: its non-NaN rows per window of the finest level, so only the window that holds
    it (and the uncovered rows) is read; without it, growing spans of its ``n`` rows (default
    the group's) from the start (the end). NaN if there is none."""
    w = None
    if count_W is not None and src.factor is not None:
        has = np.asarray(count_W) > 0
        i = len(has) - 1 - int(np.argmax(has[::-1])) if last else int(np.argmax(has))
        w = [i] if len(has) and has[i] else []
    for a, b in _spans(src.n if n is None else n, w, src.factor, src.covered, last):
        x = np.asarray(values(a, b), dtype=np.float64)
        x = x[~np.isnan(x)]
        if x.size:
            return float(x[-1] if last else x[0])
    return float("nan")


def series_extreme(src: GroupSource, values, stat_W=None, *, fn=np.nanmin) -> float:
    """``fn`` (nanmin / nanmax) of a whole series: the finest level's window ``stat_W`` over the
    rows it covers, the rows past them (every row without levels)."""
    parts = [] if stat_W is None or src.factor is None else [np.asarray(stat_W, np.float64)]
    a0 = src.covered if parts else 0
    parts += [np.asarray(values(a, min(src.n, a + BLOCK)), np.float64)
              for a in range(a0, src.n, BLOCK)]
    x = np.concatenate(parts) if parts else np.array([np.nan])
    return float(fn(x)) if np.isfinite(x).any() else float("nan")
