"""The bounded per-step summary of a run, for the tools researchers already watch (TensorBoard,
W&B, MLflow). numpy only, no torch, no store: the exporter (``moe_probe.export``) feeds it whole
histories read from a store, and a live exporter can feed it one step's rows
(:func:`step_summary`).

Per-expert logging explodes in those tools (48 layers × 128 experts is ~6,000 series), so the
summary reduces over layers and experts: its keys depend on the run's token kinds (M) and loss
terms, never on its layers or experts. moe_probe's own runs (3 kinds, 6 loss terms) get 21 keys.

=================================  ==========================================================
key                                value at a step
=================================  ==========================================================
``moe/capacity_rate_mean/<kind>``  capacity rate of that kind, mean over layers (one key per kind)
``moe/capacity_rate_min/<kind>``   ... its minimum over layers: the collapsing layer
``moe/maxvio_p50``                 MaxVio per layer (the worst kind of that layer), median over
                                   layers
``moe/maxvio_p90``                 ... its 90th percentile over layers
``moe/maxvio_max``                 ... its maximum over layers
``moe/load_cv_mean``               coefficient of variation of expert load, mean over
                                   (layer, kind); from the store's ``load_cv`` when measured,
                                   else computed from ``load`` (``metrics.load_cv``)
``moe/dead_frac_mean``             fraction of dead experts, mean over (layer, kind)
``moe/entropy_mean``               normalised routing entropy, mean over (layer, kind)
``moe/shared_grad_cosine``         cos(∇L_und, ∇L_gen) on the shared experts: the ``grad``
                                   group's layer ``all`` (the whole model's shared-expert
                                   parameters as one vector) where present, else the mean over
                                   layers; only where gradients are traced (every Nth step)
``moe/loss/<term>``                each loss term of the ``loss`` group (one key per term)
``moe/findings_active``            diagnose findings active at the step (onset ≤ step)
``moe/findings_worst_severity``    worst severity among them: 0 none, 1 info, 2 warning,
                                   3 critical
=================================  ==========================================================

Means, percentiles, minima and maxima skip NaN cells (a kind with no tokens at a step or layer).
A key whose value is NaN at a step has no value there (tools get only finite numbers). Kind and
term labels are sanitised for the tools' key rules (:func:`safe_label`).

"Active at step s": the whole run is diagnosed once (``moe_probe.diagnose``) and each finding
counts from its ``onset_step`` on; a finding without an onset (its evidence is the whole run)
counts from the last step. This is hindsight: a step before the diagnosis was run may show a
finding that a live diagnosis at that step would not yet have confirmed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "PREFIX", "SEVERITY_LEVEL", "summary_keys", "safe_label", "routing_summary", "loss_summary",
    "grad_summary", "findings_summary", "step_summary", "nanpercentile_rows",
]

PREFIX = "moe/"
"""Every key starts with it: one section in each tool, apart from the user's own keys."""

SEVERITY_LEVEL: dict[str, int] = {"info": 1, "warning": 2, "critical": 3}
"""``moe/findings_worst_severity`` values (0 = no active finding); the order of
``moe_probe.diagnose.findings.SEVERITIES``."""

ROUTING_VARS = ("capacity_rate", "maxvio", "load_cv", "dead_frac", "entropy")
"""The ``routing`` arrays the summary reads, each (step, layer, modality)."""

SHARED = "shared"
ALL_LAYERS = "all"


def safe_label(label: str) -> str:
    """A kind or loss-term label as a key part: characters outside ``[A-Za-z0-9_.-]`` become ``_``
    (MLflow's metric-name rule is the strictest of the three tools)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(label)) or "_"


def summary_keys(modalities: Sequence[str], loss_terms: Sequence[str], *,
                 shared_grad: bool = True) -> list[str]:
    """Every key of a run's summary, in order: the count depends on its kinds and loss terms
    only (``shared_grad``: whether the run traces gradients of shared experts)."""
    kinds = [safe_label(m) for m in modalities]
    return [*(f"{PREFIX}capacity_rate_{r}/{m}" for r in ("mean", "min") for m in kinds),
            f"{PREFIX}maxvio_p50", f"{PREFIX}maxvio_p90", f"{PREFIX}maxvio_max",
            f"{PREFIX}load_cv_mean", f"{PREFIX}dead_frac_mean", f"{PREFIX}entropy_mean",
            *([f"{PREFIX}shared_grad_cosine"] if shared_grad else []),
            *(f"{PREFIX}loss/{safe_label(t)}" for t in loss_terms),
            f"{PREFIX}findings_active", f"{PREFIX}findings_worst_severity"]


def routing_summary(modalities: Sequence[str], **routing) -> dict[str, np.ndarray]:
    """The routing keys, each (S,), from the :data:`ROUTING_VARS` arrays, each (S, L, M)."""
    missing = [v for v in ROUTING_VARS if v not in routing]
    if missing:
        raise ValueError(f"routing summary needs {missing}")
    x = {v: np.asarray(routing[v], dtype=np.float64) for v in ROUTING_VARS}
    S = x["capacity_rate"].shape[0]
    out: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():  # all-NaN slices (a kind absent everywhere) are NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        cap_SLM = x["capacity_rate"]
        for mi, m in enumerate(modalities):
            out[f"{PREFIX}capacity_rate_mean/{safe_label(m)}"] = np.nanmean(cap_SLM[:, :, mi], 1)
        for mi, m in enumerate(modalities):
            out[f"{PREFIX}capacity_rate_min/{safe_label(m)}"] = np.nanmin(cap_SLM[:, :, mi], 1)
        # A layer's MaxVio is its worst kind's: each kind is balanced over its own group, and
        # the kind that piles onto few experts is the one that drops tokens.
        maxvio_SL = np.nanmax(x["maxvio"], 2)
        out[f"{PREFIX}maxvio_p50"] = nanpercentile_rows(maxvio_SL, 50)
        out[f"{PREFIX}maxvio_p90"] = nanpercentile_rows(maxvio_SL, 90)
        out[f"{PREFIX}maxvio_max"] = np.nanmax(maxvio_SL, 1)
        for v in ("load_cv", "dead_frac", "entropy"):
            out[f"{PREFIX}{v}_mean"] = np.nanmean(x[v].reshape(S, -1), 1)
    return out


def nanpercentile_rows(x_SL, q: float) -> np.ndarray:
    """``np.nanpercentile(x_SL, q, axis=1)`` (linear interpolation) without its Python loop over
    rows, which costs seconds on a 50k-step history; NaN where a row has no value."""
    x_SL = np.sort(np.asarray(x_SL, dtype=np.float64), axis=1)  # NaN sorts last
    n_S = (~np.isnan(x_SL)).sum(1)
    pos_S = np.maximum(n_S - 1, 0) * (q / 100.0)
    lo_S = np.floor(pos_S).astype(np.int64)
    hi_S = np.minimum(lo_S + 1, np.maximum(n_S - 1, 0))
    rows = np.arange(x_SL.shape[0])
    lo, hi = x_SL[rows, lo_S], x_SL[rows, hi_S]
    out = lo + (hi - lo) * (pos_S - lo_S)
    return np.where(n_S > 0, out, np.nan)


def loss_summary(terms: Sequence[str], value_ST) -> dict[str, np.ndarray]:
    """``moe/loss/<term>`` from the ``loss`` group's ``value`` (S, T)."""
    value_ST = np.asarray(value_ST, dtype=np.float64)
    return {f"{PREFIX}loss/{safe_label(t)}": value_ST[:, i] for i, t in enumerate(terms)}


def grad_summary(layers: Sequence[str], components: Sequence[str],
                 cosine_SLC) -> dict[str, np.ndarray]:
    """``moe/shared_grad_cosine`` from the ``grad`` group's ``cosine`` (S, L, C); empty when the
    run has no ``shared`` component."""
    components, layers = [str(c) for c in components], [str(x) for x in layers]
    if SHARED not in components:
        return {}
    cos_SL = np.asarray(cosine_SLC, dtype=np.float64)[:, :, components.index(SHARED)]
    if ALL_LAYERS in layers:
        v = cos_SL[:, layers.index(ALL_LAYERS)]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            v = np.nanmean(cos_SL, 1)
    return {f"{PREFIX}shared_grad_cosine": v}


def findings_summary(findings: Iterable, steps_S, last_step: int | None = None
                     ) -> dict[str, np.ndarray]:
    """``moe/findings_active`` and ``moe/findings_worst_severity`` at each of ``steps_S``.

    ``findings``: objects with ``onset_step`` (int or None) and ``severity`` (a
    :data:`SEVERITY_LEVEL` key), e.g. ``moe_probe.diagnose.findings.Finding``. A finding without
    an onset counts from ``last_step`` (default: the last of ``steps_S``)."""
    steps_S = np.asarray(steps_S, dtype=np.int64)
    if last_step is None:
        last_step = int(steps_S.max()) if steps_S.size else 0
    active = np.zeros(steps_S.shape, dtype=np.float64)
    worst = np.zeros(steps_S.shape, dtype=np.float64)
    for f in findings:
        if f.severity not in SEVERITY_LEVEL:
            raise ValueError(f"unknown finding severity {f.severity!r}")
        onset = last_step if f.onset_step is None else int(f.onset_step)
        on = steps_S >= onset
        active += on
        worst = np.where(on, np.maximum(worst, SEVERITY_LEVEL[f.severity]), worst)
    return {f"{PREFIX}findings_active": active, f"{PREFIX}findings_worst_severity": worst}


def step_summary(*, step: int, modalities: Sequence[str] = (), routing: dict | None = None,
                 loss_terms: Sequence[str] = (), loss=None, grad_layers: Sequence[str] = (),
                 grad_components: Sequence[str] = (), grad_cosine=None,
                 findings: Iterable = ()) -> dict[str, float]:
    """One step's summary, from that step's rows as the tracers hand them to the store writer
    (no step dim): ``routing`` maps :data:`ROUTING_VARS` to (L, M) arrays, ``loss`` is (T,),
    ``grad_cosine`` (L', C). Groups not sampled at this step are None and give no keys; findings
    are those known so far (their ``onset_step`` compared with ``step``). Only finite values."""
    out: dict[str, np.ndarray] = {}
    if routing is not None:
        out.update(routing_summary(modalities, **{v: np.asarray(routing[v])[None]
                                                  for v in ROUTING_VARS if v in routing}))
    if loss is not None:
        out.update(loss_summary(loss_terms, np.asarray(loss)[None]))
    if grad_cosine is not None:
        out.update(grad_summary(grad_layers, grad_components, np.asarray(grad_cosine)[None]))
    out.update(findings_summary(findings, [step], last_step=step))
    return {k: float(v[0]) for k, v in out.items() if np.isfinite(v[0])}
