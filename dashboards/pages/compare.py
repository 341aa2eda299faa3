"""Compare page: the paper's Fig. 5a / 5b / 6 overlaid for the runs ticked on the Runs page, and
below them the same runs grouped by config without the seed: mean ± 95% CI bands over seeds."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, dcc, html

from dashboards.components import graph, labelled, row, section
from dashboards.figures import compare as CMP
from dashboards.pages_common import (
    after_first_screen, figures_or_message, first_screen, first_screen_stale, opened_with_page, register_page, root_of,
    zoom_callback, zoom_range, zoom_store,
)
from dashboards.views import View

PATH = "/compare"


def _runs(sel):
    return (sel or {}).get("runs") or []


def _metrics(root, sel, current=None) -> tuple[list, str | None]:
    ms = CMP.isolated_metrics(root, _runs(sel))
    return ms, current if current in ms else (ms[0] if ms else None)


def _values(root, sel) -> dict:
    return {"run_ids": _runs(sel), "term": "gen", "metric": _metrics(root, sel)[1],
            "xrange": None, "series": BAND_DEFAULT}


CAPACITY = View(id="compare-capacity", build=CMP.capacity_by_modality, title="capacity rate",
                args=("run_ids", "xrange"), first_screen=True)
LOSS = View(id="compare-loss", build=CMP.loss_term, title="loss",
            args=("run_ids", "term", "xrange"), first_screen=True)
ISOLATED = View(id="compare-isolated", build=CMP.isolated_metric, title="shared-expert probe",
                args=("run_ids", "metric"), first_screen=True)
BANDS = View(id="compare-bands", build=CMP.seed_bands, title="seed groups",
             args=("run_ids", "series"))
BAND_DEFAULT = next(iter(CMP.BAND_SERIES))
register_page(__name__, path=PATH, name="Compare", order=4, values=_values,
              views=(CAPACITY, LOSS, ISOLATED, BANDS))


def _runs_msg(sel) -> str:
    return "" if _runs(sel) else "No runs picked: tick runs on the Runs page."


def layout(sel=None, **_query):
    metrics, metric = _metrics(root_of(), sel)
    first, gate = first_screen(PATH, sel)
    return html.Div([
        html.Div(_runs_msg(sel), id="compare-runs", className="page-msg"),
        section("Capacity rate per modality (Fig. 5a)", first[CAPACITY.id]),
        row(section("Generation loss (Fig. 5b)",
                    labelled("loss term", dcc.Dropdown(
                        id="compare-term", clearable=False, value="gen",
                        options=["gen", "lm", "mmu", "aux", "z", "total"],
                        style={"width": "140px"})),
                    first[LOSS.id]),
            section("Shared-expert probe (Fig. 6)",
                    labelled("metric", dcc.Dropdown(id="compare-metric", clearable=False,
                                                    options=metrics, value=metric,
                                                    style={"width": "200px"})),
                    first[ISOLATED.id])),
        section("Seed groups: runs grouped by config without the seed, mean ± 95% t interval "
                "over seeds",
                labelled("series", dcc.Dropdown(id="compare-band-series", clearable=False,
                                                options=list(CMP.BAND_SERIES),
                                                value=BAND_DEFAULT, style={"width": "220px"})),
                graph(BANDS.id)),
        zoom_store("compare-zoom-cap"),
        zoom_store("compare-zoom-loss"),
        *gate,
    ])


zoom_callback("compare-zoom-cap", CAPACITY.id)
zoom_callback("compare-zoom-loss", LOSS.id)


@callback(Output("compare-metric", "options"), Output("compare-metric", "value"),
          Output("compare-runs", "children"), Input("sel", "data"), first_screen_stale(PATH),
          State("compare-metric", "value"), prevent_initial_call=True)
def _choose_metric(sel, _stale, current):
    if opened_with_page():
        return (dash.no_update,) * 3
    return *_metrics(root_of(), sel, current), _runs_msg(sel)


@callback(Output(CAPACITY.id, "figure"), Output(LOSS.id, "figure"),
          Output(ISOLATED.id, "figure"), Input("sel", "data"),
          Input("compare-term", "value"), Input("compare-metric", "value"),
          Input("versions", "data"), Input("compare-zoom-cap", "data"),
          Input("compare-zoom-loss", "data"), first_screen_stale(PATH), prevent_initial_call=True)
def _view(sel, term, metric, _v, cap_zoom, loss_zoom, _stale):
    """Each of the two time-series views keeps its own zoom (re-read and re-bucketed)."""
    if opened_with_page("compare-zoom-cap", "compare-zoom-loss"):
        return (dash.no_update,) * 3
    return _figures(sel, term, metric, cap_zoom, loss_zoom)


@figures_or_message(3, (CAPACITY.title, LOSS.title, ISOLATED.title))
def _figures(sel, term, metric, cap_zoom, loss_zoom):
    v = {"run_ids": _runs(sel), "term": term or "gen", "metric": metric}
    return (CAPACITY.figure(root_of(), {**v, "xrange": zoom_range(cap_zoom, sel, _runs)}),
            LOSS.figure(root_of(), {**v, "xrange": zoom_range(loss_zoom, sel, _runs)}),
            ISOLATED.figure(root_of(), v))


@callback(Output(BANDS.id, "figure"), Input("sel", "data"), Input("compare-band-series", "value"),
          Input("versions", "data"), after_first_screen(PATH))
@figures_or_message(1, (BANDS.title,))
def _bands(sel, series, _v, _fold):
    return BANDS.figure(root_of(), {"run_ids": _runs(sel), "series": series or BAND_DEFAULT})
