"""Experts page: pick a layer (header) and an expert; its top words, digit classes and topics,
the patch positions and real digits it takes, each at two chosen snapshots; and a layer × expert
map of what dominates every expert (token-level routing, the `token_routing` group)."""

from __future__ import annotations

from dash import Input, Output, State, callback, dcc, html

from dashboards import data
from dashboards.components import labelled, section
from dashboards.figures import experts as X
from dashboards.pages_common import (
    figures_or_message, first_screen, first_screen_stale, need, register_page, root_of,
)
from dashboards.views import View

PATH = "/experts"


def _choices(root, sel, expert=None, step_a=None, step_b=None) -> dict:
    """Experts and snapshot steps to offer, and the ones to show (the given ones if offered;
    by default expert 0, the first and the last token-routing step)."""
    run_id = need((sel or {}).get("focus"), "run")
    tr, _ = X.token_routing(root, run_id)
    steps = [int(s) for s in tr.steps]
    experts = list(range(tr.n_experts))
    return {"experts": experts, "expert": _offered(expert, experts, 0), "steps": steps,
            "step_a": _offered(step_a, steps, steps[0]),
            "step_b": _offered(step_b, steps, steps[-1])}


def _offered(value, options, default):
    return value if value in options else default


def _values(root, sel, expert=None, step_a=None, step_b=None) -> dict:
    c = _choices(root, sel, expert, step_a, step_b)
    return {"run_id": sel["focus"], "layer": need(sel.get("layer"), "layer"),
            "expert": c["expert"], "step_a": c["step_a"], "step_b": c["step_b"]}


_ONE = ("run_id", "layer", "expert", "step_a", "step_b")
WORDS = View(id="experts-words", build=X.expert_words, title="top words", args=_ONE,
             first_screen=True)
LABELS = View(id="experts-labels", build=X.expert_labels, title="digit classes and topics",
              args=_ONE, first_screen=True)
PATCHES = View(id="experts-patches", build=X.expert_patches, title="patch positions", args=_ONE,
               first_screen=True)
IMAGES = View(id="experts-images", build=X.expert_images, title="digits", args=_ONE,
              first_screen=True)
MAP = View(id="experts-map", build=X.expert_map, title="what dominates each expert",
           args=("run_id", "step_b"), first_screen=True)
_ALL = (WORDS, LABELS, PATCHES, IMAGES, MAP)
register_page(__name__, path=PATH, name="Experts", order=4, values=_values, views=_ALL)


def layout(sel=None, **_query):
    try:
        c = _choices(root_of(), sel)
    except (data.DataError, OSError, ValueError):
        c = {"experts": [], "expert": None, "steps": [], "step_a": None, "step_b": None}
    first, gate = first_screen(PATH, sel)

    def dropdown(id_, options, value, width="110px"):
        return dcc.Dropdown(id=id_, clearable=False, options=options, value=value,
                            style={"width": width})
    return html.Div([
        section("Expert (layer: header)",
                html.Div([labelled("expert", dropdown("experts-expert", c["experts"], c["expert"])),
                          labelled("step A", dropdown("experts-step-a", c["steps"], c["step_a"])),
                          labelled("step B", dropdown("experts-step-b", c["steps"], c["step_b"]))],
                         className="row"),
                first[WORDS.id], first[LABELS.id], first[PATCHES.id], first[IMAGES.id]),
        section("What dominates each expert (at step B)", first[MAP.id]),
        *gate,
    ])


@callback(Output("experts-expert", "options"), Output("experts-expert", "value"),
          Output("experts-step-a", "options"), Output("experts-step-a", "value"),
          Output("experts-step-b", "options"), Output("experts-step-b", "value"),
          Input("sel", "data"), Input("versions", "data"), first_screen_stale(PATH),
          State("experts-expert", "value"), State("experts-step-a", "value"),
          State("experts-step-b", "value"), State("experts-step-b", "options"),
          prevent_initial_call=True)
def _choose(sel, _v, _stale, expert, step_a, step_b, old_steps):
    """Offer the run's experts and steps; step B follows the newest row while left on it."""
    try:
        if old_steps and step_b == old_steps[-1]:
            step_b = None
        c = _choices(root_of(), sel, expert, step_a, step_b)
    except data.DataError:
        return [], None, [], None, [], None
    return c["experts"], c["expert"], c["steps"], c["step_a"], c["steps"], c["step_b"]


@callback(*(Output(v.id, "figure") for v in _ALL),
          Input("sel", "data"), Input("experts-expert", "value"), Input("experts-step-a", "value"),
          Input("experts-step-b", "value"), prevent_initial_call=True)
@figures_or_message(len(_ALL), tuple(v.title for v in _ALL))
def _view(sel, expert, step_a, step_b):
    run_id = need((sel or {}).get("focus"), "run")
    v = {"run_id": run_id, "layer": need(sel.get("layer"), "layer"),
         "expert": need(expert, "expert"), "step_a": need(step_a, "step A"),
         "step_b": need(step_b, "step B")}
    return tuple(view.figure(root_of(), v) for view in _ALL)
