"""Read ``RUN_DIR/traces.zarr``: committed rows only, as xarray / pandas. No torch.

A store may be written while it is read (a live run). Each call reads a group's
``committed_steps`` marker first and then slices the arrays to it, so rows still being written
(or garbage left by a crash) are never shown. Opening can race with the writer growing the arrays
of a group one after the other; such transient states are retried, persistent ones reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing

from moe_probe.store.location import as_path, zarr_store
from moe_probe.store.schema import (
    GROUPS, LABEL_DIMS, ROLLUP_FACTORS, SCHEMA_VERSION, NotMeasured, StoreError,
    migrate_attrs, parse_version, required, rollup_arrays, rollup_path,
)

__all__ = ["RunStore", "StoreError", "NotMeasured", "level_agrees", "tune_reads"]

_RETRIES = 40
_RETRY_SLEEP = 0.025


class RunStore:
    """A store opened for reading; ``moe_probe.open_run(RUN_DIR)`` finds a run's store and opens
    it. Also accepts a path to any moe_probe store directory, or its URL (read-only; see
    moe_probe.store.location)."""

    def __init__(self, path):
        p = as_path(path)
        if not p.exists():
            raise StoreError(f"no such store: {p}")
        self.store_path = p
        self._zarr = zarr_store(p)
        self.path = p.parent
        """The run directory (the store's parent)."""
        meta = p / "zarr.json"
        if not meta.exists():
            if (p / ".zgroup").exists() or (p / ".zarray").exists():
                raise StoreError(f"not a moe_probe store: {p} is a zarr v2 store "
                                 "(moe_probe writes zarr v3)")
            raise StoreError(f"not a moe_probe store: {p} has no zarr.json")
        try:
            doc = json.loads(_read_retry(meta))
        except ValueError as e:
            raise StoreError(f"corrupt store: {meta} is not valid JSON ({e})") from None
        if doc.get("node_type") != "group":
            raise StoreError(f"not a moe_probe store: {p} is a zarr {doc.get('node_type')}, "
                             "not a group")
        attrs = doc.get("attributes", {}) or {}
        if "schema_version" not in attrs:
            raise StoreError(f"not a moe_probe store: {p} has no schema_version attribute")
        major, minor = parse_version(attrs["schema_version"])
        if major > parse_version(SCHEMA_VERSION)[0]:
            raise StoreError(f"store schema version {major}.{minor} is newer than this moe_probe "
                             f"reads ({SCHEMA_VERSION}); upgrade moe_probe: {p}")
        self.attrs: dict = migrate_attrs(attrs)
        """Root attrs, migrated to the current shape (``schema_version`` says what was written)."""
        # Groups this version does not declare are ignored (a newer minor may add some).
        self.groups: list[str] = [g for g in GROUPS if (p / g / "zarr.json").exists()]

    def __repr__(self):
        return f"RunStore({str(self.path)!r}, groups={self.groups})"

    # ------------------------------------------------------------------ reading
    def labels(self, group: str, dim: str) -> list[str]:
        """The labels of ``group``'s ``dim`` (its coordinate array)."""
        self._check_group(group)
        arr = zarr.open_array(self._zarr, path=f"{group}/{dim}", mode="r")
        return [str(x) for x in arr[:]]

    def committed_steps(self, group: str) -> int:
        """Rows of ``group`` that are complete (re-read from disk on each call)."""
        self._check_group(group)
        return self._marker(group)

    def steps_at(self, group: str, rows) -> np.ndarray:
        """Step labels of committed rows ``rows`` (indices), reading only the chunks holding them
        (the Dataset's step coordinate reads every chunk: ~0.2 s at 500k rows)."""
        self._check_group(group)
        arr = zarr.open_array(self._zarr, path=f"{group}/step", mode="r")
        return np.asarray(arr.get_orthogonal_selection(np.asarray(rows, dtype=np.int64)))

    def dataset(self, group: str, level: int | str | None = None) -> xr.Dataset:
        """``group`` as an xarray Dataset of its committed rows (lazy; reopened on each call).

        ``level``: a rollup level instead of the rows (``16`` or ``"x16"``; :meth:`levels` lists
        those present): one row per window of that many rows, ``step`` = the window's first step,
        counts summed, rates as ``(stat, ...)`` with stat = min, max, mean, count
        (:func:`moe_probe.store.schema.rollup_arrays`); committed windows only, never past the
        committed rows. A level the store lacks raises :class:`NotMeasured`.

        Built from the zarr arrays directly rather than ``xr.open_zarr``: a writer killed while
        growing a group's arrays leaves them with different lengths (all >= the marker), which
        ``open_zarr`` rejects but which is harmless once every array is cut at the marker."""
        self._check_group(group)
        if level is not None:
            factor = _factor(level)
            if factor not in self.levels(group):
                raise NotMeasured(f"{group}: no rollup level x{factor} in {self.path} "
                                  f"(present: {self.levels(group)}; `moe-probe rollup` adds them)")
            rows = self.committed_steps(group)
            path = rollup_path(group, factor)
            n = min(self._marker(path), rows // factor)
            specs = rollup_arrays(group)
            dims = (*LABEL_DIMS[group], "stat")
        else:
            path, n, specs, dims = group, self.committed_steps(group), GROUPS[group], LABEL_DIMS[group]
        last = None
        for _ in range(_RETRIES):
            try:
                return self._build(path, specs, dims, n, required(group) if level is None else [])
            except StoreError:
                raise
            except (ValueError, KeyError, OSError) as e:  # a metadata file being replaced
                last = e
                time.sleep(_RETRY_SLEEP)
        raise StoreError(f"corrupt store: group {path!r} of {self.store_path} cannot be opened "
                         f"({type(last).__name__}: {_one_line(last)})")

    def levels(self, group: str) -> list[int]:
        """The rollup factors present for ``group`` (rows per window), finest first; [] for a
        store without rollups (written before schema 1.2, or with ``rollups=False``)."""
        self._check_group(group)
        return [f for f in ROLLUP_FACTORS
                if (self.store_path / rollup_path(group, f) / "zarr.json").exists()]

    def _marker(self, path: str) -> int:
        """The ``committed_steps`` of the zarr group at ``path`` (rows, or a level's windows)."""
        meta = self.store_path / path / "zarr.json"
        try:
            doc = json.loads(_read_retry(meta))
        except ValueError as e:
            raise StoreError(f"corrupt store: {meta} is not valid JSON ({e})") from None
        return int((doc.get("attributes") or {}).get("committed_steps", 0))

    def _build(self, path: str, specs: dict, label_dims, n: int, need: list) -> xr.Dataset:
        grp = zarr.open_group(self._zarr, path=path, mode="r", use_consolidated=False)
        where = f"{self.store_path}/{path}"
        coords = {}
        for d in label_dims:
            if d not in grp:
                raise StoreError(f"corrupt store: {where} has no {d!r} coordinate array")
            coords[d] = xr.Variable((d,), np.array([str(x) for x in grp[d][:]], dtype=object))
        if "step" not in grp:
            raise StoreError(f"corrupt store: {where} has no 'step' coordinate array")
        # Arrays this version does not declare are ignored; a missing optional one is "not
        # measured" (see measured()); a missing required one means the store is damaged. A stat
        # per array, not zarr's member listing, which parses every member's metadata once more.
        base = self.store_path / path
        arrays = {name: grp[name] for name in [*specs, "step"]
                  if (base / name / "zarr.json").exists()}
        missing = sorted(set(need) - set(arrays))
        if missing:
            raise StoreError(f"corrupt store: {where} lacks arrays {missing}")
        short = [k for k, a in arrays.items() if a.shape[0] < n]
        if short:
            raise ValueError(f"arrays shorter than committed_steps={n}: {short}")
        coords["step"] = xr.Variable(("step",), _read(arrays.pop("step"), n, where, "step"))
        data = {}
        for name, a in arrays.items():
            dims = ("step", *specs[name].dims)
            lazy = indexing.LazilyIndexedArray(_Rows(a, n, f"{where}/{name}"))
            data[name] = xr.Variable(dims, lazy)
        return xr.Dataset(data, coords=coords, attrs=dict(grp.attrs))

    def measured(self, group: str, var: str) -> bool:
        """Whether this run recorded ``group/var`` (a declared optional array may be absent)."""
        if group not in GROUPS or var not in GROUPS[group]:
            raise StoreError(f"{group}/{var} is not in the store schema")
        return group in self.groups and (self.store_path / group / var / "zarr.json").exists()

    def read(self, group: str, var: str, **sel) -> xr.DataArray:
        """One variable of committed rows, label-selected with ``sel`` and loaded into memory.
        A chunk that cannot be decoded raises :class:`StoreError` naming the array; a declared
        array this run did not record raises :class:`NotMeasured`."""
        if group in GROUPS and var in GROUPS[group] and not self.measured(group, var):
            raise NotMeasured(f"{group}/{var}: not measured in {self.path}")
        ds = self.dataset(group)
        if var not in ds.data_vars:
            raise StoreError(f"group {group!r} has no variable {var!r} "
                             f"(has: {sorted(map(str, ds.data_vars))})")
        da = ds[var]
        if sel:
            try:
                da = da.sel(**sel)
            except KeyError as e:
                raise StoreError(f"{group}/{var}: no such label {e}") from None
        return da.load()  # a chunk that cannot be decoded raises StoreError (see _Rows)

    def frame(self, group: str, var: str, **sel) -> pd.DataFrame:
        """Tidy table of one variable: a column per remaining dim plus ``value``."""
        da = self.read(group, var, **sel)
        if da.ndim == 0:
            return pd.DataFrame({**{k: [v.item()] for k, v in da.coords.items()},
                                 "value": [da.item()]})
        df = da.to_dataframe(name="value").reset_index()
        return df[[*da.dims, "value"]]

    def last_step(self, group: str) -> int | None:
        n = self.committed_steps(group)
        if n == 0:
            return None
        arr = zarr.open_array(self._zarr, path=f"{group}/step", mode="r")
        return int(arr[n - 1])

    def _check_group(self, group):
        if group not in self.groups:
            raise StoreError(f"group {group!r} is not in {self.store_path} "
                             f"(present: {self.groups})")


class _Rows(BackendArray):
    """The first ``n`` rows of a zarr array, read lazily (xarray's documented backend pattern);
    a chunk that cannot be decoded becomes a one-line StoreError naming the array."""

    def __init__(self, arr: zarr.Array, n: int, where: str):
        self.arr, self.where = arr, where
        self.shape = (n, *arr.shape[1:])
        self.dtype = arr.dtype

    def __getitem__(self, key):
        # OUTER: a list of rows (scattered stretches) is one read that decodes each chunk once
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER,
                                                  self._raw)

    def _raw(self, key):
        # bound open slices by OUR shape (n rows), not the zarr array's: never read past the marker
        key = tuple(k if not isinstance(k, slice) else slice(*k.indices(size))
                    for k, size in zip(key, self.shape))
        if any(isinstance(k, np.ndarray) for k in key):
            return _read_key(self.arr.oindex, key, self.where)
        return _read_key(self.arr, key, self.where)


def level_agrees(level: xr.Dataset, factor: int, n_rows: int, steps_at,
                 windows=None) -> bool:
    """Whether a level's windows name the rows' steps: a window's first and last steps are the
    rows' at its first and last row. ``steps_at(rows)``: the committed rows' step labels at
    those row indices; ``windows``: the windows compared (every one by default; e.g. ``(0, -1)``,
    the ends, where a reader cannot afford every row's step). A store whose rows a pre-1.2
    writer truncated and wrote again after its levels were built fails this; its readers
    (diagnose, the dashboard) read the rows instead."""
    w = int(level.sizes["step"])
    if "step_last" not in level or w * factor > n_rows:
        return False
    win = np.arange(w) if windows is None else np.unique(np.asarray(windows) % w)
    got = np.asarray(steps_at(np.concatenate([win * factor, win * factor + factor - 1])))
    return bool(np.array_equal(level["step"].values[win], got[:win.size]) and
                np.array_equal(level["step_last"].values[win], got[win.size:]))


def tune_reads() -> None:
    """zarr settings for a process that reads stores (the dashboard, ``diagnose``, ``export``).
    zarr decodes the chunks of one read in batches of ``codec_pipeline.batch_size`` (default 1:
    each chunk goes through the async pipeline alone), and a reader asks for tens to hundreds of
    chunks at once. In batches of 64: a (step, layer, modality) block of the 50k-step store in
    40 instead of 56 ms (53 instead of 73 ms of CPU); ``diagnose`` of the 500k-step store in
    4.1 instead of 4.8-5.3 s (peak RSS 670 instead of 615 MB). Process-wide: not called by
    the library's own functions, which may run inside a user's process.

    Also numpy's transparent-huge-page advice is turned off (what ``NUMPY_MADVISE_HUGEPAGE=0``
    does at import): numpy asks the kernel for 2 MiB pages for every large array, and a reader
    fills a few hundred MB of fresh arrays once, where a huge page's first-touch fault can cost
    far more than the TLB misses it saves: on this project's virtual machines (THP "madvise")
    ``diagnose`` of the 500k-step store took 6.6-8.3 s with it, 4.2 s without (alternated)."""
    zarr.config.set({"codec_pipeline.batch_size": 64})
    np._core.multiarray._set_madvise_hugepage(False)  # numpy's own switch (no public API)


def _factor(level) -> int:
    """A level as its factor: 16, or "x16"; anything else is a one-line StoreError."""
    f = level[1:] if isinstance(level, str) and level.startswith("x") else level
    try:
        f = int(f)
    except (TypeError, ValueError):
        f = None
    if f not in ROLLUP_FACTORS:
        raise StoreError(f"no rollup level {level!r}; levels are "
                         f"{', '.join(f'x{x}' for x in ROLLUP_FACTORS)}")
    return f


def _read(arr, n, where, name):
    return _read_key(arr, slice(0, n), f"{where}/{name}")


def _read_key(arr, key, where):
    try:
        return np.asarray(arr[key])
    except Exception as e:  # noqa: BLE001 - codec errors share no base class
        raise StoreError(f"corrupt store: a chunk of {where} cannot be read "
                         f"({type(e).__name__}: {_one_line(e)})") from None


def _read_retry(path: Path) -> str:
    # Files are replaced atomically by rename, but on some filesystems a reader can still catch
    # the instant between unlink and link; a short retry hides that without masking real loss.
    for i in range(_RETRIES):
        try:
            return path.read_text()
        except FileNotFoundError:
            if i == _RETRIES - 1:
                raise StoreError(f"corrupt store: {path} is missing") from None
            time.sleep(_RETRY_SLEEP)
    raise AssertionError("unreachable")


def _one_line(e) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""

