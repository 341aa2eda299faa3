"""Overlay of several runs (data path + figures): the paper's Fig. 5a (capacity rate per
modality), 5b (generation loss) and 6 (isolated shared-expert probe) for any set of runs."""

from __future__ import annotations

import warnings

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import data
from dashboards.components import (
    SUBPLOTS_LEGEND_BELOW, SUBPLOT_BUCKETS, TEMPLATE, add_line, line_figure, message_figure,
)

_RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
               "#7f7f7f")


def _color(i):
    return _RUN_COLORS[i % len(_RUN_COLORS)]


def capacity_by_modality(root, run_ids, xrange=None) -> go.Figure:
    """Fig. 5a: capacity rate averaged over layers, one panel per modality, one line per run."""
    if not run_ids:
        return message_figure("pick runs to compare on the Runs page", "capacity rate")
    mods = []  # union over the runs, in store order (HF scans have text/text_b)
    for rid in run_ids:
        mods += [m for m in data.run_meta(root, rid)["modalities"] if m not in mods]
    fig = make_subplots(rows=1, cols=max(1, len(mods)), subplot_titles=mods, shared_yaxes=True,
                        horizontal_spacing=0.04)
    for i, rid in enumerate(run_ids):
        has = data.run_meta(root, rid)["modalities"]
        for j, m in enumerate(mods, start=1):
            if m not in has:
                continue
            s = data.read_slice(root, rid, "routing", "capacity_rate", modality=m,
                                step_range=xrange)
            if s is None:
                continue
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no vae tokens
                mean = np.nanmean(s.values, axis=1, dtype=np.float64) if s.values.size else s.values
            add_line(fig, s.steps, mean, rid, color=_color(i), row=1, col=j,
                     showlegend=(j == 1), legendgroup=rid, target=SUBPLOT_BUCKETS)
    fig.update_layout(template=TEMPLATE, height=350, **SUBPLOTS_LEGEND_BELOW,
                      title="capacity rate per modality (mean over layers) — Fig. 5a",
                      uirevision="cmp/cap")
    fig.update_xaxes(matches="x")  # one zoom for the three panels (and one re-bucketing)
    return fig


def loss_term(root, run_ids, term="gen", xrange=None, title=None) -> go.Figure:
    """Fig. 5b: a loss term (default the flow-matching generation loss) per run."""
    if not run_ids:
        return message_figure("pick runs to compare on the Runs page", f"{term} loss")
    fig = line_figure(title or f"{term} loss — Fig. 5b", ylabel=f"{term} loss",
                      uirevision="cmp/loss")
    for i, rid in enumerate(run_ids):
        s = data.read_slice(root, rid, "loss", "value", term=term, step_range=xrange)
        if s is not None:
            add_line(fig, s.steps, s.values, rid, color=_color(i))
    return fig


def isolated_metric(root, run_ids, metric=None) -> go.Figure:
    """Fig. 6: the isolated shared-expert metric per run (routed experts masked)."""
    if not run_ids:
        return message_figure("pick runs to compare on the Runs page", "shared-expert probe")
    fig = line_figure(f"isolated shared experts — {metric or '?'} (Fig. 6)",
                      ylabel=str(metric or ""))
    for i, rid in enumerate(run_ids):
        ds = data.group_dataset(root, rid, "probe")
        if ds is None or metric not in [str(v) for v in ds["metric"].values]:
            continue
        s = data.read_slice(root, rid, "probe", "isolated", metric=metric)
        add_line(fig, s.steps, s.values, rid, color=_color(i), mode="lines+markers")
    return fig


def isolated_metrics(root, run_ids) -> list[str]:
    out = []
    for rid in run_ids:
        try:
            ds = data.group_dataset(root, rid, "probe")
        except data.DataError:
            continue
        if ds is not None:
            out += [str(v) for v in ds["metric"].values]
    return list(dict.fromkeys(out))
