"""Live page: committed rows per group and the newest losses of every run, refreshed on each tick.

Only committed rows are ever read (the reader cuts at each group's marker), and a run directory
appearing or disappearing between ticks is just a different table, not an error."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, dcc, html

from dashboards import data
from dashboards.components import section
from dashboards.figures import compare as CMP
from dashboards.pages_common import (
    figures_or_message, first_screen, first_screen_stale, need, opened_with_page, register_page,
    root_of,
)
from dashboards.views import View

PATH = "/live"
_GROUPS = ("routing", "loss", "grad", "probe", "eval", "snapshot")


def _values(root, sel) -> dict:
    run_id = need((sel or {}).get("focus"), "run")
    return {"run_ids": [run_id], "term": "total", "xrange": None,
            "title": f"{run_id} · total loss"}


LOSS = View(id="live-loss", build=CMP.loss_term, title="total loss",
            args=("run_ids", "term", "xrange", "title"), first_screen=True)
register_page(__name__, path=PATH, name="Live", order=5, values=_values, views=(LOSS,))


def layout(sel=None, **_query):
    first, gate = first_screen(PATH, sel)
    return html.Div([
        section("Committed rows", html.Div(id="live-msg", className="page-msg"),
                html.Div(id="live-tick", className="live-tick"),
                html.Div(id="live-table")),
        section("Focused run: total loss", first[LOSS.id]),
        dcc.Store(id="live-rows", data=None),
        *gate,
    ])


@callback(Output("live-table", "children"), Output("live-msg", "children"),
          Output("live-tick", "children"), Output("live-rows", "data"),
          Input("tick", "n_intervals"), State("live-rows", "data"))
def _table(n, old):
    try:
        ids = data.list_runs(root_of())
    except (OSError, ValueError) as e:
        return None, f"Cannot read the dashboard root: {e}", "", None
    metas = {}
    for rid in ids:
        try:
            metas[rid] = data.run_meta(root_of(), rid)
        except data.DataError as e:
            metas[rid] = {"error": str(e)}
    tick = f"refreshed {n or 0} times; rows below each group's commit marker only"
    if metas == old:  # unchanged: keep the DOM (no flicker), only the counter moves
        return dash.no_update, dash.no_update, tick, dash.no_update
    rows = [html.Tr([html.Th("run"), *[html.Th(g) for g in _GROUPS], html.Th("last step")])]
    for rid, meta in metas.items():
        if "error" in meta:
            rows.append(html.Tr([html.Td(rid), html.Td(meta["error"], colSpan=len(_GROUPS) + 1)]))
            continue
        c = meta["committed"]
        rows.append(html.Tr([html.Td(rid), *[html.Td(c.get(g, "–")) for g in _GROUPS],
                             html.Td("–" if meta["last_step"] is None else meta["last_step"],
                                     className="last-step")], id={"type": "live-row", "run": rid}))
    msg = "" if ids else f"No runs under {root_of()}."
    return html.Table(rows, className="runs", id="live-tbl"), msg, tick, metas


@callback(Output(LOSS.id, "figure"), Input("sel", "data"), Input("versions", "data"),
          first_screen_stale(PATH), prevent_initial_call=True)
def _loss(sel, _v, _stale):
    if opened_with_page():
        return dash.no_update
    return _loss_figure(sel)


@figures_or_message(1, (LOSS.title,))
def _loss_figure(sel):
    return LOSS.figure(root_of(), _values(root_of(), sel))
