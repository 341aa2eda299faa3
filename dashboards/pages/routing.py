"""Routing page: capacity, expert load, modality share, balance, saturation/co-activation of the
focused run at the selected layer/modality (header controls → `sel` store)."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, ctx, dcc, html

from dashboards import data
from dashboards.components import graph, labelled, row, section
from dashboards.figures import routing as R
from dashboards.pages_common import (
    after_first_screen, figures_or_message, first_screen, first_screen_stale, need,
    opened_with_page, register_page, root_of, zoom_callback, zoom_range, zoom_store,
)
from dashboards.views import View

PATH = "/routing"


def _values(root, sel) -> dict:
    """The views' arguments for the selection: all steps, the slider at the newest step."""
    sel = sel or {}
    return {"run_id": need(sel.get("focus"), "run"), "layer": need(sel.get("layer"), "layer"),
            "modality": sel.get("modality") or "vae", "xrange": None, "step": None}


# In warming order: the first screen first.
CAP_LINES = View(id="routing-cap-lines", build=R.capacity_lines, title="capacity rate",
                 args=("run_id", "layer", "xrange"), first_screen=True, warm=True)
CAP_HEAT = View(id="routing-cap-heat", build=R.capacity_heatmap, title="capacity rate by layer",
                args=("run_id", "modality", "xrange"), first_screen=True, warm=True)
LOAD = View(id="routing-load-heat", build=R.load_heatmap, title="expert load",
            args=("run_id", "layer", "modality", "xrange"), first_screen=True, warm=True)
BALANCE = View(id="routing-balance", build=R.balance_lines, title="balance",
               args=("run_id", "layer", "xrange"), warm=True)
SHARE = View(id="routing-share", build=R.modality_share, title="modality share per expert",
             args=("run_id", "layer", "step"))
COACT = View(id="routing-coact", build=R.coactivation_heatmap, title="co-activation",
             args=("run_id", "layer", "step"))
SATURATION = View(id="routing-saturation", build=R.saturation_line, title="router saturation",
                  args=("run_id", "layer"))
register_page(__name__, path=PATH, name="Routing", order=1, values=_values,
              views=(CAP_LINES, CAP_HEAT, LOAD, BALANCE, SHARE, COACT, SATURATION))


def layout(sel=None, **_query):
    """The page for the current selection, its first screen built in (`first_screen`)."""
    first, gate = first_screen(PATH, sel)
    return html.Div([
        section("Capacity rate", row(first[CAP_LINES.id], first[CAP_HEAT.id])),
        section("Expert load", first[LOAD.id]),
        section("Per step", html.Div([
            labelled("step (snapshot heat map uses the nearest eval step)",
                     dcc.Slider(id="routing-step", min=0, max=1, step=1, value=None,
                                marks=None, tooltip={"placement": "bottom", "always_visible": True},
                                updatemode="mouseup")),
            row(graph(SHARE.id), graph(COACT.id)),
        ])),
        section("Balance", graph(BALANCE.id)),
        section("Router saturation", graph(SATURATION.id)),
        zoom_store("routing-zoom-cap"),
        zoom_store("routing-zoom-load"),
        zoom_store("routing-zoom-bal"),
        *gate,
    ])


# Zoom stores are written in the browser (assets/clientside.js) on a real x zoom only.
zoom_callback("routing-zoom-cap", CAP_LINES.id)
zoom_callback("routing-zoom-load", LOAD.id)
zoom_callback("routing-zoom-bal", BALANCE.id)


def _key(sel):
    """What a zoom belongs to: another run or layer shows all steps again (a modality keeps it)."""
    sel = sel or {}
    return [sel.get("focus"), sel.get("layer")]


def _zoomed(sel, zoom) -> dict:
    """The views' arguments for a view showing the steps of its zoom store."""
    return {**_values(root_of(), sel), "xrange": zoom_range(zoom, sel, _key)}


# Each time-series view is re-read and re-bucketed for the steps its graph shows (the zoom
# store, written in the browser on a real zoom only): a zoom is one round trip.
@callback(Output(CAP_LINES.id, "figure"), Output(CAP_HEAT.id, "figure"),
          Input("sel", "data"), Input("versions", "data"), Input("routing-zoom-cap", "data"),
          first_screen_stale(PATH), prevent_initial_call=True)
def _capacity_changed(sel, _v, zoom, _stale):
    if opened_with_page("routing-zoom-cap"):
        return dash.no_update, dash.no_update
    return _capacity(sel, zoom)


@figures_or_message(2, (CAP_LINES.title, CAP_HEAT.title))
def _capacity(sel, zoom):
    v = _zoomed(sel, zoom)
    return CAP_LINES.figure(root_of(), v), CAP_HEAT.figure(root_of(), v)


@callback(Output(LOAD.id, "figure"), Input("sel", "data"), Input("versions", "data"),
          Input("routing-zoom-load", "data"), first_screen_stale(PATH), prevent_initial_call=True)
def _load_changed(sel, _v, zoom, _stale):
    if opened_with_page("routing-zoom-load"):
        return dash.no_update
    return _load(sel, zoom)


@figures_or_message(1, (LOAD.title,))
def _load(sel, zoom):
    return LOAD.figure(root_of(), _zoomed(sel, zoom))


@callback(Output(BALANCE.id, "figure"), Input("sel", "data"), Input("versions", "data"),
          Input("routing-zoom-bal", "data"), after_first_screen(PATH))
@figures_or_message(1, (BALANCE.title,))
def _balance(sel, _v, zoom, _fold):
    return BALANCE.figure(root_of(), _zoomed(sel, zoom))


@callback(Output("routing-step", "min"), Output("routing-step", "max"), Output("routing-step", "value"),
          Output(SHARE.id, "figure"), Output(COACT.id, "figure"),
          Input("sel", "data"), Input("versions", "data"), Input("routing-step", "value"),
          after_first_screen(PATH), State("routing-step", "max"))
def _at_step(sel, _v, value, _fold, old_max):
    """The slider spans the committed routing steps and follows the newest one while left at
    the end; the per-step views show the slider's step. One callback for both: as two, the
    views would wait a round trip for the slider on every page open."""
    try:
        bounds = data.step_bounds(root_of(), _values(root_of(), sel)["run_id"], "routing")
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


@figures_or_message(2, (SHARE.title, COACT.title))
def _step_figures(sel, step):
    v = {**_values(root_of(), sel), "step": step}
    return SHARE.figure(root_of(), v), COACT.figure(root_of(), v)


@callback(Output(SATURATION.id, "figure"), Input("sel", "data"), Input("versions", "data"),
          after_first_screen(PATH))
@figures_or_message(1, (SATURATION.title,))
def _saturation(sel, _v, _fold):
    return SATURATION.figure(root_of(), _values(root_of(), sel))
