"""What the detectors and reports read: a run's attrs and its groups as xarray Datasets.

Detectors take a :class:`RunData`, never a store, so tests can hand-build Datasets with the
documented dims (ARCHITECTURE.md, "Store") and the same code runs on real stores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from moe_probe.store.schema import CORE_GROUPS


@dataclass
class RunData:
    name: str
    """Display name (run name from attrs, else the directory name)."""
    run_dir: str
    attrs: dict = field(default_factory=dict)
    groups: dict[str, xr.Dataset] = field(default_factory=dict)
    """Group name -> Dataset of committed rows; a group with no rows is left out."""

    def get(self, group: str) -> xr.Dataset | None:
        ds = self.groups.get(group)
        if ds is None or "step" not in ds.dims or ds.sizes["step"] == 0:
            return None
        return ds

    @property
    def model(self) -> dict:
        return _as_dict(self.attrs.get("model"))

    @property
    def run_info(self) -> dict:
        return _as_dict(self.attrs.get("run"))

    @property
    def arch(self) -> str | None:
        return self.model.get("arch")

    @property
    def recipe(self) -> str | None:
        return self.run_info.get("recipe")

    def expert_group(self, layer: str, modality: str, n_experts: int) -> list[int]:
        """Expert ids the modality's tokens can route into at `layer`.

        From the model attrs (`groups` + `modality_group`, per layer) when present; by default a
        modality routes into its task's group (TASK_OF_MODALITY), and an ungrouped layer — or a
        store without that metadata — into all experts."""
        groups = _layer_groups(self.model, layer)
        if groups:
            from moe_probe.modalities import TASK_OF_MODALITY

            mg = _layer_groups(self.model, layer, key=("modality_group",), values=str)
            for key in (mg.get(modality), TASK_OF_MODALITY.get(modality), "all"):
                if key in groups:
                    return [int(e) for e in groups[key]]
        return list(range(n_experts))


def layer_load(ds: xr.Dataset, li: int) -> xr.DataArray:
    """One layer's `load` in memory as (step, modality, expert).

    Select the layer on the stored dims *before* transposing: the reader's lazy arrays turn an
    index on a transposed view into a vectorized indexer, ~1000x slower on a long run."""
    return ds["load"].isel(layer=li).load().transpose("step", "modality", "expert")


def _as_dict(v) -> dict:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return {}
    return dict(v) if isinstance(v, dict) else {}


def _layer_groups(model: dict, layer: str, key=("groups",),
                  values=(list, tuple)) -> dict:
    """A per-layer mapping in whichever shape the writer used: {layer: {...}}, a list indexed by
    layer, or one {...} for every layer."""
    g = next((model[k] for k in key if k in model), None)
    if isinstance(g, str):
        g = _as_dict(g)
    if isinstance(g, list):
        try:
            g = g[int(layer)]
        except (ValueError, IndexError):
            return {}
    elif isinstance(g, dict) and str(layer) in g:
        g = g[str(layer)]
    if isinstance(g, dict) and g and all(isinstance(v, values) for v in g.values()):
        return g
    return {}


def load_run(run_dir: str | Path) -> RunData:
    """Read every committed group of a run through the public reader (`moe_probe.open_run`).

    Raises ValueError (the reader's StoreError) with one line for a missing or foreign store."""
    from moe_probe import open_run

    path = Path(run_dir)
    if not path.exists():
        raise ValueError(f"no such run directory: {run_dir}")
    from moe_probe.store import StoreError

    try:
        store = open_run(path)
        attrs = dict(store.attrs)
        groups = {}
        for g in store.groups:
            if g in CORE_GROUPS and store.committed_steps(g) > 0:
                ds = store.dataset(g)
                # Everything but the expert-sized arrays now (and bad chunks surface here as
                # one line); `load`/`coactivation` stay lazy and are read a layer at a time.
                small = [v for v in ds.data_vars if "expert" not in ds[v].dims]
                groups[g] = ds.assign({v: ds[v].load() for v in small})
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - a chunk that cannot be decoded is bad input too
        msg = str(e).strip().splitlines()
        raise ValueError(f"cannot read {run_dir}: {type(e).__name__}: "
                         f"{msg[0] if msg else ''}") from e
    name = _as_dict(attrs.get("run")).get("name") or path.name
    return RunData(name=str(name), run_dir=str(run_dir), attrs=attrs, groups=groups)
