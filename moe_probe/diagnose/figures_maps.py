"""Per-run heat maps: expert load per modality over steps, gradient cosine (layer × step) per
component, co-activation at the last snapshot, router saturation."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moe_probe.diagnose.figures_common import (MAX_COLUMNS, MAX_POINTS, bucket, color, nanmean,
                                               plain, steps_list)
from moe_probe.diagnose.rundata import RunData, layer_load

MAX_COACT_LAYERS = 8
"""Co-activation panels per run (evenly spaced layers beyond this)."""
MAX_LOAD_ROWS = 512
"""(layer, expert) rows of the load heat map; beyond this, evenly spaced layers are shown (a
32-layer × 64-expert model would otherwise put 2048 × 80 cells per modality into the page)."""


def _spread(items: list, n: int) -> list:
    """At most n items, evenly spaced, first and last kept."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def load_figure(run: RunData) -> go.Figure | None:
    """Share of each modality's assignments per (layer, expert) row over bucketed steps: a
    modality sliding onto other experts, or experts going dark, shows as moving bands."""
    ds = run.get("routing")
    if ds is None or "load" not in ds:
        return None
    mods = [str(m) for m in ds["modality"].values]
    all_layers = [str(x) for x in ds["layer"].values]
    experts = [str(e) for e in ds["expert"].values]
    layers = _spread(all_layers, max(1, MAX_LOAD_ROWS // len(experts)))
    rows = [f"L{l}·E{e}" for l in layers for e in experts]
    fig = make_subplots(rows=1, cols=len(mods), subplot_titles=mods, shared_yaxes=True,
                        horizontal_spacing=0.03)
    # One layer in memory at a time (a 50k-step, 64-expert `load` is ~1 GB), bucketed at once.
    per_layer = []
    for layer in layers:
        x = layer_load(ds, all_layers.index(layer)).values.astype(float)  # (S, M, E)
        tot = x.sum(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(tot > 0, x / tot, np.nan)
        steps, sb = bucket(ds["step"].values, share, MAX_COLUMNS)
        per_layer.append(sb)  # (S', M, E)
    all_SMLE = np.stack(per_layer, axis=2)
    for mi, m in enumerate(mods):
        sb = all_SMLE[:, mi].reshape(all_SMLE.shape[0], -1)
        fig.add_trace(go.Heatmap(x=steps_list(steps), y=rows, z=plain(sb.T, 3), zmin=0,
                                 coloraxis="coloraxis", name=m,
                                 hovertemplate="step %{x}<br>%{y}<br>share %{z:.3f}"
                                               "<extra>" + m + "</extra>"), row=1, col=mi + 1)
    shown = "" if layers == all_layers else f" (layers {', '.join(layers)} of {len(all_layers)})"
    fig.update_layout(title=f"{run.name}: expert load share per modality{shown}",
                      coloraxis={"colorscale": "Viridis", "colorbar": {"title": "share"}},
                      height=max(300, min(900, 12 * len(rows) + 120)))
    fig.update_yaxes(autorange="reversed")  # layer 0, expert 0 at the top, like a table
    fig.update_xaxes(title_text="step")
    return fig


def cosine_figure(run: RunData) -> go.Figure | None:
    """cos(∇und, ∇gen) as layer × step per component; red = conflict (< 0)."""
    ds = run.get("grad")
    if ds is None or "cosine" not in ds:
        return None
    cos = ds["cosine"].transpose("step", "component", "layer")
    comps = [str(c) for ci, c in enumerate(cos["component"].values)
             if np.isfinite(cos.values[:, ci]).any()]
    if not comps:
        return None
    layers = [str(x) for x in cos["layer"].values]
    fig = make_subplots(rows=1, cols=len(comps), subplot_titles=comps, shared_yaxes=True,
                        horizontal_spacing=0.03)
    for ci, c in enumerate(comps):
        z = cos.sel(component=c).values.astype(float)
        steps, zb = bucket(ds["step"].values, z, MAX_COLUMNS)
        fig.add_trace(go.Heatmap(x=steps_list(steps), y=layers, z=plain(zb.T, 3), zmin=-1,
                                 zmax=1, coloraxis="coloraxis",
                                 hovertemplate="step %{x}<br>layer %{y}<br>cos %{z:.3f}"
                                               "<extra>" + c + "</extra>"), row=1, col=ci + 1)
    fig.update_layout(title=f"{run.name}: gradient cosine und vs gen (per component)",
                      coloraxis={"colorscale": "RdBu", "cmin": -1, "cmax": 1,
                                 "colorbar": {"title": "cos"}},
                      height=max(260, 24 * len(layers) + 140))
    fig.update_xaxes(title_text="step")
    return fig


def ratio_figure(run: RunData) -> go.Figure | None:
    """norm_gen / norm_und over steps per component, mean over layers (log scale)."""
    ds = run.get("grad")
    if ds is None or "norm_gen" not in ds:
        return None
    fig = go.Figure()
    for ci, c in enumerate(ds["component"].values):
        nu = ds["norm_und"].sel(component=c).transpose("step", "layer").values.astype(float)
        ng = ds["norm_gen"].sel(component=c).transpose("step", "layer").values.astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(nu > 0, ng / nu, np.nan)
        r[~np.isfinite(r) | (r <= 0)] = np.nan
        if not np.isfinite(r).any():
            continue
        steps, rb = bucket(ds["step"].values, np.exp(nanmean(np.log(r), 1)), MAX_POINTS)
        fig.add_trace(go.Scatter(x=steps_list(steps), y=plain(rb), mode="lines", name=str(c),
                                 line={"color": color(ci)}))
    if not fig.data:
        return None
    fig.update_yaxes(type="log", title_text="norm_gen / norm_und")
    fig.update_layout(title=f"{run.name}: gradient norm ratio gen/und (geometric mean over layers)",
                      height=320)
    return fig


def snapshot_figure(run: RunData) -> go.Figure | None:
    """Router saturation per layer over eval steps, and P(e'|e) at the last snapshot."""
    ds = run.get("snapshot")
    if ds is None:
        return None
    layers = [str(x) for x in ds["layer"].values]
    show = _spread(layers, MAX_COACT_LAYERS)
    has_co = "coactivation" in ds
    cols = 1 + (len(show) if has_co else 0)
    fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.04,
                        subplot_titles=["saturation"] + [f"co-activation L{l}" for l in show]
                        if has_co else ["saturation"])
    steps = steps_list(ds["step"].values)
    if "saturation" in ds:
        for li, l in enumerate(layers):
            fig.add_trace(go.Scatter(x=steps, y=plain(ds["saturation"].sel(layer=l).values),
                                     mode="lines+markers", name=f"layer {l}",
                                     line={"color": color(li)}), row=1, col=1)
    if has_co:
        last = ds["coactivation"].isel(step=-1)
        for i, l in enumerate(show):
            z = last.sel(layer=l).transpose("expert", "expert2")
            fig.add_trace(go.Heatmap(z=plain(z.values, 3), x=[str(e) for e in z["expert2"].values],
                                     y=[str(e) for e in z["expert"].values],
                                     coloraxis="coloraxis",
                                     hovertemplate="P(%{x} | %{y}) = %{z:.3f}<extra>layer " + l
                                                   + "</extra>"), row=1, col=i + 2)
        fig.update_layout(coloraxis={"colorscale": "Blues", "colorbar": {"title": "P(e'|e)"}})
    fig.update_layout(title=f"{run.name}: router saturation and co-activation "
                            f"(step {steps[-1]})", height=380,
                      legend={"orientation": "h", "y": -0.25})  # clear of the colour bar
    return fig
