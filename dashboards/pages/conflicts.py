"""Conflicts page: cosine of the und and gen gradients per layer and component over steps, and
the gen/und gradient-norm ratio, for the focused run."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, ctx, dcc, html

from dashboards import data
from dashboards.bucketing import zoom_range
from dashboards.components import graph, labelled, section
from dashboards.figures import conflicts as C
from dashboards.pages_common import figures_or_message, need, root_of

dash.register_page(__name__, path="/conflicts", name="Conflicts", order=2)

layout = html.Div([
    section("Gradient conflict", labelled("component", dcc.Dropdown(id="conflicts-component",
                                                                    clearable=False,
                                                                    style={"width": "200px"})),
            graph("conflicts-cosine")),
    section("Norm ratio", graph("conflicts-ratio")),
    dcc.Store(id="conflicts-zoom", data=None),
])


@callback(Output("conflicts-component", "options"), Output("conflicts-component", "value"),
          Input("sel", "data"), State("conflicts-component", "value"))
def _components(sel, current):
    try:
        comps = C.components(root_of(), need((sel or {}).get("focus"), "run"))
    except data.DataError:
        return [], None
    if not comps:
        return [], None
    return comps, current if current in comps else ("all" if "all" in comps else comps[0])


@callback(Output("conflicts-zoom", "data"), Input("conflicts-cosine", "relayoutData"),
          Input("conflicts-ratio", "relayoutData"), Input("sel", "data"),
          State("conflicts-zoom", "data"))
def _zoom(cos_relayout, ratio_relayout, sel, current):
    """Visible step range shared by the cosine heat map and the ratio plot (zoom either: both
    follow, re-read and re-bucketed); per run."""
    run = (sel or {}).get("focus")
    current = current or {}
    if ctx.triggered_id == "sel":
        return dash.no_update if current.get("run") == run else {"run": run, "range": None}
    relayout = cos_relayout if ctx.triggered_id == "conflicts-cosine" else ratio_relayout
    new = {"run": run, "range": zoom_range(relayout, current.get("range"))}
    return dash.no_update if new == current else new  # redraws report relayoutData too


@callback(Output("conflicts-cosine", "figure"), Output("conflicts-ratio", "figure"),
          Input("sel", "data"), Input("conflicts-component", "value"),
          Input("conflicts-zoom", "data"), Input("versions", "data"))
@figures_or_message(2, ("gradient cosine", "norm ratio"))
def _figures(sel, component, zoom, _v):
    sel = sel or {}
    run_id = need(sel.get("focus"), "run")
    component = need(component, "component (no gradient rows yet?)")
    layers = [need(sel.get("layer"), "layer")]
    ds = data.group_dataset(root_of(), run_id, "grad")
    if ds is not None and "all" in [str(v) for v in ds["layer"].values]:
        layers.append("all")  # whole-model ratio as the reference line
    xr = (zoom or {}).get("range")
    return (C.cosine_heatmap(root_of(), run_id, component, xr),
            C.norm_ratio(root_of(), run_id, component, layers, xr))
