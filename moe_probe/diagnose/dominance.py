"""Modality dominance: generation tokens take over experts understanding tokens used early on.

Per layer, each expert's assignments are split by task (text+vit = und, vae = gen) and compared
between the early and late phase of the run. Raw counts, not per-modality preferences: what
matters for capacity is whose tokens fill the expert. An expert is taken over when generation's
share of its work rises past `takeover_share` *and* generation tokens' own use of it grows: an
expert that understanding tokens merely left (they piled onto others) is not "taken". Grouped
layers (symbiotic, mot) cannot show it — vae tokens never reach und experts — so they pass
without special-casing.
"""

from __future__ import annotations

import numpy as np

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import REMEDIES, CheckResult, Finding
from moe_probe.diagnose.rundata import RunData
from moe_probe.diagnose.source import first_runs
from moe_probe.diagnose.windows import phases
from moe_probe.modalities import TASK_OF_MODALITY


def detect_dominance(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    kind = "modality_dominance"
    ds = run.get("routing")
    if ds is None or "load" not in ds:
        return CheckResult(kind=kind, not_measured="no routing load rows")
    mods = [str(m) for m in ds["modality"].values]
    und = [m for m in mods if TASK_OF_MODALITY.get(m) == "und"]
    gen = [m for m in mods if TASK_OF_MODALITY.get(m) == "gen"]
    n = ds.sizes["step"]
    if not und or not gen:
        return CheckResult(kind=kind, not_measured="needs both und and gen modalities")
    if n < max(cfg.window, 2):
        return CheckResult(kind=kind, not_measured=f"{n} routed rows < window {cfg.window}")
    src = run.source("routing")
    ui = [mods.index(m) for m in und]
    gi = [mods.index(m) for m in gen]
    if "tokens" in ds and float(src.total("tokens", 0, n)[:, gi].sum()) == 0:
        return CheckResult(kind=kind, not_measured="no generation tokens routed")
    early, late = phases(n, cfg.phase_fraction)
    steps = src.steps
    experts = ds["expert"].values
    per, onsets = {}, []
    any_gen = False
    for li, layer in enumerate(ds["layer"].values):
        # Phase sums from the rollups' window sums (rows only at the phases' edges).
        e_ME = src.total("load", early.start, early.stop, layer=li)
        l_ME = src.total("load", late.start, late.stop, layer=li)
        u_early, g_early = e_ME[ui].sum(0), e_ME[gi].sum(0)
        u_late, g_late = l_ME[ui].sum(0), l_ME[gi].sum(0)
        any_gen = any_gen or src.total("load", 0, n, layer=li)[gi].sum() > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            gs_early = g_early / (u_early + g_early)
            gs_late = g_late / (u_late + g_late)
        und_experts = np.flatnonzero(gs_early <= 1 - cfg.takeover_share)
        if und_experts.size == 0:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            growth = (g_late / g_late.sum()) / (g_early / g_early.sum())
        taken = [e for e in und_experts if gs_late[e] >= cfg.takeover_share
                 and gs_late[e] - gs_early[e] >= cfg.takeover_delta
                 and not growth[e] < cfg.takeover_growth]  # NaN/inf (from zero) counts as grown
        if len(taken) < cfg.takeover_min_fraction * und_experts.size:
            continue
        # When did it happen: the first sustained stretch where gen fills most of those experts.
        def share(a, b, li=li, taken=taken):
            x = src.rows("load", a, b, layer=li).astype(float)[:, :, taken]  # (R, M, E_t)
            u_S = np.nansum(x[:, ui].sum(1), 1)
            g_S = np.nansum(x[:, gi].sum(1), 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                return (g_S / (u_S + g_S))[:, None]

        (i,) = first_runs(src, n, 1, share, above=cfg.takeover_share - 1e-12, window=cfg.window,
                          smooth=cfg.smooth)
        if i is None:
            continue
        onsets.append(int(steps[i]))
        per[str(layer)] = {
            "onset_step": int(steps[i]),
            "und_experts_early": [int(experts[e]) for e in und_experts],
            "taken_over": [int(experts[e]) for e in taken],
            "gen_share_early": {str(int(experts[e])): float(gs_early[e]) for e in taken},
            "gen_share_late": {str(int(experts[e])): float(gs_late[e]) for e in taken},
            "gen_use_growth": {str(int(experts[e])): float(growth[e]) for e in taken},
        }
    if not any_gen:
        return CheckResult(kind=kind, not_measured="no generation tokens routed")
    if not per:
        return CheckResult(kind=kind)
    n_taken = sum(len(v["taken_over"]) for v in per.values())
    n_und = sum(len(v["und_experts_early"]) for v in per.values())
    severity = "critical" if n_taken >= 0.5 * n_und else "warning"
    finding = Finding(
        kind=kind, severity=severity, run=run.run_dir, layers=tuple(per), modality=gen[0],
        onset_step=min(onsets),
        evidence={"phase_fraction": cfg.phase_fraction, "takeover_share": cfg.takeover_share,
                  "taken_over": n_taken, "und_experts_early": n_und, "per_layer": per},
        explanation=(
            f"{n_taken} of the {n_und} experts that understanding tokens (text, vit) filled at the "
            f"start now get most of their assignments from {gen[0]} tokens (layers "
            f"{', '.join(per)}, from step {min(onsets)}): generation tokens have taken over the "
            f"router, pushing understanding tokens onto other experts or out of capacity."),
        remedy=REMEDIES[kind])
    return CheckResult(kind=kind, findings=(finding,))
