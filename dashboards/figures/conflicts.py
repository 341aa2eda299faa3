"""Gradient-conflict views of one run (data path + figures): cosine heat map and norm ratio."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from dashboards import data
from dashboards.components import add_line, bucket_heatmap, line_figure, message_figure


def components(root, run_id) -> list[str]:
    """Components with at least one finite cosine (a plain MoE has no und/gen expert split)."""
    ds = data.group_dataset(root, run_id, "grad")
    if ds is None:
        return []
    out = []
    comps = [str(c) for c in ds["component"].values]
    # One row is enough to know which components exist: absent ones are NaN everywhere.
    last = np.asarray(ds["norm_und"].isel(step=slice(-1, None)).values)[0]  # (layer, component)
    for j, c in enumerate(comps):
        if np.isfinite(last[:, j]).any():
            out.append(c)
    return out or comps


def cosine_heatmap(root, run_id, component, xrange=None) -> go.Figure:
    """cos(∇_c L_und, ∇_c L_gen), layer × step: red = the tasks pull the component apart."""
    b = data.read_buckets(root, run_id, "grad", "cosine", component=component, step_range=xrange)
    if b is None or len(b.step) == 0:
        return message_figure("no gradient rows committed yet", "gradient cosine")
    return bucket_heatmap(b, b.mean, b.coords["layer"],
                          title=f"{run_id} · gradient cosine und·gen — {component}",
                          ylabel="layer", colorscale="RdBu", zmid=0.0, zmin=-1.0, zmax=1.0,
                          uirevision=f"{run_id}/cos")


def norm_ratio(root, run_id, component, layers, xrange=None) -> go.Figure:
    """‖∇ L_gen‖ / ‖∇ L_und‖ of a component at the given layers (log axis: >1 = gen dominates)."""
    fig = line_figure(f"{run_id} · gradient norm ratio gen/und — {component}", ylabel="‖∇gen‖ / ‖∇und‖",
                      uirevision=f"{run_id}/ratio")
    und = data.read_slice(root, run_id, "grad", "norm_und", component=component, step_range=xrange)
    gen = data.read_slice(root, run_id, "grad", "norm_gen", component=component, step_range=xrange)
    if und is None or gen is None:
        return message_figure("no gradient rows committed yet", "norm ratio")
    for layer in layers:
        j = und.coords["layer"].index(str(layer))
        u = und.values[:, j].astype(np.float64)
        ratio = np.divide(gen.values[:, j].astype(np.float64), u, out=np.full_like(u, np.nan),
                          where=u > 0)
        add_line(fig, und.steps, ratio, f"layer {layer}")
    fig.update_yaxes(type="log")
    return fig
