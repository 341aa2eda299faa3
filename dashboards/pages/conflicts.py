"""Conflicts page: cosine of the und and gen gradients per layer and component over steps, and
the gen/und gradient-norm ratio, for the focused run."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, dcc, html

from dashboards import data
from dashboards.components import graph, labelled, section
from dashboards.figures import conflicts as C
from dashboards.pages_common import (
    figures_or_message, need, root_of, zoom_callback, zoom_range, zoom_store,
)

dash.register_page(__name__, path="/conflicts", name="Conflicts", order=2)

layout = html.Div([
    section("Gradient conflict", labelled("component", dcc.Dropdown(id="conflicts-component",
                                                                    clearable=False,
                                                                    style={"width": "200px"})),
            graph("conflicts-cosine")),
    section("Norm ratio", graph("conflicts-ratio")),
    zoom_store("conflicts-zoom"),
])
zoom_callback("conflicts-zoom", "conflicts-cosine", "conflicts-ratio")


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


def _run(sel):
    return (sel or {}).get("focus")


@callback(Output("conflicts-cosine", "figure"), Output("conflicts-ratio", "figure"),
          Input("sel", "data"), Input("conflicts-component", "value"), Input("versions", "data"),
          Input("conflicts-zoom", "data"))
def _view(sel, component, _v, zoom):
    """The heat map and the ratio share one visible step range (zoom either: both follow,
    re-read and re-bucketed), per run."""
    return _figures(sel, component, zoom_range(zoom, sel, _run))


@figures_or_message(2, ("gradient cosine", "norm ratio"))
def _figures(sel, component, xr):
    sel = sel or {}
    run_id = need(sel.get("focus"), "run")
    component = need(component, "component (no gradient rows yet?)")
    layers = [need(sel.get("layer"), "layer")]
    ds = data.group_dataset(root_of(), run_id, "grad")
    if ds is not None and "all" in [str(v) for v in ds["layer"].values]:
        layers.append("all")  # whole-model ratio as the reference line
    return (C.cosine_heatmap(root_of(), run_id, component, xr),
            C.norm_ratio(root_of(), run_id, component, layers, xr))
