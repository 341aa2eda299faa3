"""Runs page: every run under ROOT with arch, steps, last capacity rate per modality and the
diagnosis verdicts; the runs ticked here are the ones the Compare page overlays."""

from __future__ import annotations

import time

import dash
from dash import Input, Output, Patch, State, callback, dcc, html

from dashboards import data
from dashboards.components import section
from dashboards.figures.runs import run_row
from dashboards.pages_common import first_screen, register_page, root_of

PATH = "/"
register_page(__name__, path=PATH, name="Runs", order=0, values=lambda root, sel: {})

DIAGNOSIS_WAIT_S = 1.0
"""How long one refresh of the table waits for diagnoses not cached yet (all runs together)."""



def layout(sel=None, **_query):
    """No figures: its first screen is the table, which the refresh tick fills at once."""
    _first, gate = first_screen(PATH, sel)
    return html.Div([
        section("Runs", html.Div(id="runs-msg", className="page-msg"),
                html.Div(id="runs-table")),
        section("Compare", html.P("Tick the runs to overlay on the Compare page."),
                dcc.Checklist(id="runs-pick", options=[], value=[], inline=True)),
        dcc.Store(id="runs-rows", data=None),
        *gate,
    ])


def _fmt(x):
    return "–" if x is None else f"{x:.3f}"


def _verdicts(diag: dict):
    if "pending" in diag:
        return html.Span(diag["pending"], className="verdict-pending")
    if "error" in diag:
        return html.Span(diag["error"], className="verdict-bad")
    bad = diag.get("findings") or []
    if not bad:
        return html.Span("ok", className="verdict-ok")
    return html.Span("; ".join(bad), className="verdict-bad")


def _table(rows):
    head = html.Tr([html.Th(h) for h in ("run", "arch", "recipe", "last step",
                                         "cap text", "cap vit", "cap vae", "diagnosis")])
    body = []
    for r in rows:
        if "error" in r:
            body.append(html.Tr([html.Td(r["id"]), html.Td(r["error"], colSpan=7,
                                                           className="verdict-bad")]))
            continue
        cap = r["capacity"]
        body.append(html.Tr([html.Td(r["id"]), html.Td(r["arch"]), html.Td(r["recipe"] or "–"),
                             html.Td("–" if r["steps"] is None else r["steps"]),
                             *[html.Td(_fmt(cap.get(m)), **{"data-value": "" if cap.get(m) is None
                                                             else repr(cap.get(m))})
                               for m in ("text", "vit", "vae")],
                             html.Td(_verdicts(r["diagnosis"]))],
                            id={"type": "run-row", "run": r["id"]}))
    return html.Table([html.Thead(head), html.Tbody(body)], className="runs", id="runs-tbl")


@callback(Output("runs-table", "children"), Output("runs-msg", "children"),
          Output("runs-pick", "options"), Output("runs-pick", "value"), Output("runs-rows", "data"),
          Input("tick", "n_intervals"), State("sel", "data"), State("runs-rows", "data"))
def _runs(_n, sel, old_rows):
    """Rebuilt only when a run or its committed rows changed: re-rendering the table on every
    tick would flicker and drop the user's ticks mid-click."""
    try:
        ids = data.list_runs(root_of())
    except (OSError, ValueError) as e:
        return None, f"Cannot read the dashboard root: {e}", [], [], None
    if not ids:
        return None, f"No runs under {root_of()}.", [], [], None
    # Verdicts that take longer (a long run: ~30 s) show as pending and fill in on a later tick.
    deadline = time.monotonic() + DIAGNOSIS_WAIT_S
    rows = [run_row(root_of(), rid, wait_s=max(0.0, deadline - time.monotonic())) for rid in ids]
    if rows == old_rows:
        return (dash.no_update,) * 5
    picked = [r for r in ((sel or {}).get("runs") or []) if r in ids]
    return _table(rows), "", ids, picked, rows


@callback(Output("sel", "data", allow_duplicate=True), Input("runs-pick", "value"),
          prevent_initial_call=True)
def _pick(value):
    p = Patch()
    p["runs"] = list(value or [])
    return p
