"""Run every detector on every run and assemble the report."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.dominance import detect_dominance
from moe_probe.diagnose.findings import Report, RunDiagnosis, remedy_for
from moe_probe.diagnose.gradients import detect_conflict, detect_domination
from moe_probe.diagnose.probes import detect_regression
from moe_probe.diagnose.routing import detect_collapse, detect_dead_experts, detect_imbalance
from moe_probe.diagnose.rundata import RunData
from moe_probe.diagnose.takeover import detect_takeover

DETECTORS = (detect_collapse, detect_dead_experts, detect_dominance, detect_imbalance,
             detect_domination, detect_conflict, detect_takeover)


def final_capacity_rate(ds) -> dict:
    """Mean over layers of the last routed row of a ``routing`` Dataset, per modality (None where
    the modality is absent). The one definition: reports and the dashboard's Runs page use it."""
    if ds is None or "capacity_rate" not in ds or ds.sizes.get("step", 0) == 0:
        return {}
    last = ds["capacity_rate"].isel(step=-1).transpose("layer", "modality").values.astype(float)
    out = {}
    for mi, m in enumerate(ds["modality"].values):
        col = last[:, mi]
        out[str(m)] = float(np.nanmean(col)) if np.isfinite(col).any() else None
    return out


def diagnose_run(run: RunData, cfg: DiagnoseConfig | None = None,
                 control: RunData | None = None) -> RunDiagnosis:
    cfg = cfg or DiagnoseConfig()
    results = [d(run, cfg) for d in DETECTORS]
    results.append(detect_regression(run, cfg, control if control is not run else None))
    extent = run.extent()
    return RunDiagnosis(
        run_dir=run.run_dir, name=run.name, recipe=run.recipe, arch=run.arch,
        steps={g: rows for g, (rows, _) in extent.items()},
        last_step=max((last for _, last in extent.values()), default=None),
        final_capacity_rate=final_capacity_rate(run.get("routing")),
        checks={r.kind: r.status for r in results},
        findings=tuple(replace(f, remedy=remedy_for(f.kind, run.arch))
                       for r in results for f in r.findings))


def diagnose(runs: list[RunData], cfg: DiagnoseConfig | None = None,
             control: RunData | None = None) -> Report:
    cfg = cfg or DiagnoseConfig()
    return Report(runs=tuple(diagnose_run(r, cfg, control) for r in runs),
                  config=cfg.to_dict(), control=control.run_dir if control else None)
