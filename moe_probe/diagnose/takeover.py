"""Expert takeover at token level: which generation tokens took over the experts that which
understanding tokens used to take (the ``token_routing`` group, first vs last row).

The count-level ``modality_dominance`` says *that* generation tokens fill experts understanding
tokens filled; this says *which* ones, from the probe set's per-token picks: per layer, an expert
is taken over when generation tokens (vae) made at most ``1 − takeover_share`` of its picks at
the first token-routing snapshot, at least ``takeover_share`` at the last, and their share rose
by ``takeover_delta`` or more (the thresholds of ``modality_dominance``). Always a warning. The finding names, per
such expert, the understanding labels (digit classes of vit tokens, topics of text tokens) it
took at the first snapshot and takes at the last, and the digit classes and patch rows of the
generation tokens that took it, with their counts. Nothing is reported where nothing happened.
"""

from __future__ import annotations

import numpy as np

from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.findings import CheckResult, Finding
from moe_probe.diagnose.rundata import RunData
from moe_probe.modalities import TASK_OF_MODALITY
from moe_probe.specialization import TokenRouting, expert_counts

KIND = "expert_takeover"
TOP = 3
SHOWN = 5
"""Experts spelled out in the explanation (the evidence holds every one)."""


def _top(counts: dict[str, int], n: int = TOP) -> dict[str, int]:
    """The ``n`` largest non-zero entries, largest first."""
    return dict(sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: -kv[1])[:n])


def _labels(tr: TokenRouting, c, kinds) -> dict[str, int]:
    """Counts per '<kind> <label>' (e.g. 'vit digit 3', 'text topic compound')."""
    names = tr.label_names
    sets = {i: s for s in tr.label_sets for i in tr.label_range(s)}
    return {f"{tr.modalities[m]} {sets[i]} {names[i]}": int(c["labels"][m, i])
            for m in kinds for i in range(len(names))}


def detect_takeover(run: RunData, cfg: DiagnoseConfig) -> CheckResult:
    ds = run.get("token_routing")
    if ds is None:
        return CheckResult(kind=KIND, not_measured="no token-level routing rows")
    if ds.sizes["step"] < 2:
        return CheckResult(kind=KIND, not_measured="one token-level routing row (needs two)")
    tr = TokenRouting.from_dataset(ds.isel(step=[0, -1]), run.attrs)
    und = [m for m, k in enumerate(tr.modalities) if TASK_OF_MODALITY.get(k) == "und"]
    gen = [m for m, k in enumerate(tr.modalities) if TASK_OF_MODALITY.get(k) == "gen"]
    if not und or not gen or not np.isin(tr.kind, gen).any():
        return CheckResult(kind=KIND, not_measured="no generation tokens in the probe set")
    first, last = (int(s) for s in tr.steps)
    per, sentences, n_taken, n_und = {}, [], 0, 0
    for li, layer in enumerate(tr.layers):
        taken = {}
        for e in range(tr.n_experts):
            c0, c1 = expert_counts(tr, 0, li, e), expert_counts(tr, 1, li, e)
            u0, g0 = c0["kinds"][und].sum(), c0["kinds"][gen].sum()
            u1, g1 = c1["kinds"][und].sum(), c1["kinds"][gen].sum()
            if u0 + g0 == 0 or u1 + g1 == 0:
                continue
            gs0, gs1 = g0 / (u0 + g0), g1 / (u1 + g1)
            if gs0 > 1 - cfg.takeover_share:
                continue
            n_und += 1
            if gs1 < cfg.takeover_share or gs1 - gs0 < cfg.takeover_delta:
                continue
            before = _top(_labels(tr, c0, und))
            after_und = _labels(tr, c1, und)
            rows = c1["patches"][gen].sum(0).reshape(tr.patch_grid).sum(1) \
                if int(np.prod(tr.patch_grid)) else np.zeros(0)
            taken[str(e)] = {
                "gen_share": [float(gs0), float(gs1)], "und_picks": [int(u0), int(u1)],
                "gen_picks": [int(g0), int(g1)],
                "und_labels_before": {k: [v, after_und[k]] for k, v in before.items()},
                "gen_labels_after": _top(_labels(tr, c1, gen)),
                "gen_patch_rows_after": {str(r): int(v) for r, v in enumerate(rows)},
            }
        if taken:
            per[str(layer)] = taken
            n_taken += len(taken)
            for e, t in taken.items():
                was = ", ".join(f"{k} ({v[0]} → {v[1]})" for k, v in t["und_labels_before"].items())
                now = ", ".join(f"{k} ({v})" for k, v in t["gen_labels_after"].items())
                rows = _top(t["gen_patch_rows_after"], 2)
                if rows:
                    now += " in patch rows " + " and ".join(rows)
                sentences.append(
                    f"layer {layer} expert {e}: {t['gen_share'][1]:.0%} of its picks are now "
                    f"generation tokens (was {t['gen_share'][0]:.0%}), mostly {now}; it used to "
                    f"take {was}")
    if not per:
        return CheckResult(kind=KIND)
    # A warning: it names the tokens behind a takeover; how much it costs is the count-level
    # findings' verdict (modality_dominance, routing_collapse), which carry the severity.
    finding = Finding(
        kind=KIND, severity="warning", run=run.run_dir, layers=tuple(per),
        modality=tr.modalities[gen[0]], onset_step=last,
        evidence={"first_step": first, "last_step": last, "takeover_share": cfg.takeover_share,
                  "taken_over": n_taken, "und_experts_first": n_und, "per_layer": per},
        explanation=(f"Between steps {first} and {last} of the probe set, generation tokens took "
                     f"over {n_taken} of {n_und} understanding experts. "
                     + "; ".join(sentences[:SHOWN])
                     + (f"; and {len(sentences) - SHOWN} more (evidence)" if len(sentences) > SHOWN
                        else "") + "."))
    return CheckResult(kind=KIND, findings=(finding,))
