"""Routing page: capacity, expert load, modality share, balance, saturation/co-activation of the
focused run at the selected layer/modality (header controls → `sel` store)."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, ctx, dcc, html

from dashboards import data
from dashboards.bucketing import zoom_range
from dashboards.components import graph, labelled, row, section
from dashboards.figures import routing as R
from dashboards.pages_common import figures_or_message, need, root_of

dash.register_page(__name__, path="/routing", name="Routing", order=1)

layout = html.Div([
    section("Capacity rate", row(graph("routing-cap-lines"), graph("routing-cap-heat"))),
    section("Expert load", graph("routing-load-heat")),
    section("Per step", html.Div([
        labelled("step (snapshot heat map uses the nearest eval step)",
                 dcc.Slider(id="routing-step", min=0, max=1, step=1, value=None,
                            marks=None, tooltip={"placement": "bottom", "always_visible": True},
                            updatemode="mouseup")),
        row(graph("routing-share"), graph("routing-coact")),
    ])),
    section("Balance", graph("routing-balance")),
    section("Router saturation", graph("routing-saturation")),
    dcc.Store(id="routing-zoom", data={"cap": None, "load": None, "bal": None}),
])


def _focus(sel):
    sel = sel or {}
    return need(sel.get("focus"), "run"), need(sel.get("layer"), "layer"), sel.get("modality") or "vae"


@callback(Output("routing-step", "min"), Output("routing-step", "max"), Output("routing-step", "value"),
          Input("sel", "data"), Input("versions", "data"), State("routing-step", "value"),
          State("routing-step", "max"))
def _slider(sel, _n, value, old_max):
    """Slider spans the committed routing steps; it follows the newest step while left at the end."""
    try:
        run_id, _layer, _m = _focus(sel)
        b = data.step_bounds(root_of(), run_id, "routing")
    except data.DataError:
        return 0, 1, None
    if b is None:
        return 0, 1, None
    lo, hi = b
    if value is None or value == old_max or not (lo <= value <= hi):
        value = hi
    return lo, hi, value


@callback(Output("routing-zoom", "data"), Input("routing-cap-lines", "relayoutData"),
          Input("routing-load-heat", "relayoutData"), Input("routing-balance", "relayoutData"),
          Input("sel", "data"), State("routing-zoom", "data"))
def _zoom(cap_relayout, load_relayout, bal_relayout, sel, z):
    """Remember each time-series graph's visible step range; another run or layer resets it."""
    z = dict(z or {})
    key = [(sel or {}).get("focus"), (sel or {}).get("layer")]
    if ctx.triggered_id == "sel":
        if z.get("key") == key:
            return dash.no_update
        return {"key": key, "cap": None, "load": None, "bal": None}
    new = dict(z, key=key)
    if ctx.triggered_id == "routing-cap-lines":
        new["cap"] = zoom_range(cap_relayout, z.get("cap"))
    elif ctx.triggered_id == "routing-load-heat":
        new["load"] = zoom_range(load_relayout, z.get("load"))
    elif ctx.triggered_id == "routing-balance":
        new["bal"] = zoom_range(bal_relayout, z.get("bal"))
    # A graph reports relayoutData after every draw (autosize): re-sending an unchanged zoom
    # would re-run the page's heaviest callbacks for nothing.
    return dash.no_update if new == z else new


@callback(Output("routing-cap-lines", "figure"), Output("routing-cap-heat", "figure"),
          Input("sel", "data"), Input("routing-zoom", "data"), Input("versions", "data"))
@figures_or_message(2, ("capacity rate", "capacity rate by layer"))
def _capacity(sel, zoom, _n):
    run_id, layer, modality = _focus(sel)
    xr = (zoom or {}).get("cap")
    return (R.capacity_lines(root_of(), run_id, layer, xr),
            R.capacity_heatmap(root_of(), run_id, modality, xr))


@callback(Output("routing-load-heat", "figure"), Input("sel", "data"), Input("routing-zoom", "data"),
          Input("versions", "data"))
@figures_or_message(1, ("expert load",))
def _load(sel, zoom, _n):
    run_id, layer, modality = _focus(sel)
    return R.load_heatmap(root_of(), run_id, layer, modality, (zoom or {}).get("load"))


@callback(Output("routing-share", "figure"), Output("routing-coact", "figure"),
          Input("sel", "data"), Input("routing-step", "value"))
@figures_or_message(2, ("modality share per expert", "co-activation"))
def _at_step(sel, step):
    run_id, layer, _m = _focus(sel)
    return (R.modality_share(root_of(), run_id, layer, step),
            R.coactivation_heatmap(root_of(), run_id, layer, step))


@callback(Output("routing-balance", "figure"), Input("sel", "data"), Input("routing-zoom", "data"),
          Input("versions", "data"))
@figures_or_message(1, ("balance",))
def _balance(sel, zoom, _v):
    run_id, layer, _m = _focus(sel)
    return R.balance_lines(root_of(), run_id, layer, (zoom or {}).get("bal"))


@callback(Output("routing-saturation", "figure"), Input("sel", "data"), Input("versions", "data"))
@figures_or_message(1, ("router saturation",))
def _saturation(sel, _v):
    run_id, layer, _m = _focus(sel)
    return R.saturation_line(root_of(), run_id, layer)
