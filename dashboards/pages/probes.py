"""Probes page: linear-probe accuracy/selectivity per layer over steps, and the isolated
shared-expert eval of the focused run with a control run (understanding-only) overlaid."""

from __future__ import annotations

import dash
from dash import Input, Output, State, callback, dcc, html

from dashboards import data
from dashboards.components import graph, labelled, section
from dashboards.figures import probes as P
from dashboards.pages_common import figures_or_message, need, root_of

dash.register_page(__name__, path="/probes", name="Probes", order=3)

layout = html.Div([
    section("Linear probes on shared-expert outputs",
            labelled("task", dcc.Dropdown(id="probes-task", clearable=False,
                                          style={"width": "200px"})),
            graph("probes-lines")),
    section("Isolated shared experts (routed experts masked)",
            labelled("control run", dcc.Dropdown(id="probes-control", clearable=True,
                                                 placeholder="none", style={"width": "320px"})),
            graph("probes-isolated")),
])


def _guess_control(ids):
    """A run named like an understanding-only control, so the overlay is on by default."""
    for rid in ids:
        low = rid.lower()
        if "und_only" in low or "und-only" in low or "control" in low:
            return rid
    return None


@callback(Output("probes-task", "options"), Output("probes-task", "value"),
          Output("probes-control", "options"), Output("probes-control", "value"),
          Input("sel", "data"), State("probes-task", "value"), State("probes-control", "value"))
def _choices(sel, task, control):
    sel = sel or {}
    try:
        ids = data.list_runs(root_of())
        tasks = P.labels(root_of(), need(sel.get("focus"), "run"), "task")
    except data.DataError:
        return [], None, [], None
    others = [r for r in ids if r != sel.get("focus")]
    control = control if control in others else _guess_control(others)
    return tasks, task if task in tasks else (tasks[0] if tasks else None), others, control


@callback(Output("probes-lines", "figure"), Output("probes-isolated", "figure"),
          Input("sel", "data"), Input("probes-task", "value"), Input("probes-control", "value"),
          Input("versions", "data"))
@figures_or_message(2, ("probes", "isolated shared-expert eval"))
def _figures(sel, task, control, _v):
    run_id = need((sel or {}).get("focus"), "run")
    try:
        iso = P.isolated_lines(root_of(), run_id, control)
    except data.DataError:  # a control run that vanished must not hide the focused run
        iso = P.isolated_lines(root_of(), run_id, None)
    return P.probe_lines(root_of(), run_id, need(task, "task (no probe rows yet?)")), iso
