"""Comparison curves across runs: capacity rate (Fig. 5a), losses (Fig. 5b), shared-expert
probes and isolated eval against a control (Fig. 6)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moe_probe.diagnose.figures_common import (MAX_POINTS, bucket, color, nanmean, plain,
                                               steps_list)
from moe_probe.diagnose.rundata import RunData


def capacity_figure(runs: list[RunData]) -> go.Figure | None:
    """One panel per modality, runs overlaid; the line is the mean over layers and the hover
    lists every layer's value."""
    have = [r for r in runs if (ds := r.get("routing")) is not None and "capacity_rate" in ds]
    if not have:
        return None
    mods = [str(m) for m in have[0].get("routing")["modality"].values]
    fig = make_subplots(rows=1, cols=len(mods), subplot_titles=mods, shared_yaxes=True)
    for ri, run in enumerate(have):
        ds = run.get("routing")
        cr = ds["capacity_rate"].transpose("step", "layer", "modality")
        layers = [str(x) for x in cr["layer"].values]
        for mi, m in enumerate(mods):
            if m not in cr["modality"].values:
                continue
            per_SL = cr.sel(modality=m).values.astype(float)
            if not np.isfinite(per_SL).any():
                continue  # modality absent from this run (e.g. no vae tokens in a control)
            steps, per = bucket(ds["step"].values, per_SL, MAX_POINTS)
            hover = "<br>".join(f"layer {l}: %{{customdata[{i}]:.3f}}" for i, l in
                                enumerate(layers))
            fig.add_trace(go.Scatter(
                x=steps_list(steps), y=plain(nanmean(per, 1)), customdata=plain(per),
                mode="lines", name=run.name, legendgroup=run.name, showlegend=mi == 0,
                line={"color": color(ri)},
                hovertemplate=f"{run.name} step %{{x}}<br>mean %{{y:.3f}}<br>{hover}"
                              "<extra></extra>"), row=1, col=mi + 1)
    fig.update_yaxes(title_text="capacity rate", row=1, col=1)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title="Capacity rate per token kind (mean over layers; hover: per layer)",
                      height=360)
    return fig


def loss_figure(runs: list[RunData]) -> go.Figure | None:
    """Loss terms as panels (generation loss in its own panel), runs overlaid."""
    have = [r for r in runs if r.get("loss") is not None]
    if not have:
        return None
    terms = [t for t in ("total", "lm", "mmu", "gen")
             if any(t in r.get("loss")["term"].values for r in have)]
    fig = make_subplots(rows=1, cols=len(terms), subplot_titles=[
        "gen (flow matching)" if t == "gen" else t for t in terms])
    for ri, run in enumerate(have):
        ds = run.get("loss")
        for ti, t in enumerate(terms):
            if t not in ds["term"].values:
                continue
            y = ds["value"].sel(term=t).values.astype(float)
            if not np.isfinite(y).any():
                continue
            steps, yb = bucket(ds["step"].values, y, MAX_POINTS)
            fig.add_trace(go.Scatter(
                x=steps_list(steps), y=plain(yb), mode="lines", name=run.name,
                legendgroup=run.name, showlegend=ti == 0, line={"color": color(ri)}),
                row=1, col=ti + 1)
    fig.update_xaxes(title_text="step")
    fig.update_layout(title="Training losses", height=340)
    return fig


def probe_figure(runs: list[RunData], control: RunData | None) -> go.Figure | None:
    """Isolated understanding metrics (routed experts masked) and probe selectivity (mean over
    layers) per task; the control run dashed."""
    series = [(r, False) for r in runs if r.get("probe") is not None]
    if control is not None and control.get("probe") is not None \
            and all(control is not r for r in runs):
        series.append((control, True))
    if not series:
        return None
    metrics, tasks = [], []
    for r, _ in series:
        ds = r.get("probe")
        if "isolated" in ds:
            metrics += [str(m) for m in ds["metric"].values if str(m) not in metrics]
        if "selectivity" in ds:
            tasks += [str(t) for t in ds["task"].values if str(t) not in tasks]
    titles = [f"isolated {m}" for m in metrics] + [f"selectivity {t}" for t in tasks]
    if not titles:
        return None
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)
    for ri, (run, is_ctrl) in enumerate(series):
        ds = run.get("probe")
        steps = steps_list(ds["step"].values)
        name = f"{run.name} (control)" if is_ctrl else run.name
        style = {"color": "black" if is_ctrl else color(ri), "dash": "dash" if is_ctrl else None}
        first = True
        for ci, title in enumerate(titles):
            kind, label = title.split(" ", 1)
            if kind == "isolated" and "isolated" in ds and label in ds["metric"].values:
                y = ds["isolated"].sel(metric=label).values
            elif kind == "selectivity" and "selectivity" in ds and label in ds["task"].values:
                y = nanmean(ds["selectivity"].sel(task=label).transpose("step", "layer").values, 1)
            else:
                continue
            fig.add_trace(go.Scatter(x=steps, y=plain(y), mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=first, line=style),
                          row=1, col=ci + 1)
            first = False
    fig.update_xaxes(title_text="step")
    fig.update_layout(title="Shared experts on their own: isolated eval and probe selectivity",
                      height=340)
    return fig
