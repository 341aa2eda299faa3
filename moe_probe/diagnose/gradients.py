"""Gradient detectors on the `grad` group: generation domination and persistent conflict.

Both judge each (layer, component) cell over its measured rows — layer `all` (the whole model)
included: NaN rows (a component the layer lacks, or a zero gradient — e.g. shared experts while
shielded) are not evidence. A condition counts when it holds on most rows from its onset to the
end of the run (see :func:`persistent`), so a conflict that starts mid-run is found and dated.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import REMEDIES, CheckResult, Finding
from moe_probe.diagnose.rundata import RunData


def persistent(flag: np.ndarray, cfg: DiagnoseConfig) -> int | None:
    """Row where a condition starts to hold on `most` of the rows up to the end of the run.

    The stretch must start with `min_rows` flagged rows in a row (one spike does not date it),
    cover at least `persist_span` of the rows, and pass a sign test against a coin flip."""
    n = flag.size
    span = max(cfg.min_rows, math.ceil(cfg.persist_span * n))
    if n - span + 1 <= 0:
        return None
    c = np.concatenate([[0], np.cumsum(flag, dtype=np.int64)])
    i = np.arange(n - span + 1)
    k = min(cfg.min_rows, n)
    starts = (c[np.minimum(i + cfg.min_rows, n)] - c[i]) == np.minimum(k, n - i)
    tail_k, tail_n = c[n] - c[i], n - i
    # the tail's mean as numpy takes it of a bool array (a float64 sum over the count)
    ok = starts & (tail_k.astype(np.float64) / tail_n >= cfg.most)
    for j in np.flatnonzero(ok):  # first row that also passes the sign test
        if _binom_tail(int(tail_k[j]), int(tail_n[j])) <= cfg.alpha:
            return int(j)
    return None


def _binom_tail(k: int, m: int) -> float:
    """P(X >= k) for X ~ Binomial(m, 1/2)."""
    return sum(math.comb(m, j) for j in range(k, m + 1)) / 2.0 ** m


def _cells(ds: xr.Dataset, components):
    """(layer, component, li, ci) of every cell, component by component."""
    for ci, comp in enumerate(ds["component"].values):
        if components is not None and str(comp) not in components:
            continue
        for li, layer in enumerate(ds["layer"].values):
            yield str(layer), str(comp), li, ci


def _by_cell(da: xr.DataArray) -> np.ndarray:
    """(layer, component, step) as stored (float32), each cell's series contiguous: the
    detectors take a cell at a time, in float64."""
    return np.ascontiguousarray(da.transpose("layer", "component", "step").values)


def _grad(run: RunData, kind: str, var: str):
    ds = run.get("grad")
    if ds is None or var not in ds:
        return None, CheckResult(kind=kind, not_measured="no grad rows (gradient tracer off)")
    return ds.transpose("step", "layer", "component"), None


def detect_domination(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    kind = "gradient_domination"
    ds, skip = _grad(run, kind, "norm_gen")
    if skip:
        return skip
    steps = ds["step"].values
    by_comp: dict[str, dict] = {}
    measured = 0
    nu_LCS, ng_LCS = _by_cell(ds["norm_und"]), _by_cell(ds["norm_gen"])
    for layer, comp, li, ci in _cells(ds, cfg.grad_components):
        nu, ng = nu_LCS[li, ci].astype(float), ng_LCS[li, ci].astype(float)
        ok = np.isfinite(nu) & np.isfinite(ng) & (nu > 0) & (ng > 0)
        if ok.sum() < cfg.min_rows:
            continue
        measured += 1
        ratio = ng[ok] / nu[ok]
        above = ratio > cfg.grad_ratio
        i = persistent(above, cfg)
        if i is None:
            continue
        by_comp.setdefault(comp, {})[layer] = {
            "onset_step": int(steps[ok][i]), "rows": int(above.size - i),
            "frac_above": float(above[i:].mean()), "median_ratio": float(np.median(ratio[i:]))}
    if not measured:
        return CheckResult(kind=kind, not_measured=f"fewer than {cfg.min_rows} rows with both "
                                                   f"gradients on {', '.join(cfg.grad_components)}")
    found = []
    for comp, per in by_comp.items():
        onset = min(v["onset_step"] for v in per.values())
        med = max(v["median_ratio"] for v in per.values())
        found.append(Finding(
            kind=kind, severity="critical" if med > 3 * cfg.grad_ratio else "warning",
            run=run.run_dir, layers=tuple(per), modality="vae", onset_step=onset,
            evidence={"component": comp, "threshold": cfg.grad_ratio, "most": cfg.most,
                      "max_median_ratio": med, "per_layer": per},
            explanation=(
                f"On the {comp} parameters of layer(s) {', '.join(per)}, the generation gradient "
                f"is more than {cfg.grad_ratio:g}x the understanding gradient on at least "
                f"{cfg.most:.0%} of the sampled steps (median ratio up to {med:.1f}, from step "
                f"{onset}): updates of parameters both tasks share are driven by generation."),
            remedy=REMEDIES[kind]))
    return CheckResult(kind=kind, findings=tuple(found))


def detect_conflict(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    kind = "gradient_conflict"
    ds, skip = _grad(run, kind, "cosine")
    if skip:
        return skip
    steps = ds["step"].values
    by_comp: dict[str, dict] = {}
    measured = 0
    cos_LCS = _by_cell(ds["cosine"])
    for layer, comp, li, ci in _cells(ds, None):
        cos = cos_LCS[li, ci].astype(float)
        ok = np.isfinite(cos)
        if ok.sum() < cfg.min_rows:
            continue
        measured += 1
        neg = cos[ok] < cfg.conflict_cosine
        i = persistent(neg, cfg)
        if i is None:
            continue
        by_comp.setdefault(comp, {})[layer] = {
            "onset_step": int(steps[ok][i]), "rows": int(neg.size - i),
            "frac_conflict": float(neg[i:].mean()), "median_cosine": float(np.median(cos[ok][i:]))}
    if not measured:
        return CheckResult(kind=kind, not_measured=f"fewer than {cfg.min_rows} rows with a cosine")
    found = []
    for comp, per in by_comp.items():
        onset = min(v["onset_step"] for v in per.values())
        worst = min(v["median_cosine"] for v in per.values())
        found.append(Finding(
            kind=kind, severity="critical" if worst < cfg.conflict_critical else "warning",
            run=run.run_dir, layers=tuple(per), modality=None, onset_step=onset,
            evidence={"component": comp, "threshold": cfg.conflict_cosine, "most": cfg.most,
                      "min_median_cosine": worst, "per_layer": per},
            explanation=(
                f"The understanding and generation gradients on the {comp} parameters of "
                f"layer(s) {', '.join(per)} point in opposing directions (cosine < "
                f"{cfg.conflict_cosine:g}) on at least {cfg.most:.0%} of the sampled steps "
                f"(median cosine down to {worst:.2f}, from step {onset}): each task's update "
                f"undoes part of the other's."),
            remedy=REMEDIES[kind]))
    return CheckResult(kind=kind, findings=tuple(found))
