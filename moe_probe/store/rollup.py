"""Rollup levels of a group: windows of 16, 256, 4096 rows (schema 1.2, :func:`schema.rollup_arrays`).

One :class:`GroupRollup` per group keeps, in memory, each level's partial window and the finished
windows not yet written; :meth:`GroupRollup.add` folds rows in as the writer commits them, and
:meth:`GroupRollup.write` writes finished windows a whole chunk at a time (on ``last``, a close,
the finest level's other windows too: a coarser level then lags by less than a chunk, and
readers take those steps from the finer level, so a close costs one level's write, not three). A level is built from the next finer level's stored values, never
from the rows directly, so windows are the same whichever way they were built (while training,
after a resume, by ``moe-probe rollup``).

Crash safety is the rows' own: per level, data, then ``step``, then the level's
``committed_steps`` marker (windows), each level written only up to what the finer level has
committed, and every level only ever behind the rows. A level that lags is normal (readers use
the rows past it); :meth:`GroupRollup.catch_up` rebuilds what is missing from what is stored.
"""

from __future__ import annotations

import asyncio

import numpy as np
import zarr
from zarr.core.sync import sync

from moe_probe import metrics as mt
from moe_probe.store.layout import label_arrays, step_array
from moe_probe.store.schema import (
    COUNTS, GROUPS, LABEL_DIMS, ROLLUP_CHUNK_BYTES, ROLLUP_CHUNKS, ROLLUP_FACTORS,
    ROLLUP_FINEST_LAYERS, ROLLUP_GROUPS, ROLLUP_STATS, level_compressors, rollup_arrays,
    rollup_chunks, rollup_path,
)

__all__ = ["GroupRollup", "create_levels", "level_chunks", "add_rollups", "rows_reader", "shrink"]

_BATCH = 1024
"""Rows (or finer windows) read at a time when catching up: bounds memory on a large store."""
_GROW = 8
"""Chunks a level's arrays grow by at once."""
_WRITE_BATCH = 64
"""Chunks encoded in one batch when a level is written (see _Level)."""
_DEAD_ROWS = 64
"""Rows of ``load`` per block when computing ``group_dead_frac`` (see GroupRollup._dead_frac)."""


def _gather(coros) -> None:
    """Run zarr's async writes of one level together: its ~15 small arrays each cost a few ms of
    event-loop round trip when written one after another, more than their bytes."""
    coros = list(coros)
    if coros:
        async def _all():
            await asyncio.gather(*coros)
        sync(_all())


def shrink(arrays, n: int) -> None:
    """Cut ``arrays`` back to ``n`` rows along ``step`` (a writer's clean close). zarr's resize
    deletes every chunk key of the old shape past the new one by default, which costs more than
    the close's writes on a wide store; a writer never writes past its marker, so there is
    nothing there to delete."""
    _gather(a.async_array.resize((n, *a.shape[1:]), delete_outside_chunks=False)
            for a in arrays if a.shape[0] != n)


def create_levels(root: zarr.Group, group: str, labels: dict, present: list[str],
                  chunks: dict[int, int] | None = None):
    """Lay out every level of ``group`` (empty, marker 0) for the arrays the group has, with
    ``chunks`` windows per chunk of each level (default :data:`ROLLUP_CHUNKS`, the finest level's
    grown on a narrow store: :func:`_finest_windows`)."""
    specs = rollup_arrays(group)
    sizes = {d: len(v) for d, v in labels.items()}
    sizes["stat"] = len(ROLLUP_STATS)
    chunks = level_chunks({ROLLUP_FACTORS[0]: _finest_windows(specs, sizes), **(chunks or {})})
    for f in ROLLUP_FACTORS:
        layers = ROLLUP_FINEST_LAYERS if f == ROLLUP_FACTORS[0] else 1
        lvl = root.require_group(rollup_path(group, f))
        label_arrays(lvl, {**labels, "stat": list(ROLLUP_STATS)}, overwrite=True)
        for name, spec in specs.items():
            if name in GROUPS[group] and name not in present:
                continue  # an optional array this store does not have
            if name == "group_dead_frac" and "load" not in present:
                continue
            if name == "window_capacity_rate" and not {"kept", "tokens"} <= set(present):
                continue  # recomputed from both sums (online diagnosis keeps no `kept`)
            fill = np.nan if np.dtype(spec.dtype).kind == "f" else 0
            lvl.create_array(name, shape=(0, *(sizes[d] for d in spec.dims)), dtype=spec.dtype,
                             chunks=rollup_chunks(chunks[f], name, spec.dims, sizes,
                                                  layers),
                             fill_value=fill, dimension_names=("step", *spec.dims),
                             compressors=level_compressors(), overwrite=True)
        step_array(lvl, chunks[f], overwrite=True)
        lvl.attrs.update({"factor": f, "group": group, "committed_steps": 0})


def _finest_windows(specs: dict, sizes: dict[str, int]) -> int:
    """Windows per chunk of the finest level: :data:`ROLLUP_CHUNKS`' 256, doubled (up to 4096)
    while a chunk of its widest array (one layer's, for arrays chunked by layer) stays within
    :data:`ROLLUP_CHUNK_BYTES`. A level's write
    costs about the same whatever its bytes (zarr's per-chunk work), so a narrow store's finest
    level (the demo model's: 2048 windows) is written once per 32768 rows instead of 8 times,
    while a wide one's chunks, and the windows a writer holds, stay as they were."""
    widest = max(int(np.prod(rollup_chunks(1, name, spec.dims, sizes))) * np.dtype(spec.dtype)
                 .itemsize for name, spec in specs.items())
    w = ROLLUP_CHUNKS[ROLLUP_FACTORS[0]]
    while w < 4096 and 2 * w * widest <= ROLLUP_CHUNK_BYTES:
        w *= 2
    return w


def level_chunks(chunks: dict[int, int] | None) -> dict[int, int]:
    """{factor: windows per chunk}: :data:`ROLLUP_CHUNKS` updated by ``chunks`` (checked)."""
    out = {**ROLLUP_CHUNKS, **(chunks or {})}
    if set(out) != set(ROLLUP_FACTORS) or not all(
            isinstance(c, int) and c > 0 for c in out.values()):
        raise ValueError(f"rollup chunks: windows per chunk (an int > 0) for levels "
                         f"{list(ROLLUP_FACTORS)}; got {chunks}")
    return out


class _Level:
    def __init__(self, grp: zarr.Group, group: str, factor: int, ratio: int):
        self.grp, self.factor, self.ratio = grp, factor, ratio
        present = set(grp.array_keys())
        # A level's write covers every chunk of its arrays across the window range (32 load
        # chunks on a 32-layer store): encoded in one batch per array rather than zarr's default
        # one chunk per batch (an event-loop round trip each), and written without first
        # comparing each chunk with its fill value: a quarter less time per write on a 32-layer
        # store. A pipeline takes its batch size when the array opens, so zarr's (process-wide)
        # setting is changed only for that instant, when a writer starts; a zarr setting another
        # thread made in that instant would be undone.
        with zarr.config.set({"codec_pipeline.batch_size": _WRITE_BATCH}):
            self.arrays = {k: grp[k].with_config({"write_empty_chunks": True})
                           for k in [*rollup_arrays(group), "step"] if k in present}
        self.chunk = self.arrays["step"].chunks[0]  # windows written at a time (as stored)
        self.committed = int(grp.attrs.get("committed_steps", 0))
        self.pending: dict | None = None   # items of the partial window (values form)
        self.out: list[dict] = []          # finished windows not yet written
        self.n_out = 0

    def truncate(self, windows: int) -> None:
        windows = min(self.committed, windows)
        self.grp.attrs["committed_steps"] = windows  # marker first, as for rows
        for a in self.arrays.values():
            if a.shape[0] != windows:
                a.resize((windows, *a.shape[1:]))
        self.committed = windows

    def read(self, lo: int, hi: int) -> dict:
        """Stored windows [lo, hi) in values form."""
        return {k: np.asarray(a[lo:hi]) for k, a in self.arrays.items()}


class GroupRollup:
    """The levels of one group of an open store (see the module docstring)."""

    def __init__(self, root: zarr.Group, group: str, attrs: dict):
        self.group = group
        self.levels: list[_Level] = []
        prev = 1
        for f in ROLLUP_FACTORS:
            self.levels.append(_Level(root[rollup_path(group, f)], group, f, f // prev))
            prev = f
        self.names = [n for n in GROUPS[group] if n in self.levels[0].arrays]
        self._dtypes = {k: a.dtype for k, a in self.levels[0].arrays.items()}
        model = attrs.get("model") if isinstance(attrs.get("model"), dict) else {}
        self.top_k = model.get("top_k")
        self._pools = None
        if group == "routing" and "load" in self.names:
            self._pools = _pools(model, root[group])

    @classmethod
    def open(cls, root: zarr.Group, group: str, attrs: dict) -> "GroupRollup | None":
        """The group's levels, or None when the store has none (a store written before 1.2)."""
        if group not in ROLLUP_GROUPS:
            return None
        try:
            root[rollup_path(group, ROLLUP_FACTORS[-1])]
        except KeyError:
            return None
        return cls(root, group, attrs)

    # ---------------------------------------------------------------- folding
    def add(self, steps: np.ndarray, rows: dict[str, np.ndarray]) -> None:
        """Rows just committed (consecutive, after every row folded before)."""
        items = self._row_items(steps, rows)
        self._fold(0, items, from_rows=True)

    def _fold(self, li: int, items: dict, *, from_rows: bool = False) -> None:
        lvl = self.levels[li]
        parts = []
        if lvl.pending is not None:  # finish the partial window first (no copy of the batch)
            need = lvl.ratio - len(lvl.pending["step"])
            head = {k: np.concatenate([lvl.pending[k], v[:need]]) for k, v in items.items()}
            items = {k: v[need:] for k, v in items.items()}
            lvl.pending = None
            if len(head["step"]) < lvl.ratio:
                lvl.pending = head
                return
            parts.append(self._combine(head, 1, lvl.ratio, from_rows))
        n = len(items["step"])
        n_win = n // lvl.ratio
        cut = n_win * lvl.ratio
        if cut < n:
            lvl.pending = {k: v[cut:].copy() for k, v in items.items()}
        if n_win:
            parts.append(self._combine({k: v[:cut] for k, v in items.items()}, n_win, lvl.ratio,
                                       from_rows))
        if not parts:
            return
        win = parts[0] if len(parts) == 1 else \
            {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        lvl.out.append(win)
        lvl.n_out += len(win["step"])
        if li + 1 < len(self.levels):
            self._fold(li + 1, win)

    def take(self) -> list[dict[str, np.ndarray]]:
        """Every level's finished windows (values form), handed over instead of written: a
        caller that keeps levels in memory (online diagnosis) folds rows with :meth:`add` and
        takes the windows after each batch. Not for a store's writer (nothing is committed)."""
        out = []
        for lvl in self.levels:
            out.append({k: np.concatenate([w[k] for w in lvl.out]) for k in lvl.out[0]}
                       if lvl.out else {})
            lvl.out, lvl.n_out = [], 0
        return out

    def _row_items(self, steps, rows):
        items = {"step": np.asarray(steps, dtype=np.int64)}
        items["step_last"] = items["step"]
        for name in self.names:
            items[name] = np.asarray(rows[name])
        if self._pools is not None:
            items["group_dead_frac"] = self._dead_frac(np.asarray(rows["load"]))
        return items

    def _combine(self, items: dict, n_win: int, r: int, from_rows: bool) -> dict:
        """Windows of ``r`` consecutive items each (rows, or a finer level's windows)."""
        def grouped(v):
            return v.reshape(n_win, r, *v.shape[1:])

        out = {"step": items["step"][::r].copy(), "step_last": items["step_last"][r - 1::r].copy()}
        for name, v in items.items():
            if name in ("step", "step_last", "window_capacity_rate"):
                continue  # the window's rate is recomputed from the summed counts below
            if name in COUNTS:
                out[name] = grouped(v).sum(axis=1, dtype=np.float64 if v.dtype.kind == "f"
                                           else np.int64)
            elif from_rows:
                # In the rows' own dtype, into the stored array: min and max are exact in any
                # float dtype (only a window holding both 0.0 and -0.0 may keep the other
                # zero), counts are exact in float32 (< 2**24 rows), and only the sum is taken
                # in float64 (no float64 copy of the rows, no stack-then-cast).
                x = grouped(v)
                st = np.empty((n_win, len(ROLLUP_STATS), *x.shape[2:]), self._dtypes[name])
                ok = np.isfinite(x)
                c = ok.sum(axis=1)
                np.fmin.reduce(x, axis=1, out=st[:, 0])
                np.fmax.reduce(x, axis=1, out=st[:, 1])
                st[:, 2] = _mean(np.where(ok, x, 0).sum(axis=1, dtype=np.float64), c)
                st[:, 3] = c
                np.sum(x > 0, axis=1, out=st[:, 4])  # NaN > 0 is False
                out[name] = st
            else:  # (N, stat, ...): min of mins, max of maxes, count-weighted mean, counts add
                x = grouped(v)
                c = x[:, :, 3].sum(axis=1)
                s = np.where(x[:, :, 3] > 0, x[:, :, 2] * x[:, :, 3], 0.0).sum(axis=1)
                out[name] = np.stack([np.fmin.reduce(x[:, :, 0], axis=1),
                                      np.fmax.reduce(x[:, :, 1], axis=1), _mean(s, c), c,
                                      x[:, :, 4].sum(axis=1)], axis=1)
        if self.group == "routing" and self.top_k and "kept" in out and "tokens" in out:
            out["window_capacity_rate"] = mt.capacity_rate(out["kept"], out["tokens"],
                                                           int(self.top_k))
        # as stored: the coarser levels fold what a resume would read back, bit for bit
        return {k: v.astype(self._dtypes[k], copy=False) for k, v in out.items()}

    def _dead_frac(self, load_SLME: np.ndarray) -> np.ndarray:
        """(S, L, M) group_dead_frac rows: the detector's pooled dead fraction of the group each
        modality routes into (NaN for a modality of no group). Layers laid out alike (the usual
        case) are computed together, :data:`_DEAD_ROWS` rows at a time: the temporaries of a
        block stay in cache (a third faster on a 32-layer × 64-expert model than the whole
        batch at once)."""
        s, n_l, n_m, _ = load_SLME.shape
        out = np.full((s, n_l, n_m), np.nan)
        by_layout: dict[tuple, list[int]] = {}
        for li, pools in enumerate(self._pools):
            by_layout.setdefault(tuple((tuple(i), tuple(m)) for i, m in pools), []).append(li)
        for layout, lis in by_layout.items():
            at = slice(None) if len(lis) == n_l else lis  # (indexing copies: skip it for all)
            for a in range(0, s, _DEAD_ROWS):
                rows = slice(a, a + _DEAD_ROWS)
                for ids, mis in layout:
                    _, frac = mt.pooled_dead(load_SLME[rows, at], ids, mis)  # (S', L')
                    for m in mis:
                        out[rows, at, m] = frac
        return out

    # ---------------------------------------------------------------- writing
    def write(self, last: bool = False) -> None:
        """Write finished windows a whole chunk at a time; with ``last``, every finished window
        of the finest level. A level is never written past what its finer level has committed.
        (A flush writes no partial chunk: a resume folds what a level lacks back in from the
        stored finer windows and rows, and a flush before every checkpoint would rewrite each
        level's tail chunk every time.)"""
        for i, lvl in enumerate(self.levels):
            n = lvl.n_out
            if i:
                n = min(n, self.levels[i - 1].committed // lvl.ratio - lvl.committed)
            if not (last and i == 0):
                n -= (lvl.committed + n) % lvl.chunk
            if n > 0:
                self._write_level(lvl, n)

    def _write_level(self, lvl: _Level, n: int) -> None:
        win = {k: np.concatenate([w[k] for w in lvl.out]) for k in lvl.out[0]}
        rest = {k: v[n:] for k, v in win.items()}
        w0, w1 = lvl.committed, lvl.committed + n
        if lvl.arrays["step"].shape[0] < w1:
            # Grown _GROW chunks at a time (trimmed back on close): a resize rewrites each
            # array's metadata, as costly as writing the chunk itself.
            grow = _GROW * lvl.chunk
            cap = -(-w1 // grow) * grow
            _gather(a.async_array.resize((cap, *a.shape[1:])) for a in lvl.arrays.values())
        _gather(a.async_array.setitem(slice(w0, w1), win[name][:n])
                for name, a in lvl.arrays.items() if name != "step" and name in win)
        lvl.arrays["step"][w0:w1] = win["step"][:n]
        lvl.grp.attrs["committed_steps"] = w1  # the commit: strictly after the data
        lvl.committed = w1
        lvl.out = [rest] if len(rest["step"]) else []
        lvl.n_out -= n

    def trim(self) -> None:
        """Cut every level's arrays back to its committed windows (a clean close), so plain
        xarray reads exactly the windows, as for the rows."""
        for lvl in self.levels:
            shrink(lvl.arrays.values(), lvl.committed)

    # ---------------------------------------------------------------- resume / rebuild
    def catch_up(self, n_rows: int, read_rows) -> None:
        """Make every level consistent with ``n_rows`` committed rows and rebuild the in-memory
        state: levels are cut to what the rows (and the finer level) cover, then the windows
        missing from each level are folded from what is stored below it. ``read_rows(a, b)`` ->
        (steps, {name: rows}). Windows are written as chunks fill."""
        cap = n_rows
        for lvl in self.levels:
            lvl.truncate(cap // lvl.ratio)
            lvl.pending, lvl.out, lvl.n_out = None, [], 0
            cap = lvl.committed
        # Coarsest first: a level's stored finer windows come before any new finer window.
        for li in range(len(self.levels) - 1, 0, -1):
            lvl, fine = self.levels[li], self.levels[li - 1]
            for lo in range(lvl.committed * lvl.ratio, fine.committed, _BATCH):
                self._fold(li, fine.read(lo, min(lo + _BATCH, fine.committed)))
                self.write()
        for lo in range(self.levels[0].committed * self.levels[0].ratio, n_rows, _BATCH):
            steps, rows = read_rows(lo, min(lo + _BATCH, n_rows))
            self.add(steps, rows)
            self.write()


def rows_reader(arrays: dict[str, zarr.Array]):
    """``read_rows(a, b) -> (steps, {name: rows})`` over a group's zarr arrays."""
    def read_rows(a: int, b: int):
        return (np.asarray(arrays["step"][a:b]),
                {k: np.asarray(v[a:b]) for k, v in arrays.items() if k != "step"})
    return read_rows


def add_rollups(store_path, chunks: dict[int, int] | None = None) -> dict[str, int]:
    """Lay out the levels a store lacks (a 1.0/1.1 store, or one written with ``rollups=False``)
    and fold in every committed row they do not cover yet; ``moe-probe rollup`` runs it. Returns
    {group: rows covered by the finest level}. The store must not be open in a writer: the
    writer keeps its own rollup state. ``schema_version`` is left as written (levels are only
    additions, and readers find them by their paths). ``chunks``: as for :func:`create_levels`,
    for the levels laid out here."""
    from moe_probe.store.reader import RunStore  # validates version / foreign stores

    store = RunStore(store_path)
    root = zarr.open_group(str(store.store_path), mode="r+")
    for p in store.store_path.rglob("*.partial"):  # temp files of writes a SIGKILL interrupted
        p.unlink(missing_ok=True)
    out = {}
    for g in store.groups:
        if g not in ROLLUP_GROUPS:
            continue
        grp = root[g]
        present = [n for n in GROUPS[g] if n in grp]
        if not store.levels(g):
            labels = {d: [str(x) for x in grp[d][:]] for d in LABEL_DIMS[g]}
            create_levels(root, g, labels, present, chunks)
        ru = GroupRollup(root, g, dict(root.attrs))
        ru.catch_up(store.committed_steps(g),
                    rows_reader({k: grp[k] for k in [*present, "step"]}))
        ru.write(last=True)
        ru.trim()
        out[g] = ru.levels[0].committed * ru.levels[0].ratio
    return out


def _mean(s, c):
    out = np.full(np.shape(s), np.nan)
    np.divide(s, c, out=out, where=c > 0)
    return out


def _pools(model: dict, grp: zarr.Group) -> list[list[tuple[list[int], list[int]]]]:
    """Per layer, (expert ids, modality indices) of each group the modalities route into."""
    layers = [str(x) for x in grp["layer"][:]]
    mods = [str(x) for x in grp["modality"][:]]
    n_e = int(grp["expert"].shape[0])
    groups = mt.layer_groups(model.get("groups"))
    mg = model.get("modality_group")
    mg = {str(k): dict(v) for k, v in mg.items() if isinstance(v, dict)} \
        if isinstance(mg, dict) else None
    out = []
    for layer in layers:
        pools: dict[tuple, list[int]] = {}
        for mi, m in enumerate(mods):
            pools.setdefault(tuple(mt.expert_group(groups, mg, layer, m, n_e)), []).append(mi)
        out.append([(list(ids), mis) for ids, mis in pools.items()])
    return out

