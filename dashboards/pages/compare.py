"""Compare page: the paper's Fig. 5a / 5b / 6 overlaid for the runs ticked on the Runs page."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, ctx, dcc, html

from dashboards.bucketing import zoom_range
from dashboards.components import graph, labelled, row, section
from dashboards.figures import compare as CMP
from dashboards.pages_common import figures_or_message, root_of

dash.register_page(__name__, path="/compare", name="Compare", order=4)

layout = html.Div([
    html.Div(id="compare-runs", className="page-msg"),
    section("Capacity rate per modality (Fig. 5a)", graph("compare-capacity")),
    row(section("Generation loss (Fig. 5b)",
                labelled("loss term", dcc.Dropdown(id="compare-term", clearable=False, value="gen",
                                                   options=["gen", "lm", "mmu", "aux", "z", "total"],
                                                   style={"width": "140px"})),
                graph("compare-loss")),
        section("Shared-expert probe (Fig. 6)",
                labelled("metric", dcc.Dropdown(id="compare-metric", clearable=False,
                                                style={"width": "200px"})),
                graph("compare-isolated"))),
    dcc.Store(id="compare-zoom", data={"cap": None, "loss": None}),
])


@callback(Output("compare-metric", "options"), Output("compare-metric", "value"),
          Output("compare-runs", "children"), Input("sel", "data"),
          State("compare-metric", "value"))
def _metrics(sel, current):
    runs = (sel or {}).get("runs") or []
    msg = "" if runs else "No runs picked: tick runs on the Runs page."
    ms = CMP.isolated_metrics(root_of(), runs)
    return ms, current if current in ms else (ms[0] if ms else None), msg


@callback(Output("compare-zoom", "data"), Input("compare-capacity", "relayoutData"),
          Input("compare-loss", "relayoutData"), State("compare-zoom", "data"))
def _zoom(cap, loss, z):
    z = dict(z or {})
    new = dict(z)
    if ctx.triggered_id == "compare-capacity":
        new["cap"] = zoom_range(cap, z.get("cap"))
    elif ctx.triggered_id == "compare-loss":
        new["loss"] = zoom_range(loss, z.get("loss"))
    return dash.no_update if new == z else new  # redraws report relayoutData too


@callback(Output("compare-capacity", "figure"), Output("compare-loss", "figure"),
          Output("compare-isolated", "figure"), Input("sel", "data"), Input("compare-term", "value"),
          Input("compare-metric", "value"), Input("compare-zoom", "data"), Input("versions", "data"))
@figures_or_message(3, ("capacity rate", "loss", "shared-expert probe"))
def _figures(sel, term, metric, zoom, _v):
    runs = (sel or {}).get("runs") or []
    zoom = zoom or {}
    return (CMP.capacity_by_modality(root_of(), runs, zoom.get("cap")),
            CMP.loss_term(root_of(), runs, term or "gen", zoom.get("loss")),
            CMP.isolated_metric(root_of(), runs, metric))
