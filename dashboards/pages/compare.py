"""Compare page: the paper's Fig. 5a / 5b / 6 overlaid for the runs ticked on the Runs page."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, dcc, html

from dashboards.components import graph, labelled, row, section
from dashboards.figures import compare as CMP
from dashboards.pages_common import (
    figures_or_message, root_of, zoom_callback, zoom_range, zoom_store,
)

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
    zoom_store("compare-zoom-cap"),
    zoom_store("compare-zoom-loss"),
])
zoom_callback("compare-zoom-cap", "compare-capacity")
zoom_callback("compare-zoom-loss", "compare-loss")


@callback(Output("compare-metric", "options"), Output("compare-metric", "value"),
          Output("compare-runs", "children"), Input("sel", "data"),
          State("compare-metric", "value"))
def _metrics(sel, current):
    runs = (sel or {}).get("runs") or []
    msg = "" if runs else "No runs picked: tick runs on the Runs page."
    ms = CMP.isolated_metrics(root_of(), runs)
    return ms, current if current in ms else (ms[0] if ms else None), msg


def _runs(sel):
    return (sel or {}).get("runs") or []


@callback(Output("compare-capacity", "figure"), Output("compare-loss", "figure"),
          Output("compare-isolated", "figure"), Input("sel", "data"),
          Input("compare-term", "value"), Input("compare-metric", "value"),
          Input("versions", "data"), Input("compare-zoom-cap", "data"),
          Input("compare-zoom-loss", "data"))
def _view(sel, term, metric, _v, cap_zoom, loss_zoom):
    """Each of the two time-series views keeps its own zoom (re-read and re-bucketed)."""
    return _figures(_runs(sel), term, metric, zoom_range(cap_zoom, sel, _runs),
                    zoom_range(loss_zoom, sel, _runs))


@figures_or_message(3, ("capacity rate", "loss", "shared-expert probe"))
def _figures(runs, term, metric, cap_range, loss_range):
    return (CMP.capacity_by_modality(root_of(), runs, cap_range),
            CMP.loss_term(root_of(), runs, term or "gen", loss_range),
            CMP.isolated_metric(root_of(), runs, metric))
