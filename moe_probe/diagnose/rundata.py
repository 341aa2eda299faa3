"""What the detectors and reports read: a run's attrs and its groups as xarray Datasets.

Detectors take a :class:`RunData`, never a store, so tests can hand-build Datasets with the
documented dims (ARCHITECTURE.md, "Store") and the same code runs on real stores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from moe_probe.diagnose.source import GroupSource
from moe_probe.run import RunInfo
from moe_probe.store.schema import CORE_GROUPS

SCREENED = ("routing",)
"""Groups the detectors read through rollup levels."""
NEEDED: dict[str, tuple[str, ...]] = {
    "routing": ("tokens", "capacity_rate", "load"),
    "grad": ("cosine", "norm_und", "norm_gen"),
    "probe": ("selectivity", "isolated"),
    "token_routing": ("token_id", "kind", "label", "patch", "image", "topk_ids"),
}
"""Arrays the detectors (and the report's final capacity rate) read; other groups: steps only."""
READ_WHOLE = ("grad", "probe")
"""Groups whose ``NEEDED`` arrays the detectors read every row of (small: ~1/10 and ~1/50 of the
steps); ``routing`` and ``token_routing`` stay lazy (read a block, a row at a time)."""
LAZY = ("loss", "eval", "snapshot")
"""Groups no detector reads: opened on first :meth:`RunData.get` (the HTML report's figures),
so a diagnosis never reads their ``step`` arrays (500k rows of ``loss``: 0.1-0.2 s)."""
DIAGNOSED: tuple[str, ...] = (*CORE_GROUPS, "token_routing")
"""The groups the detectors read (the extra ``token_routing`` for ``expert_takeover``)."""


@dataclass
class RunData:
    name: str
    """Display name (run name from attrs, else the directory name)."""
    run_dir: str
    attrs: dict = field(default_factory=dict)
    groups: dict[str, xr.Dataset] = field(default_factory=dict)
    """Group name -> Dataset of committed rows; a group with no rows is left out."""
    levels: dict[str, dict[int, xr.Dataset]] = field(default_factory=dict)
    """Group name -> {factor: rollup level}; empty = full resolution (every row is read)."""
    extents: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Group name -> (committed rows, last step) of every group with rows, in store order, as
    the store says them (:func:`load_run`); empty: from ``groups``. See :meth:`extent`."""
    openers: dict[str, Callable[[], xr.Dataset]] = field(default_factory=dict, repr=False)
    """Groups not opened yet (:data:`LAZY`): opened into ``groups`` on first :meth:`get`."""

    def get(self, group: str) -> xr.Dataset | None:
        if group not in self.groups and group in self.openers:
            self.groups[group] = self.openers.pop(group)()
        ds = self.groups.get(group)
        if ds is None or "step" not in ds.dims or ds.sizes["step"] == 0:
            return None
        return ds

    def source(self, group: str) -> GroupSource | None:
        """The group's rows and levels as the detectors read them (one per group and run)."""
        ds = self.get(group)
        if ds is None:
            return None
        cache = self.__dict__.setdefault("_sources", {})
        if group not in cache:
            cache[group] = GroupSource(ds, self.levels.get(group))
        return cache[group]

    def extent(self) -> dict[str, tuple[int, int]]:
        """Group -> (committed rows, last step) of every group with rows (opens none)."""
        if self.extents:
            return dict(self.extents)
        return {g: (int(ds.sizes["step"]), int(ds["step"].values[-1]))
                for g in self.groups if (ds := self.get(g)) is not None}

    @functools.cached_property
    def info(self) -> RunInfo:
        """The run's metadata, parsed once from ``attrs`` (moe_probe.run.RunInfo.from_attrs)."""
        return RunInfo.from_attrs(self.attrs, path=self.run_dir)

    @property
    def arch(self) -> str | None:
        return self.info.arch

    @property
    def recipe(self) -> str | None:
        return self.info.recipe

    def expert_group(self, layer: str, modality: str, n_experts: int) -> list[int]:
        return self.info.expert_group(layer, modality, n_experts)


def layer_load(ds: xr.Dataset, li: int) -> xr.DataArray:
    """One layer's `load` in memory as (step, modality, expert).

    Select the layer on the stored dims *before* transposing: the reader's lazy arrays turn an
    index on a transposed view into a vectorized indexer, ~1000x slower on a long run."""
    return ds["load"].isel(layer=li).load().transpose("step", "modality", "expert")


def load_run(run_dir: str | Path, *, levels: bool = True) -> RunData:
    """Read every committed group of a run through the public reader (`moe_probe.open_run`).

    ``routing`` stays lazy (the detectors read it a block at a time) and, with ``levels``, comes
    with its rollup levels, so the detectors read rows only where the levels cannot settle a
    question; ``levels=False`` reads every row (the same findings: tests compare the two).
    Raises ValueError (the reader's StoreError) with one line for a missing or foreign store."""
    from moe_probe import open_run

    from moe_probe.store import StoreError

    try:
        store = open_run(run_dir)  # a path or a URL; one line if there is no run
        attrs = dict(store.attrs)
        groups, lv, extents, openers = {}, {}, {}, {}
        for g in store.groups:
            n = store.committed_steps(g) if g in DIAGNOSED else 0
            if n == 0:
                continue
            extents[g] = (n, store.last_step(g))
            if g in LAZY:
                openers[g] = functools.partial(store.dataset, g)
                continue
            ds = store.dataset(g)
            if g in SCREENED and levels:
                lv[g] = {f: store.dataset(g, level=f) for f in store.levels(g)}
            if g in READ_WHOLE:  # now (and bad chunks surface here as one line)
                ds = ds.assign({v: ds[v].load() for v in NEEDED[g] if v in ds})
            groups[g] = ds
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - a chunk that cannot be decoded is bad input too
        msg = str(e).strip().splitlines()
        raise ValueError(f"cannot read {run_dir}: {type(e).__name__}: "
                         f"{msg[0] if msg else ''}") from e
    name = RunInfo.from_attrs(attrs, path=run_dir).name
    return RunData(name=name, run_dir=str(run_dir), attrs=attrs, groups=groups, levels=lv,
                   extents=extents, openers=openers)
