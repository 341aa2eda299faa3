"""What the detectors and reports read: a run's attrs and its groups as xarray Datasets.

Detectors take a :class:`RunData`, never a store, so tests can hand-build Datasets with the
documented dims (ARCHITECTURE.md, "Store") and the same code runs on real stores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

GROUPS = ("routing", "loss", "grad", "probe", "eval", "snapshot")


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

        From the model attrs when they carry per-layer groups; else, for a grouped arch without
        that metadata, nothing can be said, and an ungrouped layer routes into all experts."""
        groups = _layer_groups(self.model, layer)
        if groups:
            from moe_probe.modalities import TASK_OF_MODALITY

            name = TASK_OF_MODALITY.get(modality)
            for key in (name, "all"):
                if key in groups:
                    return [int(e) for e in groups[key]]
        return list(range(n_experts))


def _as_dict(v) -> dict:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return {}
    return dict(v) if isinstance(v, dict) else {}


def _layer_groups(model: dict, layer: str) -> dict:
    """Per-layer expert groups in whichever shape the writer used: {layer: {group: ids}}, a list
    indexed by layer, or one {group: ids} for every layer."""
    g = model.get("groups", model.get("expert_groups"))
    if isinstance(g, str):
        g = _as_dict(g)
    if isinstance(g, list):
        try:
            g = g[int(layer)]
        except (ValueError, IndexError):
            return {}
    elif isinstance(g, dict) and str(layer) in g:
        g = g[str(layer)]
    if isinstance(g, dict) and all(isinstance(v, (list, tuple)) for v in g.values()):
        return g
    return {}


def load_run(run_dir: str | Path) -> RunData:
    """Read every committed group of a run through the public reader (`moe_probe.open_run`).

    Raises ValueError (the reader's StoreError) with one line for a missing or foreign store."""
    from moe_probe import open_run

    path = Path(run_dir)
    if not path.exists():
        raise ValueError(f"no such run directory: {run_dir}")
    store = open_run(path)
    attrs = dict(store.attrs)
    groups = {}
    for g in store.groups:
        if g in GROUPS and store.committed_steps(g) > 0:
            groups[g] = store.dataset(g).load()
    name = _as_dict(attrs.get("run")).get("name") or path.name
    return RunData(name=str(name), run_dir=str(run_dir), attrs=attrs, groups=groups)
