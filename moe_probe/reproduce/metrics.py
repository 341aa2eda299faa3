"""The table's metrics: one number per run, each read from the run's ``traces.zarr``.

A metric is a *source* (group, variable, label selection) plus a named *reduction*. Both are
written into results.json next to every value, so anyone (the tests do) can re-open the store,
apply the same selection and reduction, and get the same number. Reductions are deliberately
few and plain numpy; every one first averages over all non-``step`` dims (layers, tasks) with
NaN ignored, giving one value per recorded step ``v[s]``, then:

- ``tail_mean``: mean of the last ``window`` rows of ``v`` (a per-step quantity such as the
  capacity rate is one batch's worth; a short tail window is the "final" value without the
  noise of a single batch).
- ``min_window_mean``: minimum over steps of the ``window``-row running mean (the lowest the
  metric fell, by the same smoothing).
- ``last``: ``v`` at the last recorded row (eval and probe rows: one per evaluation).
- ``change``: ``v[last] - v[first]`` (start → end of stage 2).
- ``max`` / ``min``: extreme over the recorded rows (worst understanding during training).
- ``mean``: mean over every recorded row (the gradient tracer samples every K steps).

Reader code only (no torch): :mod:`moe_probe.store.reader`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

REDUCTIONS = ("tail_mean", "min_window_mean", "last", "change", "max", "min", "mean")

WINDOW_FRACTION = 0.05
"""Window of ``tail_mean`` / ``min_window_mean`` as a share of the routing rows (≥ 1 row)."""


@dataclass(frozen=True, kw_only=True)
class Metric:
    """One column of the results table."""

    key: str
    """Column id (CSV/JSON)."""
    label: str
    """Column header in the Markdown table."""
    group: str
    """Store group it is read from."""
    var: str
    """Variable of that group."""
    sel: dict = field(default_factory=dict)
    """Label selection (``xarray .sel``; lists keep the dim and are averaged over)."""
    reduce: str = "last"
    """One of :data:`REDUCTIONS`."""
    better: str = "high"
    """``high`` or ``low``: which direction is better (for the legend only)."""
    section: str = ""
    """Markdown sub-table it is shown in."""


UND_TASKS = ["vit_digit", "text_topic"]
"""Probe tasks about understanding (``vae_digit`` reads generation tokens)."""

_ROUTE, _TASK, _SHARED = "routing", "tasks", "shared experts"

METRICS: tuple[Metric, ...] = (
    *(Metric(key=f"cap_final_{m}", label=f"cap final {m}", group="routing", var="capacity_rate",
             sel={"modality": m}, reduce="tail_mean", section=_ROUTE)
      for m in ("text", "vit", "vae")),
    *(Metric(key=f"cap_min_{m}", label=f"cap min {m}", group="routing", var="capacity_rate",
             sel={"modality": m}, reduce="min_window_mean", section=_ROUTE)
      for m in ("text", "vit", "vae")),
    Metric(key="gen_loss", label="gen (flow) loss", group="eval", var="value",
           sel={"metric": "flow_loss"}, reduce="last", better="low", section=_TASK),
    Metric(key="gen_acc", label="gen digit correct", group="eval", var="value",
           sel={"metric": "gen_acc"}, reduce="last", section=_TASK),
    Metric(key="text_loss", label="text held-out loss", group="eval", var="value",
           sel={"metric": "text_loss"}, reduce="last", better="low", section=_TASK),
    Metric(key="digit_acc", label="digit recognition", group="eval", var="value",
           sel={"metric": "digit_acc"}, reduce="last", section=_TASK),
    Metric(key="text_loss_worst", label="text loss worst", group="eval", var="value",
           sel={"metric": "text_loss"}, reduce="max", better="low", section=_TASK),
    Metric(key="digit_acc_worst", label="digit acc worst", group="eval", var="value",
           sel={"metric": "digit_acc"}, reduce="min", section=_TASK),
    Metric(key="iso_text_loss", label="isolated text loss", group="probe", var="isolated",
           sel={"metric": "text_loss"}, reduce="last", better="low", section=_SHARED),
    Metric(key="iso_text_loss_change", label="Δ isolated text loss", group="probe",
           var="isolated", sel={"metric": "text_loss"}, reduce="change", better="low",
           section=_SHARED),
    Metric(key="iso_digit_acc", label="isolated digit acc", group="probe", var="isolated",
           sel={"metric": "digit_acc"}, reduce="last", section=_SHARED),
    Metric(key="iso_digit_acc_change", label="Δ isolated digit acc", group="probe",
           var="isolated", sel={"metric": "digit_acc"}, reduce="change", section=_SHARED),
    Metric(key="selectivity", label="probe selectivity", group="probe", var="selectivity",
           sel={"task": UND_TASKS}, reduce="last", section=_SHARED),
    Metric(key="selectivity_change", label="Δ probe selectivity", group="probe",
           var="selectivity", sel={"task": UND_TASKS}, reduce="change", section=_SHARED),
    Metric(key="shared_cos", label="gen/und cos (shared)", group="grad", var="cosine",
           sel={"component": "shared", "layer": "__layers__"}, reduce="mean", better="high",
           section=_SHARED),
)
"""``"__layers__"`` = the model's layers (the ``grad`` group's ``layer`` also holds ``all``)."""

BY_KEY = {m.key: m for m in METRICS}


def window_rows(n_rows: int) -> int:
    return max(1, int(round(WINDOW_FRACTION * n_rows)))


def per_step(da) -> np.ndarray:
    """``v[s]``: NaN-mean over every dim but ``step`` (NaN where a step has no finite value)."""
    arr = np.asarray(da.transpose("step", ...).values, dtype=float).reshape(da.sizes["step"], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
        return np.nanmean(arr, axis=1)


def reduce(v: np.ndarray, how: str, window: int = 1) -> float:
    """Apply reduction ``how`` to the per-step series ``v`` (NaN when nothing is finite)."""
    v = np.asarray(v, dtype=float)
    finite = np.isfinite(v)
    if not finite.any():
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if how == "tail_mean":
            return float(np.nanmean(v[-window:]))
        if how == "min_window_mean":
            means = [np.nanmean(v[max(0, s - window + 1): s + 1]) for s in range(window - 1, len(v))]
            return float(np.nanmin(means))
        if how == "last":
            return float(v[-1])
        if how == "change":
            return float(v[-1] - v[0])
        if how == "max":
            return float(np.nanmax(v))
        if how == "min":
            return float(np.nanmin(v))
        if how == "mean":
            return float(np.nanmean(v))
    raise ValueError(f"unknown reduction {how!r}")


def resolve_sel(store, metric: Metric) -> dict:
    """The selection with placeholders filled from the store (JSON-able, as recorded)."""
    sel = {}
    for dim, labels in metric.sel.items():
        if labels == "__layers__":
            labels = [str(x) for x in store.attrs.get("model", {}).get("layers", [])]
        sel[dim] = labels
    return sel


def measure(store, run: str, metric: Metric, datasets: dict | None = None) -> tuple[float, dict]:
    """(value, source) of ``metric`` on one opened run; value NaN where the run lacks it.

    ``datasets`` caches ``store.dataset(group)`` across the metrics of one run (opening a
    group re-reads its metadata; the table reads ~20 metrics from 5 groups)."""
    sel = resolve_sel(store, metric)
    source = {"run": run, "group": metric.group, "var": metric.var, "sel": sel,
              "reduce": metric.reduce}
    if metric.group not in store.groups or store.committed_steps(metric.group) == 0:
        return math.nan, {**source, "window": 1}
    datasets = {} if datasets is None else datasets
    if metric.group not in datasets:
        datasets[metric.group] = store.dataset(metric.group)
    da = datasets[metric.group][metric.var].sel(**sel).load()
    v = per_step(da)
    window = window_rows(len(v)) if metric.reduce in ("tail_mean", "min_window_mean") else 1
    return reduce(v, metric.reduce, window), {**source, "window": window}
