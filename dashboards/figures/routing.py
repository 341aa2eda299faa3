"""Routing views of one run (data path + figure building, no Dash): what the Routing page draws.

Each function reads only the slice it plots (one layer and/or modality, the visible step range);
the views over steps read it as buckets (`data.read_buckets`: rollup windows where the zoom allows,
rows otherwise), so what they read is in proportion to the graph's width, not to the run's length.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import data
from dashboards.components import (
    HALF_BUCKETS, LEGEND_BELOW, MODALITY_COLORS, SUBPLOTS_LEGEND_BELOW, SUBPLOT_BUCKETS,
    TEMPLATE, add_bucket_line, add_line, bucket_heatmap, bucket_note, heatmap, with_note,
    label_axis, line_figure, message_figure,
)


def capacity_lines(root, run_id, layer, xrange=None) -> go.Figure:
    """Capacity rate of each modality at one layer over steps (min/max per bucket)."""
    # One read of the layer's (step, modality) block: a chunk holds every modality anyway.
    b = data.read_buckets(root, run_id, "routing", "capacity_rate", layer=layer,
                          step_range=xrange, target=HALF_BUCKETS)
    if b is None:
        return message_figure("no routing rows committed yet", "capacity rate")
    fig = line_figure(f"{run_id} · capacity rate per modality — layer {layer}",
                      ylabel="capacity rate", uirevision=f"{run_id}/cap",
                      note=bucket_note(b, "min & max", steps=True))
    for j, m in enumerate(b.coords["modality"]):
        add_bucket_line(fig, b, j, m, color=MODALITY_COLORS.get(m))
    if xrange:
        fig.update_xaxes(range=list(xrange))
    return fig


def capacity_heatmap(root, run_id, modality, xrange=None) -> go.Figure:
    """Capacity rate, layer × step, for one modality: where in depth the collapse starts."""
    b = data.read_buckets(root, run_id, "routing", "capacity_rate", modality=modality,
                          step_range=xrange, target=HALF_BUCKETS)  # half-width graph
    if b is None or len(b.step) == 0:
        return message_figure("no routing rows committed yet", "capacity rate by layer")
    return bucket_heatmap(b, b.mean, b.coords["layer"],
                          title=f"{run_id} · capacity rate by layer — {modality}", ylabel="layer",
                          colorscale="RdYlGn", zmin=0.0, zmax=1.0, uirevision=f"{run_id}/caph")


def load_heatmap(root, run_id, layer, modality, xrange=None) -> go.Figure:
    """Share of the modality's assignments going to each expert, expert × step.

    Shares (not raw counts) so batches of different sizes compare; a collapsing router shows as
    one bright band, a blurry uniform one as flat colour. A column of several rows is the share
    of the bucket's assignments (Σ load_e / Σ load over its rows): the same from rows and from
    rollup windows (which hold the sums), so the picture does not change with the zoom's level.
    A step without tokens (0/0) is NaN, a gap."""
    b = data.read_buckets(root, run_id, "routing", "load", layer=layer, modality=modality,
                          step_range=xrange)
    if b is None or len(b.step) == 0:
        return message_figure("no routing rows committed yet", "expert load")
    share = b.sum.astype(np.float64)  # a copy (the buckets are cached): divided in place
    with np.errstate(invalid="ignore"):
        share /= share.sum(axis=1, keepdims=True)
    return bucket_heatmap(b, share, b.coords["expert"],
                          title=f"{run_id} · expert load share — layer {layer}, {modality}",
                          ylabel="expert", colorscale="Viridis", uirevision=f"{run_id}/load",
                          what="share of the assignments")


def modality_share(root, run_id, layer, step) -> go.Figure:
    """At one step: for each expert, the fraction of its assignments from each modality."""
    st = data.nearest_step(root, run_id, "routing", step)
    if st is None:
        return message_figure("no routing rows committed yet", "modality share per expert")
    s = data.read_slice(root, run_id, "routing", "load", layer=layer, step_range=(st, st))
    load_ME = s.values[0].astype(np.float64)
    tot_E = load_ME.sum(axis=0)
    fig = go.Figure()
    experts = s.coords["expert"]
    for i, m in enumerate(s.coords["modality"]):
        share = np.divide(load_ME[i], tot_E, out=np.zeros_like(tot_E), where=tot_E > 0)
        fig.add_trace(go.Bar(x=experts, y=share, name=m, marker_color=MODALITY_COLORS.get(m)))
    fig.update_layout(template=TEMPLATE, barmode="stack", height=300, **LEGEND_BELOW,
                      title=f"{run_id} · modality share per expert — layer {layer}, step {st}",
                      xaxis_title="expert", yaxis_title="share of assignments",
                      xaxis_type="category")
    return fig


BALANCE_VARS = ("entropy", "maxvio", "dead_frac", "load_cv")


def balance_lines(root, run_id, layer, xrange=None) -> go.Figure:
    """Each BALANCE_VARS metric per modality at one layer; "not measured" where a run (e.g. one
    written before the metric existed) lacks it."""
    fig = make_subplots(rows=1, cols=len(BALANCE_VARS), subplot_titles=BALANCE_VARS,
                        horizontal_spacing=0.07)
    note = ""
    for j, var in enumerate(BALANCE_VARS, start=1):
        try:
            b = data.read_buckets(root, run_id, "routing", var, layer=layer, step_range=xrange,
                                  target=SUBPLOT_BUCKETS)
        except data.NotMeasured:
            fig.add_annotation(text="not measured", showarrow=False, font=dict(color="#a33"),
                               xref=f"x{j if j > 1 else ''} domain",
                               yref=f"y{j if j > 1 else ''} domain", x=0.5, y=0.5)
            continue
        if b is None:
            return message_figure("no routing rows committed yet", "balance")
        note = bucket_note(b, "min & max", steps=True)
        for i, m in enumerate(b.coords["modality"]):
            add_bucket_line(fig, b, i, m, color=MODALITY_COLORS.get(m), row=1, col=j,
                            showlegend=(j == 1), legendgroup=m)
    fig.update_layout(template=TEMPLATE, height=330, **SUBPLOTS_LEGEND_BELOW,
                      title=with_note(f"{run_id} · balance — layer {layer}", note),
                      uirevision=f"{run_id}/bal")
    fig.update_xaxes(matches="x")
    return fig


def saturation_line(root, run_id, layer) -> go.Figure:
    """Router saturation vs the previous snapshot at each eval step (OLMoE)."""
    s = data.read_slice(root, run_id, "snapshot", "saturation", layer=layer)
    if s is None:
        return message_figure("no snapshot rows committed yet", "router saturation")
    fig = line_figure(f"{run_id} · router saturation — layer {layer}", ylabel="saturation", height=300)
    add_line(fig, s.steps, s.values, f"layer {layer}", color="#444", mode="lines+markers")
    fig.update_yaxes(range=[0, 1.02])
    return fig


def coactivation_heatmap(root, run_id, layer, step) -> go.Figure:
    """P(e' | e) at the snapshot step nearest the slider."""
    st = data.nearest_step(root, run_id, "snapshot", step)
    if st is None:
        return message_figure("no snapshot rows committed yet", "co-activation")
    s = data.read_slice(root, run_id, "snapshot", "coactivation", layer=layer, step_range=(st, st))
    z = s.values[0]
    x, x_axis = label_axis(s.coords["expert2"])
    fig = heatmap(z, x, s.coords["expert"],
                  title=f"{run_id} · co-activation P(e′|e) — layer {layer}, step {st}",
                  xlabel="expert e′", ylabel="expert e", colorscale="Blues", zmin=0, zmax=1)
    fig.update_xaxes(**x_axis)
    fig.update_layout(height=380)
    return fig
