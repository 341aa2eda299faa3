"""Probes page: linear-probe accuracy/selectivity per layer over steps, and the isolated
shared-expert eval of the focused run with a control run (understanding-only) overlaid."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, dcc, html

from dashboards import data
from dashboards.components import labelled, section
from dashboards.figures import probes as P
from dashboards.pages_common import (
    figures_or_message, first_screen, first_screen_stale, need, opened_with_page, register_page,
    root_of,
)
from dashboards.views import View

PATH = "/probes"


def _guess_control(ids):
    """A run named like an understanding-only control, so the overlay is on by default."""
    for rid in ids:
        low = rid.lower()
        if "und_only" in low or "und-only" in low or "control" in low:
            return rid
    return None


def _choices(root, sel, task=None, control=None) -> dict:
    """Tasks and control runs to offer, and the ones to show (the given ones if offered)."""
    focus = need((sel or {}).get("focus"), "run")
    tasks = P.labels(root, focus, "task")
    others = [r for r in data.list_runs(root) if r != focus]
    return {"tasks": tasks, "task": task if task in tasks else (tasks[0] if tasks else None),
            "others": others, "control": control if control in others else _guess_control(others)}


def _values(root, sel, task=None, control=None) -> dict:
    c = _choices(root, sel, task, control)
    return {"run_id": sel["focus"], "task": need(c["task"], "task (no probe rows yet?)"),
            "control_id": c["control"]}


LINES = View(id="probes-lines", build=P.probe_lines, title="probes", args=("run_id", "task"),
             first_screen=True)
ISOLATED = View(id="probes-isolated", build=P.isolated_lines,
                title="isolated shared-expert eval", args=("run_id", "control_id"),
                first_screen=True)
register_page(__name__, path=PATH, name="Probes", order=3, values=_values,
              views=(LINES, ISOLATED))


def layout(sel=None, **_query):
    try:
        c = _choices(root_of(), sel)
    except (data.DataError, OSError, ValueError):
        c = {"tasks": [], "task": None, "others": [], "control": None}
    first, gate = first_screen(PATH, sel)
    return html.Div([
        section("Linear probes on shared-expert outputs",
                labelled("task", dcc.Dropdown(id="probes-task", clearable=False,
                                              options=c["tasks"], value=c["task"],
                                              style={"width": "200px"})),
                first[LINES.id]),
        section("Isolated shared experts (routed experts masked)",
                labelled("control run", dcc.Dropdown(id="probes-control", clearable=True,
                                                     options=c["others"], value=c["control"],
                                                     placeholder="none",
                                                     style={"width": "320px"})),
                first[ISOLATED.id]),
        *gate,
    ])


@callback(Output("probes-task", "options"), Output("probes-task", "value"),
          Output("probes-control", "options"), Output("probes-control", "value"),
          Input("sel", "data"), first_screen_stale(PATH), State("probes-task", "value"),
          State("probes-control", "value"), prevent_initial_call=True)
def _choose(sel, _stale, task, control):
    if opened_with_page():
        return (dash.no_update,) * 4
    try:
        c = _choices(root_of(), sel, task, control)
    except data.DataError:
        return [], None, [], None
    return c["tasks"], c["task"], c["others"], c["control"]


@callback(Output(LINES.id, "figure"), Output(ISOLATED.id, "figure"),
          Input("sel", "data"), Input("probes-task", "value"), Input("probes-control", "value"),
          Input("versions", "data"), first_screen_stale(PATH), prevent_initial_call=True)
def _view(sel, task, control, _v, _stale):
    if opened_with_page():
        return dash.no_update, dash.no_update
    return _figures(sel, task, control)


@figures_or_message(2, (LINES.title, ISOLATED.title))
def _figures(sel, task, control):
    run_id = need((sel or {}).get("focus"), "run")
    v = {"run_id": run_id, "task": need(task, "task (no probe rows yet?)"), "control_id": control}
    try:
        iso = ISOLATED.figure(root_of(), v)
    except data.DataError:  # a control run that vanished must not hide the focused run
        iso = ISOLATED.figure(root_of(), {**v, "control_id": None})
    return LINES.figure(root_of(), v), iso
