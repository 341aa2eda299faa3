"""Shared-expert regression: the paper's Fig. 6 probe getting worse over training.

Two sources in the `probe` group — linear-probe `selectivity` per (layer, task) and the
`isolated` understanding metrics (routed experts masked) — each judged against its own start
and, with ``--control RUN``, against the control run's final value.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import REMEDIES, CheckResult, Finding
from moe_probe.diagnose.rundata import RunData
from moe_probe.diagnose.windows import first_valid, tail_mean

_LOWER_BETTER = ("loss", "ppl", "perplexity", "error", "nll", "fid")


def lower_is_better(metric: str) -> bool:
    """Direction of an isolated metric from its name (documented convention: losses, perplexity,
    error rates and FID go down when things improve; accuracies and scores go up)."""
    name = metric.lower()
    return any(t in name for t in _LOWER_BETTER)


def _series(ds: xr.Dataset):
    """(label, layer or None, values, lower_is_better) for every probe series of a run."""
    if "selectivity" in ds:
        sel = ds["selectivity"].transpose("step", "layer", "task")
        for li, layer in enumerate(sel["layer"].values):
            for ti, task in enumerate(sel["task"].values):
                yield f"selectivity[{layer},{task}]", str(layer), sel.values[:, li, ti], False
    if "isolated" in ds:
        iso = ds["isolated"].transpose("step", "metric")
        for mi, metric in enumerate(iso["metric"].values):
            yield f"isolated[{metric}]", None, iso.values[:, mi], lower_is_better(str(metric))


def _worse(value: float, ref: float, lower: bool, cfg: DiagnoseConfig) -> bool:
    if not (np.isfinite(value) and np.isfinite(ref)):
        return False
    if lower:
        return value > ref + cfg.loss_margin * max(abs(ref), 1e-12)
    return value < ref - cfg.probe_margin


def detect_regression(run: RunData, cfg: DiagnoseConfig,
                      control: RunData | None = None) -> CheckResult:
    kind = "shared_regression"
    ds = run.get("probe")
    if ds is None:
        return CheckResult(kind=kind, not_measured="no probe rows")
    if ds.sizes["step"] < 2 and control is None:
        return CheckResult(kind=kind, not_measured="one probe row: nothing to compare")
    steps = ds["step"].values
    ctrl = {}
    cds = control.get("probe") if control is not None else None
    if cds is not None:
        ctrl = {label: tail_mean(x, cfg.probe_tail) for label, _, x, _ in _series(cds)}

    found = []
    for basis in ("start", "control"):
        if basis == "control" and cds is None:
            continue
        per, layers = {}, []
        for label, layer, x, lower in _series(ds):
            x = np.asarray(x, dtype=float)
            final = tail_mean(x, cfg.probe_tail)
            ref = first_valid(x) if basis == "start" else ctrl.get(label, np.nan)
            if basis == "start" and np.isfinite(x).sum() < 2:
                continue
            if not _worse(final, ref, lower, cfg):
                continue
            worse_rows = [i for i in range(x.size) if _worse(x[i], ref, lower, cfg)]
            per[label] = {"reference": ref, "final": final, "lower_is_better": lower,
                          "onset_step": int(steps[worse_rows[0]]) if worse_rows else None}
            if layer is not None and layer not in layers:
                layers.append(layer)
        if not per:
            continue
        onsets = [v["onset_step"] for v in per.values() if v["onset_step"] is not None]
        what = "its value at the start of training" if basis == "start" else \
            f"the control run ({control.name})"
        items = ", ".join(f"{k} {v['reference']:.3f}→{v['final']:.3f}" for k, v in per.items())
        found.append(Finding(
            kind=kind, severity="warning", run=run.run_dir, layers=tuple(layers), modality=None,
            onset_step=min(onsets) if onsets else None,
            evidence={"basis": basis, "control": control.run_dir if basis == "control" else None,
                      "margin": cfg.probe_margin, "loss_margin": cfg.loss_margin,
                      "series": per},
            explanation=(
                f"What the shared experts know on their own is worse than {what}: {items}. "
                f"The always-on experts — the bridge between understanding and generation — are "
                f"being overwritten (the paper's Fig. 6 failure)."),
            remedy=REMEDIES[kind]))
    return CheckResult(kind=kind, findings=tuple(found))
