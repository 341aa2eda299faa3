"""Routing detectors on the `routing` group: collapse, dead experts, load imbalance.

Each looks per (layer, modality) for a sustained stretch (DiagnoseConfig.window rows) beyond a
threshold and reports one finding per modality listing the layers where it happened.
"""

from __future__ import annotations

import functools

import numpy as np

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import REMEDIES, CheckResult, Finding
from moe_probe.diagnose.rundata import RunData
from moe_probe.diagnose.source import (
    GroupSource, first_runs, rows_beyond, series_edge, series_extreme,
)
from moe_probe.metrics import pooled_dead


def _routing(run: RunData, var: str, cfg: DiagnoseConfig, kind: str):
    ds = run.get("routing")
    if ds is None or var not in ds:
        return None, CheckResult(kind=kind, not_measured="no routing rows")
    if ds.sizes["step"] < cfg.window:
        return None, CheckResult(
            kind=kind, not_measured=f"{ds.sizes['step']} routed rows < window {cfg.window}")
    return ds, None


def _per_layer(src: GroupSource, cells: dict[str, tuple[int, int]], onsets: dict) -> dict:
    """The numbers a reader needs per flagged layer: start, minimum, final, onset step."""
    ev = {}
    count, low = src.stat("capacity_rate", "count"), src.stat("capacity_rate", "min")
    for layer, (li, mi) in cells.items():
        def x(a, b, li=li, mi=mi):
            return src.rows("capacity_rate", a, b)[:, li, mi]
        c = None if count is None else count[:, li, mi]
        ev[layer] = {"onset_step": int(src.steps[onsets[layer]]),
                     "start": series_edge(src, x, c),
                     "min": series_extreme(src, x, None if low is None else low[:, li, mi]),
                     "final": series_edge(src, x, c, last=True)}
    return ev


def detect_collapse(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    kind = "routing_collapse"
    ds, skip = _routing(run, "capacity_rate", cfg, kind)
    if skip:
        return skip
    src = run.source("routing")
    layers = [str(x) for x in ds["layer"].values]
    mods = [str(x) for x in ds["modality"].values]
    n_l, n_m = len(layers), len(mods)
    beyond = rows_beyond(src, "capacity_rate", below=cfg.collapse_rate)
    rows = first_runs(src, src.n, n_l * n_m,
                      lambda a, b: src.rows("capacity_rate", a, b).reshape(-1, n_l * n_m),
                      None if beyond is None else beyond.reshape(len(beyond), n_l * n_m),
                      below=cfg.collapse_rate, window=cfg.window, smooth=cfg.smooth)
    found = []
    for mi, m in enumerate(mods):
        onsets = {layers[li]: rows[li * n_m + mi] for li in range(n_l)
                  if rows[li * n_m + mi] is not None}
        if not onsets:
            continue
        per = _per_layer(src, {layer: (layers.index(layer), mi) for layer in onsets}, onsets)
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
            kind=kind, severity=severity, run=run.run_dir, layers=tuple(per), modality=m,
            onset_step=onset,
            evidence={"threshold": cfg.collapse_rate, "window_rows": cfg.window,
                      "final_mean": final, "min": worst, "per_layer": per},
            explanation=(
                f"The capacity rate of {m} tokens fell below {cfg.collapse_rate:g} for at least "
                f"{cfg.window} consecutive routed steps from step {onset} in layer(s) "
                f"{', '.join(per)} (lowest {worst:.3f}, final {final:.3f}) {how}: the experts "
                f"{m} tokens pick are over capacity, so their assignments are dropped — the "
                f"paper's routing-collapse signal (Fig. 5a)."),
            remedy=REMEDIES[kind]))
    return CheckResult(kind=kind, findings=tuple(found))


def detect_dead_experts(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    """Experts that no token routed into their group reaches any more.

    Judged on the load of *all* modalities that route into the group, not on the per-modality
    `dead_frac`: text piling onto two experts makes `dead_frac[text]` high while vae tokens still
    keep the other experts busy — that is concentration (collapse / imbalance), not death.
    The per-row fraction is :func:`moe_probe.metrics.pooled_dead`, which the rollups also keep
    (``group_dead_frac``): rows are read only where a window's maximum is above the threshold."""
    kind = "dead_experts"
    ds, skip = _routing(run, "load", cfg, kind)
    if skip:
        return skip
    src = run.source("routing")
    mods = [str(m) for m in ds["modality"].values]
    labels = ds["expert"].values
    n_e = len(labels)
    high = src.stat("group_dead_frac", "max")
    bounds: dict[int, np.ndarray] = {}  # per group size: a row's fraction is a multiple of 1/E_g
    by_group: dict[tuple, dict] = {}
    for li, layer in enumerate(ds["layer"].values):
        layer = str(layer)
        used = src.total("load", 0, src.n, layer=li).sum(axis=1)  # (M,) assignments per kind
        groups: dict[tuple, list[int]] = {}
        for mi, m in enumerate(mods):
            if used[mi] > 0:
                groups.setdefault(tuple(run.expert_group(layer, m, n_e)), []).append(mi)
        pools = [(list(ids), mis) for ids, mis in groups.items()]
        if not pools:
            continue

        def frac(a, b, li=li, pools=pools):
            x = src.rows("load", a, b, layer=li).astype(float)  # (R, M, E)
            return np.stack([pooled_dead(x, ids, mis)[1] for ids, mis in pools], axis=1)

        beyond = None
        if high is not None:
            for ids, _ in pools:
                if len(ids) not in bounds:
                    bounds[len(ids)] = rows_beyond(src, "group_dead_frac", above=cfg.dead_frac,
                                                   quantum=1.0 / len(ids))
            beyond = np.stack([bounds[len(ids)][:, li, mis[0]] for ids, mis in pools], axis=1)
        onsets = first_runs(src, src.n, len(pools), frac, beyond, above=cfg.dead_frac,
                            window=cfg.window, smooth=cfg.smooth, nan_free=True,
                            prefetch=lambda rs, li=li: src.prefetch("load", rs, layer=li))
        for gi, ((ids, mis), i) in enumerate(zip(pools, onsets)):
            if i is None:
                continue
            x = src.rows("load", i, i + cfg.window, layer=li).astype(float)
            win, _ = pooled_dead(x, ids, mis)
            dead = [int(labels[ids[j]]) for j in np.flatnonzero(win.mean(0) >= 0.5)]
            key = (tuple(mods[m] for m in mis), tuple(dead))
            col = (lambda a, b, gi=gi, frac=frac: frac(a, b)[:, gi])
            by_group.setdefault(key, {})[layer] = {
                "onset_step": int(src.steps[i]), "experts": dead, "group_size": len(ids),
                "max_dead_frac": series_extreme(src, col, None if high is None
                                                else high[:, li, mis[0]], fn=np.nanmax),
                "final_dead_frac": float(col(src.n - 1, src.n)[-1])}
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


def _window_maxvio(g_RE: np.ndarray, window: int):
    """MaxVio of the load summed over each ``window``-row stretch of ``g_RE`` (one position per
    stretch), and those sums. Cumulative sums of counts are exact in float64, so a stretch's sum
    is the same whichever rows the cumulative sum started from."""
    c = np.concatenate([np.zeros((1, g_RE.shape[1])), np.nancumsum(g_RE, 0)])
    w = c[window:] - c[:-window]  # (R - W + 1, E_g)
    mean = w.mean(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, (w.max(1) - mean) / mean, np.nan), w


def detect_imbalance(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    """MaxVio of the load summed over each `window`-row stretch, per (layer, modality group).

    Not the stored per-step `maxvio`: with few tokens per expert per step, sampling noise alone
    puts the per-step MaxVio above 1 (64 experts, 3 assignments each on average: ~1.7). Summing
    W rows keeps an expert that is busiest *consistently* and averages the noise away.
    Rows are read from the start until every (layer, modality) has its onset (stretch sums do not
    bound per stretch from coarser windows); the evidence is the first and the last stretch."""
    kind = "load_imbalance"
    ds, skip = _routing(run, "load", cfg, kind)
    if skip:
        return skip
    src = run.source("routing")
    mods = [str(m) for m in ds["modality"].values]
    n_e, w_ = ds.sizes["expert"], cfg.window
    n_pos = src.n - w_ + 1
    by_mod: dict[str, dict] = {}
    for li, layer in enumerate(ds["layer"].values):
        layer = str(layer)
        used = src.total("load", 0, src.n, layer=li)  # (M, E)
        cells = []
        for mi, m in enumerate(mods):
            ids = run.expert_group(layer, m, n_e)
            if np.nansum(used[mi, ids]):
                cells.append((mi, ids))
        if not cells:
            continue

        @functools.lru_cache(maxsize=4)  # the cells' evidence reads the same positions
        def mv(a, b, li=li, cells=cells):  # positions [a, b): rows [a, b + W - 1)
            x = src.rows("load", a, b + w_ - 1, layer=li).astype(float)
            return np.stack([_window_maxvio(x[:, mi][:, ids], w_)[0] for mi, ids in cells], 1)

        onsets = first_runs(src, n_pos, len(cells), mv, above=cfg.maxvio, window=1,
                            smooth=cfg.smooth)
        for ci, ((mi, ids), i) in enumerate(zip(cells, onsets)):
            if i is None:
                continue
            col = (lambda a, b, ci=ci, mv=mv: mv(a, min(b, n_pos))[:, ci])
            last = src.rows("load", src.n - w_, src.n, layer=li).astype(float)[:, mi][:, ids]
            _, w_last = _window_maxvio(last, w_)
            by_mod.setdefault(mods[mi], {})[layer] = {
                "onset_step": int(src.steps[i]), "start": series_edge(src, col, n=n_pos),
                "final": series_edge(src, col, last=True, n=n_pos),
                "busiest_expert": int(ds["expert"].values[ids[int(np.argmax(w_last[-1]))]])}
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
