"""A run's summary history (``moe_probe.summary``) read from its store: committed rows only,
each group read once as whole arrays and summarised for all steps at once."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_probe import summary as sm
from moe_probe._version import __version__
from moe_probe.diagnose.rundata import layer_load, load_run
from moe_probe.diagnose.runner import diagnose_run
from moe_probe.run import RunInfo, open_run
from moe_probe.store.reader import RunStore
from moe_probe.metrics import load_cv

__all__ = ["RunSummary", "read_summary", "run_params"]


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """Every summary key of a run at every sampled step."""

    name: str
    """The run's name (store attrs, else its directory name)."""
    store: str
    """Absolute path of the run's store: where the full detail is (``moe-probe dash`` opens it)."""
    params: dict
    """What goes into each tool's run config / params: the store path and the model's shape."""
    keys: tuple[str, ...]
    """Summary keys, in ``moe_probe.summary.summary_keys`` order."""
    steps: np.ndarray
    """(S,) int64: every step at which some summarised group (routing, loss, grad) has a row."""
    values: np.ndarray
    """(S, K) float64; NaN where a key has no value at a step."""

    def rows(self) -> Iterator[tuple[int, dict[str, float]]]:
        """(step, {key: value}) with the finite values of each step, in step order."""
        finite = np.isfinite(self.values)
        vals = self.values.tolist()  # python floats once, not per item
        for i, step in enumerate(self.steps.tolist()):
            yield step, {k: v for k, v, ok in zip(self.keys, vals[i], finite[i]) if ok}

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one key where it has a value."""
        col = self.values[:, self.keys.index(key)]
        ok = np.isfinite(col)
        return self.steps[ok], col[ok]


def read_summary(run_dir, *, findings: bool = True) -> RunSummary:
    """The summary of a finished or live run (rows below each group's commit marker).

    ``findings``: diagnose the run (once, over all its committed rows) for the two findings keys.
    ValueError (one line) for a missing or foreign run, or a run with nothing to summarise."""
    store = open_run(run_dir)
    info = RunInfo.from_attrs(store.attrs, path=store.path)
    parts: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
    for group, summarise in (("routing", _routing), ("loss", _loss), ("grad", _grad)):
        if group in store.groups and store.committed_steps(group) > 0:
            ds = store.dataset(group)
            parts.append((ds["step"].values.astype(np.int64), summarise(store, ds, info)))
    if not parts:
        raise ValueError(f"{store.path}: no committed routing, loss or grad rows to export")
    steps = np.unique(np.concatenate([p[0] for p in parts]))
    cols: dict[str, np.ndarray] = {}
    for part_steps, part in parts:
        at = np.searchsorted(steps, part_steps)
        for key, v in part.items():
            cols[key] = np.full(steps.shape, np.nan)
            cols[key][at] = v
    if findings:
        cols.update(sm.findings_summary(_diagnose(store.path), steps))
    terms = store.labels("loss", "term") if "loss" in store.groups else []
    order = sm.summary_keys(_modalities(store), terms)
    keys = tuple(k for k in order if k in cols)
    assert set(keys) == set(cols), f"keys outside summary_keys: {set(cols) - set(keys)}"
    return RunSummary(
        name=info.name, store=str(store.store_path.resolve()), params=run_params(store, info),
        keys=keys, steps=steps,
        values=np.stack([cols[k] for k in keys], axis=1) if keys else np.empty((steps.size, 0)))


def _routing(store: RunStore, ds, info: RunInfo) -> dict[str, np.ndarray]:
    # .load() before any transpose: the reader's lazy arrays are read whole, in stored order
    # (step, layer, modality), which is the order the summary takes.
    arrays = {v: ds[v].load().transpose("step", "layer", "modality").values
              for v in sm.ROUTING_VARS if v in ds and v != "load_cv"}
    arrays["load_cv"] = (ds["load_cv"].load().transpose("step", "layer", "modality").values
                         if store.measured("routing", "load_cv") else _load_cv(ds, info))
    return sm.routing_summary([str(m) for m in ds["modality"].values], **arrays)


def _load_cv(ds, info: RunInfo) -> np.ndarray:
    """(S, L, M) load CV of a store written before ``load_cv`` was measured, from ``load``: one
    layer in memory at a time (the expert-sized array is the store's big one)."""
    mods = [str(m) for m in ds["modality"].values]
    out = []
    for li, layer in enumerate(ds["layer"].values):
        load_SME = layer_load(ds, li).values
        mask_ME = np.zeros(load_SME.shape[1:], dtype=bool)
        for mi, m in enumerate(mods):
            mask_ME[mi, info.expert_group(str(layer), m, load_SME.shape[2])] = True
        out.append(load_cv(load_SME, mask_ME))
    return np.stack(out, axis=1)


def _loss(store: RunStore, ds, info: RunInfo) -> dict[str, np.ndarray]:
    return sm.loss_summary([str(t) for t in ds["term"].values],
                           ds["value"].load().transpose("step", "term").values)


def _grad(store: RunStore, ds, info: RunInfo) -> dict[str, np.ndarray]:
    return sm.grad_summary([str(x) for x in ds["layer"].values],
                           [str(c) for c in ds["component"].values],
                           ds["cosine"].load().transpose("step", "layer", "component").values)


def _modalities(store: RunStore) -> list[str]:
    return store.labels("routing", "modality") if "routing" in store.groups else []


def _diagnose(run_dir: Path):
    return diagnose_run(load_run(run_dir)).findings


def run_params(store: RunStore, info: RunInfo) -> dict:
    """What goes into each tool's run config / params: the store path (the way to the
    dashboard) and the model's shape."""
    p = {"moe_probe_store": str(store.store_path.resolve()), "moe_probe_run": info.name,
         "moe_probe_recipe": info.recipe, "moe_probe_arch": info.arch,
         "moe_probe_layers": len(info.layers) or None, "moe_probe_experts": info.experts,
         "moe_probe_top_k": info.top_k, "moe_probe_version": __version__}
    return {k: v for k, v in p.items() if v is not None}
