"""Probe views (data path + figures): linear-probe accuracy/selectivity per layer, and the
isolated shared-expert evaluation with an understanding-only control run overlaid (paper Fig. 6)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import data
from dashboards.components import (
    RUN_DASHES, SUBPLOTS_LEGEND_BELOW, TEMPLATE, add_line, line_figure, message_figure,
)

_LAYER_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf")


def labels(root, run_id, dim: str) -> list[str]:
    ds = data.group_dataset(root, run_id, "probe")
    return [] if ds is None or dim not in ds.coords else [str(v) for v in ds[dim].values]


def probe_lines(root, run_id, task) -> go.Figure:
    """Accuracy and selectivity (accuracy − control accuracy) of each layer's probe over steps."""
    layers = labels(root, run_id, "layer")
    if not layers:
        return message_figure("no probe rows committed yet", "probes")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "selectivity"),
                        horizontal_spacing=0.08)
    for i, layer in enumerate(layers):
        color = _LAYER_COLORS[i % len(_LAYER_COLORS)]
        for j, var in enumerate(("accuracy", "selectivity"), start=1):
            s = data.read_slice(root, run_id, "probe", var, layer=layer, task=task)
            add_line(fig, s.steps, s.values, f"layer {layer}", color=color, row=1, col=j,
                     mode="lines+markers", showlegend=(j == 1), legendgroup=f"layer {layer}")
    fig.update_layout(template=TEMPLATE, height=350, **SUBPLOTS_LEGEND_BELOW,
                      title=f"{run_id} · shared-expert probes — task {task}")
    return fig


def isolated_lines(root, run_id, control_id=None) -> go.Figure:
    """Understanding metrics with routed experts masked; a control run drawn dashed beside it."""
    fig = line_figure(f"{run_id} · isolated shared-expert eval", ylabel="metric")
    any_rows = False
    for k, rid in enumerate([run_id] + ([control_id] if control_id and control_id != run_id else [])):
        for metric in labels(root, rid, "metric"):
            s = data.read_slice(root, rid, "probe", "isolated", metric=metric)
            if s is None:
                continue
            any_rows = True
            add_line(fig, s.steps, s.values, f"{rid} · {metric}", dash=RUN_DASHES[k],
                     mode="lines+markers")
    if not any_rows:
        return message_figure("no probe rows committed yet", "isolated shared-expert eval")
    return fig
