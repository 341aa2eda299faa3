"""Routing detectors on the `routing` group: collapse, dead experts, load imbalance.

Each looks per (layer, modality) for a sustained stretch (DiagnoseConfig.window rows) beyond a
threshold and reports one finding per modality listing the layers where it happened.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import REMEDIES, CheckResult, Finding
from moe_probe.diagnose.rundata import RunData, layer_load
from moe_probe.diagnose.windows import first_valid, sustained, tail_mean
from moe_probe.metrics import DEAD_SHARE


def _routing(run: RunData, var: str, cfg: DiagnoseConfig, kind: str):
    ds = run.get("routing")
    if ds is None or var not in ds:
        return None, CheckResult(kind=kind, not_measured="no routing rows")
    if ds.sizes["step"] < cfg.window:
        return None, CheckResult(
            kind=kind, not_measured=f"{ds.sizes['step']} routed rows < window {cfg.window}")
    return ds, None


def _scan(da: xr.DataArray, cfg: DiagnoseConfig, *, above=None, below=None):
    """modality -> {layer: onset row} for every (layer, modality) with a sustained stretch."""
    out: dict[str, dict[str, int]] = {}
    da = da.transpose("step", "layer", "modality")
    for mi, m in enumerate(da["modality"].values):
        for li, layer in enumerate(da["layer"].values):
            x = da.values[:, li, mi]
            i = sustained(x, above=above, below=below, window=cfg.window, smooth=cfg.smooth)
            if i is not None:
                out.setdefault(str(m), {})[str(layer)] = i
    return out


def _per_layer(da: xr.DataArray, m: str, layers: dict[str, int], steps) -> dict:
    """The numbers a reader needs per flagged layer: start, minimum, final, onset step."""
    ev = {}
    for layer, i in layers.items():
        x = da.sel(modality=m, layer=layer).values.astype(float)
        ev[layer] = {"onset_step": int(steps[i]), "start": first_valid(x),
                     "min": float(np.nanmin(x)), "final": tail_mean(x, 1)}
    return ev


def detect_collapse(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    kind = "routing_collapse"
    ds, skip = _routing(run, "capacity_rate", cfg, kind)
    if skip:
        return skip
    da, steps = ds["capacity_rate"], ds["step"].values
    found = []
    for m, layers in _scan(da, cfg, below=cfg.collapse_rate).items():
        per = _per_layer(da, m, layers, steps)
        onset = min(v["onset_step"] for v in per.values())
        final = float(np.mean([v["final"] for v in per.values()]))
        worst = min(v["min"] for v in per.values())
        if final >= cfg.collapse_rate:
            severity, how = "info", "then recovered"
        elif final < cfg.collapse_critical:
            severity, how = "critical", "and is still collapsed at the end"
        else:
            severity, how = "warning", "and has not recovered"
        found.append(Finding(
            kind=kind, severity=severity, run=run.run_dir, layers=tuple(layers), modality=m,
            onset_step=onset,
            evidence={"threshold": cfg.collapse_rate, "window_rows": cfg.window,
                      "final_mean": final, "min": worst, "per_layer": per},
            explanation=(
                f"The capacity rate of {m} tokens fell below {cfg.collapse_rate:g} for at least "
                f"{cfg.window} consecutive routed steps from step {onset} in layer(s) "
                f"{', '.join(layers)} (lowest {worst:.3f}, final {final:.3f}) {how}: the experts "
                f"{m} tokens pick are over capacity, so their assignments are dropped — the "
                f"paper's routing-collapse signal (Fig. 5a)."),
            remedy=REMEDIES[kind]))
    return CheckResult(kind=kind, findings=tuple(found))


def detect_dead_experts(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    """Experts that no token routed into their group reaches any more.

    Judged on the load of *all* modalities that route into the group, not on the per-modality
    `dead_frac`: text piling onto two experts makes `dead_frac[text]` high while vae tokens still
    keep the other experts busy — that is concentration (collapse / imbalance), not death."""
    kind = "dead_experts"
    ds, skip = _routing(run, "load", cfg, kind)
    if skip:
        return skip
    steps, mods = ds["step"].values, [str(m) for m in ds["modality"].values]
    labels = ds["expert"].values
    by_group: dict[tuple, dict] = {}
    for li, layer in enumerate(ds["layer"].values):
        layer = str(layer)
        x = layer_load(ds, li).values.astype(float)  # (S, M, E): one layer in memory at a time
        groups: dict[tuple, list[int]] = {}
        for mi, m in enumerate(mods):
            if np.nansum(x[:, mi]) > 0:
                groups.setdefault(tuple(run.expert_group(layer, m, x.shape[2])), []).append(mi)
        for ids, mis in groups.items():
            ids = list(ids)
            tot = np.nansum(x[:, mis][:, :, ids], axis=1)  # (S, E_g)
            share = tot.sum(1, keepdims=True) / len(ids)
            with np.errstate(invalid="ignore"):
                dead_SE = (tot < DEAD_SHARE * share) & (share > 0)
            frac = dead_SE.mean(1)
            i = sustained(frac, above=cfg.dead_frac, window=cfg.window, smooth=cfg.smooth)
            if i is None:
                continue
            win = dead_SE[i:i + cfg.window]
            dead = [int(labels[ids[j]]) for j in np.flatnonzero(win.mean(0) >= 0.5)]
            key = (tuple(mods[m] for m in mis), tuple(dead))
            by_group.setdefault(key, {})[layer] = {
                "onset_step": int(steps[i]), "experts": dead, "group_size": len(ids),
                "max_dead_frac": float(frac.max()), "final_dead_frac": float(frac[-1])}
    found = []
    for (mod_names, dead), per in by_group.items():
        onset = min(v["onset_step"] for v in per.values())
        worst = max(v["max_dead_frac"] for v in per.values())
        found.append(Finding(
            kind=kind, severity="critical" if worst >= cfg.dead_critical else "warning",
            run=run.run_dir, layers=tuple(per), modality=mod_names[0] if len(mod_names) == 1
            else None, onset_step=onset,
            evidence={"threshold": cfg.dead_frac, "window_rows": cfg.window, "experts": list(dead),
                      "modalities": list(mod_names), "max_dead_frac": worst, "per_layer": per},
            explanation=(
                f"From step {onset}, expert(s) {', '.join(map(str, dead))} of layer(s) "
                f"{', '.join(per)} receive less than 1% of the uniform share of the assignments "
                f"of every token kind routed to them ({', '.join(mod_names)}) for {cfg.window}+ "
                f"consecutive routed steps: their parameters are wasted while the remaining "
                f"experts absorb the load."),
            remedy=REMEDIES[kind]))
    return CheckResult(kind=kind, findings=tuple(found))


def detect_imbalance(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    """MaxVio of the load summed over each `window`-row stretch, per (layer, modality group).

    Not the stored per-step `maxvio`: with few tokens per expert per step, sampling noise alone
    puts the per-step MaxVio above 1 (64 experts, 3 assignments each on average: ~1.7). Summing
    W rows keeps an expert that is busiest *consistently* and averages the noise away."""
    kind = "load_imbalance"
    ds, skip = _routing(run, "load", cfg, kind)
    if skip:
        return skip
    steps, mods = ds["step"].values, [str(m) for m in ds["modality"].values]
    by_mod: dict[str, dict] = {}
    for li, layer in enumerate(ds["layer"].values):
        layer = str(layer)
        x = layer_load(ds, li).values.astype(float)  # (S, M, E)
        for mi, m in enumerate(mods):
            g = x[:, mi][:, run.expert_group(layer, m, x.shape[2])]
            if not np.nansum(g):
                continue
            c = np.concatenate([np.zeros((1, g.shape[1])), np.nancumsum(g, 0)])
            w = c[cfg.window:] - c[:-cfg.window]  # (S - W + 1, E_g): window sums
            mean = w.mean(1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mv = np.where(mean > 0, (w.max(1) - mean) / mean, np.nan)
            i = sustained(mv, above=cfg.maxvio, window=1, smooth=cfg.smooth)
            if i is None:
                continue
            by_mod.setdefault(m, {})[layer] = {
                "onset_step": int(steps[i]), "start": first_valid(mv), "max": float(np.nanmax(mv)),
                "final": tail_mean(mv, 1),
                "busiest_expert": int(ds["expert"].values[
                    run.expert_group(layer, m, x.shape[2])[int(np.argmax(w[-1]))]])}
    found = []
    for m, per in by_mod.items():
        onset = min(v["onset_step"] for v in per.values())
        final = max(v["final"] for v in per.values())
        severity = "critical" if final > cfg.maxvio_critical else "warning"
        found.append(Finding(
            kind=kind, severity=severity, run=run.run_dir, layers=tuple(per), modality=m,
            onset_step=onset,
            evidence={"threshold": cfg.maxvio, "window_rows": cfg.window, "final_max": final,
                      "per_layer": per},
            explanation=(
                f"Summed over {cfg.window} routed steps, the busiest expert of {m} tokens got "
                f"more than {1 + cfg.maxvio:g}x the mean load (MaxVio > {cfg.maxvio:g}) from step "
                f"{onset} in layer(s) {', '.join(per)} (final {final:.2f}): with a capacity "
                f"limit those experts drop tokens while others idle."),
            remedy=REMEDIES[kind]))
    return CheckResult(kind=kind, findings=tuple(found))
