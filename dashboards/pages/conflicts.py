"""Conflicts page: cosine of the und and gen gradients per layer and component over steps, and
the gen/und gradient-norm ratio, for the focused run."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, dcc, html

from dashboards import data
from dashboards.components import labelled, section
from dashboards.figures import conflicts as C
from dashboards.pages_common import (
    figures_or_message, first_screen, first_screen_stale, need, opened_with_page, register_page,
    root_of, zoom_callback, zoom_range, zoom_store,
)
from dashboards.views import View

PATH = "/conflicts"


def _components(root, run_id, current=None) -> tuple[list, str | None]:
    """Components of the run's gradient rows and the one to show (`current` if it has it)."""
    comps = C.components(root, run_id)
    if not comps:
        return [], None
    return comps, current if current in comps else ("all" if "all" in comps else comps[0])


def _values(root, sel, component=None) -> dict:
    sel = sel or {}
    run_id = need(sel.get("focus"), "run")
    if component is None:
        component = _components(root, run_id)[1]
    layers = [need(sel.get("layer"), "layer")]
    ds = data.group_dataset(root, run_id, "grad")
    if ds is not None and "all" in [str(v) for v in ds["layer"].values]:
        layers.append("all")  # whole-model ratio as the reference line
    return {"run_id": run_id, "component": need(component, "component (no gradient rows yet?)"),
            "layers": layers, "xrange": None}


COSINE = View(id="conflicts-cosine", build=C.cosine_heatmap, title="gradient cosine",
              args=("run_id", "component", "xrange"), first_screen=True)
RATIO = View(id="conflicts-ratio", build=C.norm_ratio, title="norm ratio",
             args=("run_id", "component", "layers", "xrange"), first_screen=True)
register_page(__name__, path=PATH, name="Conflicts", order=2, values=_values,
              views=(COSINE, RATIO))


def layout(sel=None, **_query):
    try:
        comps, comp = _components(root_of(), need((sel or {}).get("focus"), "run"))
    except data.DataError:
        comps, comp = [], None
    first, gate = first_screen(PATH, sel)
    return html.Div([
        section("Gradient conflict",
                labelled("component", dcc.Dropdown(id="conflicts-component", clearable=False,
                                                   options=comps, value=comp,
                                                   style={"width": "200px"})),
                first[COSINE.id]),
        section("Norm ratio", first[RATIO.id]),
        zoom_store("conflicts-zoom"),
        *gate,
    ])


zoom_callback("conflicts-zoom", COSINE.id, RATIO.id)


@callback(Output("conflicts-component", "options"), Output("conflicts-component", "value"),
          Input("sel", "data"), first_screen_stale(PATH), State("conflicts-component", "value"),
          prevent_initial_call=True)
def _choose_component(sel, _stale, current):
    if opened_with_page():
        return dash.no_update, dash.no_update
    try:
        return _components(root_of(), need((sel or {}).get("focus"), "run"), current)
    except data.DataError:
        return [], None


def _run(sel):
    return (sel or {}).get("focus")


@callback(Output(COSINE.id, "figure"), Output(RATIO.id, "figure"),
          Input("sel", "data"), Input("conflicts-component", "value"), Input("versions", "data"),
          Input("conflicts-zoom", "data"), first_screen_stale(PATH), prevent_initial_call=True)
def _view(sel, component, _v, zoom, _stale):
    """The heat map and the ratio share one visible step range (zoom either: both follow,
    re-read and re-bucketed), per run."""
    if opened_with_page("conflicts-zoom"):
        return dash.no_update, dash.no_update
    return _figures(sel, component, zoom)


@figures_or_message(2, (COSINE.title, RATIO.title))
def _figures(sel, component, zoom):
    v = {**_values(root_of(), sel, need(component, "component (no gradient rows yet?)")),
         "xrange": zoom_range(zoom, sel, _run)}
    return COSINE.figure(root_of(), v), RATIO.figure(root_of(), v)
