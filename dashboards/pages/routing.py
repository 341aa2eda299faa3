"""Routing page: capacity, expert load, modality share, balance, saturation/co-activation of the
focused run at the selected layer/modality (header controls → `sel` store)."""

from __future__ import annotations

import dash
from dash import (
    ClientsideFunction, Input, Output, State, callback, clientside_callback, ctx, dcc, html,
)

from dashboards import data
from dashboards.components import graph, labelled, row, section
from dashboards.figures import routing as R
from dashboards.pages_common import (
    figures_or_message, need, opened_with_page, root_of, zoom_callback, zoom_range, zoom_store,
)

dash.register_page(__name__, path="/routing", name="Routing", order=1)

def layout(sel=None, **_query):
    """The page for the current selection (`sel`: the shell's store, passed in by the pages
    router, see app.py). The first screen's figures are built here, so they arrive with the
    page itself: no callback round trip and no placeholder drawn first. Their callbacks only
    answer later changes (selection, new rows, zoom)."""
    return html.Div([
        section("Capacity rate", row(*(graph(i, f) for i, f in zip(
            ("routing-cap-lines", "routing-cap-heat"), _capacity(sel, None))))),
        section("Expert load", graph("routing-load-heat", _load(sel, None))),
        section("Per step", html.Div([
            labelled("step (snapshot heat map uses the nearest eval step)",
                     dcc.Slider(id="routing-step", min=0, max=1, step=1, value=None,
                                marks=None, tooltip={"placement": "bottom", "always_visible": True},
                                updatemode="mouseup")),
            row(graph("routing-share"), graph("routing-coact")),
        ])),
        section("Balance", graph("routing-balance")),
        section("Router saturation", graph("routing-saturation")),
        zoom_store("routing-zoom-cap"),
        zoom_store("routing-zoom-load"),
        zoom_store("routing-zoom-bal"),
        # The first screen's graphs, and the gate their drawing opens (see below).
        dcc.Store(id="routing-fold-graphs",
                  data=["routing-cap-lines", "routing-cap-heat", "routing-load-heat"]),
        dcc.Store(id="routing-fold", data=None),
    ])


# Zoom stores are written in the browser (assets/clientside.js) on a real x zoom only.
zoom_callback("routing-zoom-cap", "routing-cap-lines")
zoom_callback("routing-zoom-load", "routing-load-heat")
zoom_callback("routing-zoom-bal", "routing-balance")
# The views below the first screen (balance, per step, saturation) take `routing-fold` as an
# Input: Dash runs them only once the browser has drawn the first screen (assets/clientside.js,
# `drawn`, which gives up waiting after 10 s). On a first visit their requests, server work and
# drawing otherwise compete with the first screen for the CPU, and plotly.js, still cold,
# sometimes drew one of them first (+0.2 s).
clientside_callback(ClientsideFunction("moe_probe", "drawn"), Output("routing-fold", "data"),
                    Input("routing-fold-graphs", "data"))


def _key(sel):
    """What a zoom belongs to: another run or layer shows all steps again (a modality keeps it)."""
    sel = sel or {}
    return [sel.get("focus"), sel.get("layer")]


def _focus(sel):
    sel = sel or {}
    return need(sel.get("focus"), "run"), need(sel.get("layer"), "layer"), sel.get("modality") or "vae"


# Each time-series view is re-read and re-bucketed for the steps its graph shows (the zoom
# store, written in the browser on a real zoom only): a zoom is one round trip.
@figures_or_message(2, ("capacity rate", "capacity rate by layer"))
def _capacity(sel, zoom):
    run_id, layer, modality = _focus(sel)
    xr = zoom_range(zoom, sel, _key)
    return (R.capacity_lines(root_of(), run_id, layer, xr),
            R.capacity_heatmap(root_of(), run_id, modality, xr))


@figures_or_message(1, ("expert load",))
def _load(sel, zoom):
    run_id, layer, modality = _focus(sel)
    return R.load_heatmap(root_of(), run_id, layer, modality, zoom_range(zoom, sel, _key))


@callback(Output("routing-cap-lines", "figure"), Output("routing-cap-heat", "figure"),
          Input("sel", "data"), Input("versions", "data"), Input("routing-zoom-cap", "data"),
          prevent_initial_call=True)
def _capacity_changed(sel, _v, zoom):
    if opened_with_page("routing-zoom-cap", zoom):
        return dash.no_update, dash.no_update
    return _capacity(sel, zoom)


@callback(Output("routing-load-heat", "figure"), Input("sel", "data"), Input("versions", "data"),
          Input("routing-zoom-load", "data"), prevent_initial_call=True)
def _load_changed(sel, _v, zoom):
    if opened_with_page("routing-zoom-load", zoom):
        return dash.no_update
    return _load(sel, zoom)


@callback(Output("routing-balance", "figure"), Input("sel", "data"), Input("versions", "data"),
          Input("routing-zoom-bal", "data"), Input("routing-fold", "data"))
@figures_or_message(1, ("balance",))
def _balance(sel, _v, zoom, _fold):
    run_id, layer, _m = _focus(sel)
    return R.balance_lines(root_of(), run_id, layer, zoom_range(zoom, sel, _key))


@callback(Output("routing-step", "min"), Output("routing-step", "max"), Output("routing-step", "value"),
          Output("routing-share", "figure"), Output("routing-coact", "figure"),
          Input("sel", "data"), Input("versions", "data"), Input("routing-step", "value"),
          Input("routing-fold", "data"), State("routing-step", "max"))
def _at_step(sel, _v, value, _fold, old_max):
    """The slider spans the committed routing steps and follows the newest one while left at
    the end; the per-step views show the slider's step. One callback for both: as two, the
    views would wait a round trip for the slider on every page open."""
    try:
        run_id, layer, _m = _focus(sel)
        bounds = data.step_bounds(root_of(), run_id, "routing")
    except data.DataError:
        bounds = None
    moved = ctx.triggered_id == "routing-step"  # by the user: leave the slider where it is
    if bounds is None:
        value, slider = None, (0, 1, None)
    else:
        lo, hi = bounds
        if not moved and (value is None or value == old_max):
            value = hi
        value = None if value is None else min(max(value, lo), hi)
        slider = (lo, hi, value)
    return (*((dash.no_update,) * 3 if moved else slider), *_step_figures(sel, value))


@figures_or_message(2, ("modality share per expert", "co-activation"))
def _step_figures(sel, step):
    run_id, layer, _m = _focus(sel)
    return (R.modality_share(root_of(), run_id, layer, step),
            R.coactivation_heatmap(root_of(), run_id, layer, step))


@callback(Output("routing-saturation", "figure"), Input("sel", "data"), Input("versions", "data"),
          Input("routing-fold", "data"))
@figures_or_message(1, ("router saturation",))
def _saturation(sel, _v, _fold):
    run_id, layer, _m = _focus(sel)
    return R.saturation_line(root_of(), run_id, layer)
