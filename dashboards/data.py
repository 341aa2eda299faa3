"""Data access for the dashboard: which runs exist under ROOT, and small slices of their stores.

Every function takes the server-side ROOT explicitly (never a root sent by the browser) and a run id
relative to it; `resolve_run` is the single gate that keeps requests inside ROOT. Reads go through
the public reader (`moe_probe.open_run`), which already hides rows past each group's commit marker,
and slice the lazily opened xarray variables *before* `.values`, so a view of one layer/modality
touches only the zarr chunks that hold it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
# Imported here, before the threaded server starts: a first import racing in two request threads
# leaves a partially initialised module (seen with pandas inside plotly's JSON encoder).
import pandas  # noqa: F401
import xarray  # noqa: F401

from dashboards.bucketing import TARGET_BUCKETS, Buckets, Pieces, bucket, bucket_rows
from dashboards.cache import Cache
from moe_probe.modalities import MODALITIES
from moe_probe.run import RunInfo, find_runs, open_run, store_path
from moe_probe.store import NotMeasured
from moe_probe.store.reader import level_agrees
from moe_probe.store.schema import COUNTS, ROLLUP_GROUPS, rollup_path
from moe_probe.store.location import RemotePath, as_path, is_url


class DataError(ValueError):
    """Something the page should show as a message (missing run, escaped path, unreadable store)."""


# --------------------------------------------------------------------------------------- paths
def check_root(root) -> Path | RemotePath:
    """The resolved ROOT (a directory, or a URL such as s3://bucket/runs), or ValueError with one
    line (used by the CLI before the server starts)."""
    if is_url(root):
        p = as_path(root)  # one line (StoreError) if its endpoint cannot be reached
        if not p.is_dir():
            raise ValueError(f"dashboard root {root} does not exist")
        return p
    p = Path(root).expanduser()
    if not p.exists():
        raise ValueError(f"dashboard root {root} does not exist")
    if not p.is_dir():
        raise ValueError(f"dashboard root {root} is not a directory")
    return p.resolve()


def resolve_run(root, run_id: str) -> Path | RemotePath:
    """Run directory for `run_id`, guaranteed to lie inside ROOT.

    Ids come from URLs and callback payloads, i.e. from the client: absolute paths, `..` parts and
    symlinks leading out of ROOT are refused, so the server can never be made to read elsewhere.
    (A URL ROOT has no symlinks: its run ids are key prefixes below it.)
    """
    if not isinstance(run_id, str) or not run_id or "\x00" in run_id:
        raise DataError("no run selected")
    rel = PurePosixPath(run_id.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or (rel.parts and ":" in rel.parts[0]):
        raise DataError(f"run id {run_id!r} is outside the dashboard root")
    if is_url(root):
        target = as_path(root)
        for part in rel.parts:
            target = target / part
        if not (store_path(target) / "zarr.json").exists():  # one request, not a listing
            raise DataError(f"run {run_id!r} not found under the dashboard root")
        return target
    root_r = Path(root).resolve()
    target = (root_r / Path(*rel.parts)).resolve()
    if target != root_r and not target.is_relative_to(root_r):
        raise DataError(f"run id {run_id!r} is outside the dashboard root")
    store = store_path(target)
    if not store.exists():
        raise DataError(f"run {run_id!r} not found under the dashboard root")
    # The store itself may be a symlink pointing out of ROOT.
    if not store.resolve().is_relative_to(root_r):
        raise DataError(f"run {run_id!r} is outside the dashboard root")
    return target


def list_runs(root) -> list[str]:
    """Run ids (posix paths relative to ROOT) of every run under ROOT, sorted.

    Uses the reader's `find_runs` and then re-checks each hit with `resolve_run`, so a symlinked
    run pointing outside ROOT is never listed. A run directory that vanishes meanwhile is skipped.
    """
    root_r = check_root(root)
    if isinstance(root_r, RemotePath):  # keys below ROOT: nothing can lead out of it
        return sorted(p.path[len(root_r.path):].strip("/") or "." for p in find_runs(root_r))
    ids = []
    for p in find_runs(root_r):
        try:
            rel = p.absolute().relative_to(root_r) if p.is_absolute() else p
        except ValueError:
            try:
                rel = p.resolve().relative_to(root_r)
            except ValueError:
                continue
        rid = rel.as_posix() if str(rel) != "." else "."
        try:
            resolve_run(root_r, rid)
        except DataError:
            continue
        ids.append(rid)
    return sorted(set(ids))


# --------------------------------------------------------------------------------------- stores
REMOTE_REOPEN_S = 30.0
"""An opened remote store (root attrs and groups: ~20 requests to open) is reused this long, so a
run replaced under the same name shows after at most this; commit markers are re-read on every
call, as for local runs."""
_remote_stores = Cache("remote stores", entries=64)


def open_store(root, run_id: str):
    """RunStore of a run inside ROOT; reader errors become DataError (shown on the page)."""
    path = resolve_run(root, run_id)
    try:
        if isinstance(path, RemotePath):
            return _remote_stores.get(str(path), int(time.monotonic() // REMOTE_REOPEN_S),
                                      lambda: open_run(path))
        return open_run(path)
    except (ValueError, OSError, KeyError) as e:
        raise DataError(f"{run_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _committed(store, group: str) -> int:
    try:
        return int(store.committed_steps(group))
    except (KeyError, ValueError, OSError):
        return 0


def committed(root, run_id: str) -> dict:
    """Committed rows per group: cheap (attrs only), polled on every refresh tick."""
    store = open_store(root, run_id)
    return {g: _committed(store, g) for g in store.groups}


def run_meta(root, run_id: str) -> dict:
    """Small JSON-able summary: arch, layers, experts, modalities and committed rows per group
    (moe_probe.run.RunInfo, from the store's attrs)."""
    store = open_store(root, run_id)
    info = RunInfo.from_attrs(store.attrs, path=store.path)
    committed = {g: _committed(store, g) for g in store.groups}
    try:  # one element: opening the rows' Dataset reads every step (0.2 s at 500k rows)
        last = store.last_step("routing") if committed.get("routing") else None
    except (ValueError, OSError) as e:
        raise DataError(f"{run_id}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from e
    return {"id": run_id, "name": info.name, "recipe": info.recipe, "arch": info.arch or "?",
            "top_k": info.top_k, "experts": info.experts,
            "modalities": info.modalities or list(MODALITIES), "committed": committed,
            "layers": info.layers, "last_step": last}


def _dataset(store, group: str):
    """Committed rows of a group as a lazy Dataset, or None while the group has none yet.

    Opening a zarr group through xarray parses every array's metadata (tens of ms); the opened
    Dataset is reused while the group's commit marker is unchanged, since rows below the marker
    never change (the writer only rewrites the tail chunk with the same committed values)."""
    if group not in store.groups:
        return None
    n = _committed(store, group)
    if n == 0:
        return None
    run = store.attrs.get("run")
    created = run.get("created") if isinstance(run, dict) else None
    return _datasets.get((str(store.store_path), group), (n, created),
                         lambda: _open_dataset(store, group))


def _open_dataset(store, group: str):
    try:
        ds = store.dataset(group)
    except (KeyError, FileNotFoundError):
        return None
    except (ValueError, OSError) as e:
        raise DataError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e
    return None if ds.sizes.get("step", 0) == 0 else ds


def group_dataset(root, run_id: str, group: str):
    """Lazy committed-rows Dataset of one group (None if empty); raises DataError otherwise."""
    return _dataset(open_store(root, run_id), group)


# ------------------------------------------------------------------------------- slicing
# Keys name what is read, versions are the group's committed rows: refresh ticks re-fire
# callbacks with unchanged inputs all the time, and only a commit makes a new read necessary.
_datasets = Cache("datasets", entries=32)
_slices = Cache("slices", entries=128, max_bytes=256 << 20)
_blocks = Cache("blocks", entries=32, max_bytes=384 << 20)

# Arrays with these dims are chunked one layer at a time (store schema; a finest rollup level's
# load: 4 layers), so slicing them lazily reads 1/L (4/L) of the bytes. Every other array's chunk spans all its labels: one label costs the
# same chunks as all of them, so their step window is read once and sliced in memory.
_PER_LAYER_DIMS = {"expert", "expert2"}


@dataclass(frozen=True)
class Slice:
    """Steps and values of one variable after slicing; `values` has `step` as its first axis."""
    steps: np.ndarray
    values: np.ndarray
    dims: tuple
    coords: dict


def read_slice(root, run_id: str, group: str, var: str, *, step_range=None, **sel) -> Slice | None:
    """One variable of one group, cut to labels `sel` (e.g. layer="3", modality="vae") and an
    inclusive `step_range` before data is read. None while the group holds no rows;
    :class:`NotMeasured` for a declared optional array the run did not record.

    The step window and (for per-layer-chunked arrays) the label positions index the lazy backend
    array directly, so only the chunks covering the cut are fetched and decoded.
    """
    store = open_store(root, run_id)
    committed = _committed(store, group)
    rng = tuple(step_range) if step_range else None
    key = (str(store.store_path), group, var, tuple(sorted(sel.items())), rng)
    return _slices.get(key, committed,
                       lambda: _read(store, run_id, group, var, rng, sel, committed),
                       size=lambda s: 0 if s is None else s.values.nbytes)


def _read(store, run_id, group, var, step_range, sel, committed) -> Slice | None:
    got = _locate(store, run_id, group, var, step_range, sel)
    if got is None:
        return None
    ds, da, idx, steps, a, b = got
    values = _take(store, group, da, idx, a, b, committed)
    dims = tuple(d for d in da.dims if d not in idx)
    return Slice(steps=steps[a:b], values=values, dims=dims, coords=_coords(ds, dims))


def _locate(store, run_id, group, var, step_range, sel):
    """(rows Dataset, variable, label positions of `sel`, steps, first row, end row) of a read,
    or None while there is nothing to read."""
    ds = _dataset(store, group)
    if ds is None:
        return None
    da = _variable(store, ds, group, var)
    if da is None:
        return None
    idx = _label_index(ds, da, sel, run_id, group)
    steps = np.asarray(ds["step"].values, dtype=np.int64)
    a, b = _row_range(steps, step_range)
    return ds, da, idx, steps, a, b


def _variable(store, ds, group, var):
    """`var` of the group's Dataset; None if the run has the array but the Dataset does not (yet);
    NotMeasured for a declared optional array the run did not record."""
    if var not in ds:
        if store.measured(group, var):
            return None
        raise NotMeasured(f"{group}/{var}: not measured in this run")
    return ds[var]


def _label_index(ds, da, sel, run_id, group) -> dict:
    """Positions of the labels `sel` along the dims of `da` they name."""
    idx = {}
    for dim, label in sel.items():
        if label is None or dim not in da.dims:
            continue
        labels = [str(v) for v in ds[dim].values]
        if str(label) not in labels:
            raise DataError(f"{run_id}: {dim} {label!r} not in {group}")
        idx[dim] = labels.index(str(label))
    return idx


def _row_range(steps, step_range) -> tuple[int, int]:
    """Row indices [a, b) of the steps inside the inclusive `step_range` (all rows: None)."""
    if step_range is None:
        return 0, len(steps)
    lo, hi = step_range
    return int(np.searchsorted(steps, lo, side="left")), int(np.searchsorted(steps, hi, side="right"))


def _coords(ds, dims) -> dict:
    return {d: [str(v) for v in ds[d].values] for d in dims if d != "step" and d in ds.coords}


def _take(store, path: str, da, idx: dict, a: int, b: int, committed) -> np.ndarray:
    """Rows [a, b) of `da` (rows of a group, or windows of a level at `path`) at the label
    positions `idx`. The step window and (for per-layer-chunked arrays) the label positions index
    the lazy backend array directly, so only the chunks covering the cut are fetched."""
    if set(da.dims) & _PER_LAYER_DIMS:
        return np.asarray(da.isel({**idx, "step": slice(a, b)}).values)
    block = _blocks.get((str(store.store_path), path, da.name, (a, b)), committed,
                        lambda: np.asarray(da.isel(step=slice(a, b)).values),
                        size=lambda v: v.nbytes)
    return block[tuple(idx.get(d, slice(None)) for d in da.dims)]


# ------------------------------------------------------------------------------- buckets
def read_buckets(root, run_id: str, group: str, var: str, *, step_range=None,
                 target: int = TARGET_BUCKETS, levels: bool = True, **sel) -> Buckets | None:
    """One variable over an inclusive `step_range` (None: all steps), cut to labels `sel`,
    reduced to at most ~`target` buckets of whole rollup windows (:class:`Buckets`): the one
    data path of every time-series view. None while the group holds no rows; NotMeasured as
    :func:`read_slice`.

    Buckets hold `bucket_rows` rows each (a multiple of the coarsest rollup factor f that fits,
    aligned on row indices). They are built from the coarsest level with factor <= f the store
    has (schema 1.2: `rollup/<group>/x<f>`), reading only its windows that cover the range, and
    from finer levels and then rows for the edges and for the tail no committed window covers
    yet (a level may lag its rows). So a view reads ~`target`·16 values per series at any zoom,
    not one per row, and gets the same buckets as from the rows alone (`levels=False`, also what
    a store without levels gets): min and max exact, means equal to float32 rounding of the
    window means; only the step of an extreme is the first step of its window when it comes
    from a level. When whole windows cover all steps (no `step_range`), the rows' Dataset is
    not even opened.
    """
    store = open_store(root, run_id)
    committed = _committed(store, group)
    rng = tuple(step_range) if step_range else None
    key = ("buckets", str(store.store_path), group, var, tuple(sorted(sel.items())), rng, target,
           levels)
    return _slices.get(key, committed,
                       lambda: _read_buckets(store, run_id, group, var, rng, sel, committed,
                                             target, levels),
                       size=lambda b: 0 if b is None else b.nbytes)


def _read_buckets(store, run_id, group, var, step_range, sel, committed, target, levels):
    # All steps of a finished store are often whole windows: then the rows' Dataset (whose step
    # coordinate alone costs 0.2 s to read at 500k rows) is not opened at all.
    rows = None if step_range is None else _locate(store, run_id, group, var, step_range, sel)
    if step_range is None:
        a, b = 0, committed
    elif rows is None:
        return None
    else:
        a, b = rows[4:]
    size = bucket_rows(b - a, target)
    lvl = {f: l for f, l in (_levels(store, group) if levels else {}).items()
           if f <= size and var in l}
    segments = _cover(a, b, sorted(((f, l.sizes["step"]) for f, l in lvl.items()), reverse=True))
    if rows is None and (not segments or any(f == 1 for f, _, _ in segments)):
        rows = _locate(store, run_id, group, var, None, sel)
        if rows is None:
            return None
        segments = segments or [(1, a, b)]
    if rows is not None:
        ds, da, idx, steps = rows[:4]
    else:  # labels and dims as the level has them (the same as the rows')
        ds = lvl[segments[0][0]]
        da = ds[var]
        idx = _label_index(ds, da, sel, run_id, group)
    counts = var in COUNTS
    parts, read = [], {}
    for f, lo, hi in segments:
        read[f] = read.get(f, 0) + hi - lo
        if f == 1:
            parts.append(Pieces.of_rows(lo, steps[lo:hi], _take(store, group, da, idx, lo, hi,
                                                                committed), size, counts=counts))
            continue
        level = lvl[f]
        v = _take(store, rollup_path(group, f), level[var], idx, lo, hi, committed)
        wsteps = level["step"].values[lo:hi]
        if counts:
            parts.append(Pieces.of_windows(lo, f, wsteps, sum=v))
        else:
            stat = [str(x) for x in level["stat"].values]
            order = [stat.index(k) for k in ("min", "max", "mean", "count")]
            parts.append(Pieces.of_windows(lo, f, wsteps, stats=v[:, order]))
    dims = tuple(d for d in da.dims if d not in idx and d not in ("step", "stat"))
    return bucket(Pieces.concat(parts), size, factor=max(read), dims=dims,
                  coords=_coords(ds, dims), read={("rows" if f == 1 else f"x{f}"): n
                                                  for f, n in read.items()})


def _cover(a: int, b: int, levels: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Rows [a, b) as segments (f, lo, hi) in row order: windows [lo, hi) of the coarsest of
    `levels` ((factor, committed windows), coarsest first) that fit whole, then finer levels and
    finally rows (f = 1) for what is left at either side."""
    if a >= b:
        return []
    if not levels:
        return [(1, a, b)]
    (f, n), finer = levels[0], levels[1:]
    w0, w1 = -(-a // f), min(b // f, n)
    if w0 >= w1:
        return _cover(a, b, finer)
    return [*_cover(a, w0 * f, finer), (f, w0, w1), *_cover(w1 * f, b, finer)]


def _levels(store, group: str) -> dict:
    """{factor: lazy Dataset of its committed windows} of a group's rollup levels ({} for a
    store without them), reused while the group's commit marker is unchanged: a level that
    commits more windows meanwhile is only read less far (rows cover the rest)."""
    if group not in ROLLUP_GROUPS:
        return {}
    run = store.attrs.get("run")
    created = run.get("created") if isinstance(run, dict) else None
    return _datasets.get((str(store.store_path), group, "levels"),
                         (_committed(store, group), created), lambda: _open_levels(store, group))


def _open_levels(store, group: str) -> dict:
    out = {}
    n = _committed(store, group)
    for f in store.levels(group):
        try:
            ds = store.dataset(group, level=f)
            # The end windows against the rows' steps (stale windows: the rows are drawn
            # instead). Every window would need every row's step, ~0.3 s on a 500k-row first
            # paint that otherwise never opens the rows; a rewrite after the levels were built
            # shows at the end.
            if ds.sizes.get("step", 0) and level_agrees(
                    ds, f, n, lambda rows: store.steps_at(group, rows), windows=(0, -1)):
                out[f] = ds
        except (ValueError, KeyError, OSError):
            continue  # a level that cannot be read: the rows hold the same data
    return out


def step_bounds(root, run_id: str, group: str) -> tuple[int, int] | None:
    ds = group_dataset(root, run_id, group)
    if ds is None:
        return None
    s = ds["step"].values
    return int(s[0]), int(s[-1])


def nearest_step(root, run_id: str, group: str, step) -> int | None:
    """The committed step of `group` closest to `step` (snapshots are sparse, sliders are not)."""
    ds = group_dataset(root, run_id, group)
    if ds is None:
        return None
    s = np.asarray(ds["step"].values)
    if step is None:
        return int(s[-1])
    i = int(np.clip(np.searchsorted(s, step), 0, len(s) - 1))
    if i > 0 and abs(s[i - 1] - step) <= abs(s[i] - step):
        i -= 1
    return int(s[i])
