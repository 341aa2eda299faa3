"""Overlay of several runs (data path + figures): the paper's Fig. 5a (capacity rate per
modality), 5b (generation loss) and 6 (isolated shared-expert probe) for any set of runs, and
the runs grouped by config without the seed as mean ± 95% CI bands over seeds."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import data
from dashboards.bucketing import mean_columns
from dashboards.components import (
    SUBPLOTS_LEGEND_BELOW, SUBPLOT_BUCKETS, TEMPLATE, add_bucket_line, add_line, bucket_note,
    line_figure, message_figure,
)
from moe_probe import stats

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
    got = [(i, rid, data.read_buckets(root, rid, "loss", "value", term=term, step_range=xrange))
           for i, rid in enumerate(run_ids)]
    got = [g for g in got if g[2] is not None]
    # one note when the runs agree
    notes = {bucket_note(b, "min & max", steps=True) for _, _, b in got}
    fig = line_figure(title or f"{term} loss — Fig. 5b", ylabel=f"{term} loss",
                      uirevision="cmp/loss", note=notes.pop() if len(notes) == 1 else
                      "min & max per bucket" if notes else "")
    for i, rid, b in got:
        add_bucket_line(fig, b, (), rid, color=_color(i))
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


BAND_SERIES = {
    **{f"capacity rate · {m}": ("routing", "capacity_rate", {"modality": m}) for m in
       ("text", "vit", "vae")},
    **{f"loss · {t}": ("loss", "value", {"term": t}) for t in ("gen", "lm", "mmu", "total")},
}
"""What the seed bands can show: label → (group, variable, labels); other dims are averaged."""


def seed_groups(root, run_ids) -> list[dict]:
    """The runs grouped by config without the seed (moe_probe.compare's grouping):
    ``[{name, runs: [run ids]}]``."""
    from moe_probe.compare import group_by_config

    ids = {data.resolve_run(root, rid): rid for rid in run_ids}
    return [{"name": g["name"], "runs": [ids[p] for p in g["runs"]]}
            for g in group_by_config(list(ids))]


def band_rows(root, run_ids, series: str, xrange=None, target: int = SUBPLOT_BUCKETS * 2):
    """(steps, values (run, step)) of one group on the steps every run has (bucket means
    when the steps are more than ``target``); None when no run has rows."""
    group, var, sel = BAND_SERIES[series]
    per_run = []
    for rid in run_ids:
        s = data.read_slice(root, rid, group, var, step_range=xrange, **sel)
        if s is None or not len(s.steps):
            continue
        v = s.values.reshape(len(s.steps), -1).astype(np.float64)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no vae tokens
            per_run.append((s.steps, np.nanmean(v, axis=1)))
    if not per_run:
        return None
    steps = functools.reduce(np.intersect1d, [st for st, _ in per_run])
    rows = np.stack([v[np.searchsorted(st, steps)] for st, v in per_run])
    bsteps, cols, _ = mean_columns(steps, rows.T, target)
    return bsteps, cols.T


def seed_bands(root, run_ids, series="capacity rate · text", xrange=None) -> go.Figure:
    """Mean ± 95% t interval over seeds per step, one band per config group of the runs."""
    title = f"{series}: mean ± 95% CI over seeds, per config"
    if not run_ids:
        return message_figure("pick runs to compare on the Runs page", title)
    if series not in BAND_SERIES:
        return message_figure(f"unknown series {series!r}", title)
    fig = line_figure(title, ylabel=series, uirevision="cmp/bands")
    for i, g in enumerate(seed_groups(root, run_ids)):
        got = band_rows(root, g["runs"], series, xrange)
        if got is None:
            continue
        steps, rows = got
        n, mean, lo, hi = stats.mean_ci(rows)
        color, name = _color(i), f"{g['name']} (n={len(rows)})"
        fig.add_trace(go.Scatter(x=steps, y=hi, mode="lines", line=dict(width=0),
                                 showlegend=False, legendgroup=name, hoverinfo="skip",
                                 name=f"{name} ci_high"))
        fig.add_trace(go.Scatter(x=steps, y=lo, mode="lines", line=dict(width=0), fill="tonexty",
                                 fillcolor=_rgba(color, 0.2), showlegend=False, legendgroup=name,
                                 hoverinfo="skip", name=f"{name} ci_low"))
        fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines", name=name, legendgroup=name,
                                 line=dict(color=color, width=1.6)))
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"
