"""Glue shared by the page modules: registration, the first screen, the server's ROOT, zooms
and error-to-message handling."""

from __future__ import annotations

import functools
import logging

import flask

import dash
from dash import ClientsideFunction, Input, Output, State, clientside_callback, ctx, dcc

from dashboards.views import PAGES, Page, add_page
from dashboards.components import graph, message_figure
from dashboards.data import DataError

log = logging.getLogger("moe_probe.dashboards")


def root_of() -> str:
    """ROOT of the app serving this request (set by `create_app`, never taken from the client)."""
    return flask.current_app.config["MOE_PROBE_ROOT"]


def register_page(module: str, *, path: str, name: str, order: int, values, views=()) -> None:
    """Register a page module (call at its import): with Dash, its views with the registry
    (`dashboards.views`, `values` as `Page.values`), and the gate of its first screen: a
    clientside callback that writes `after_first_screen(path)` once the browser has drawn the
    first screen's graphs (assets/clientside.js, `drawn`, which gives up waiting after 10 s)."""
    dash.register_page(module, path=path, name=name, order=order)
    add_page(Page(path=path, name=name, values=values, views=tuple(views)))
    clientside_callback(ClientsideFunction("moe_probe", "drawn"), Output(_gate(path), "data"),
                        Input(_gate(path) + "-graphs", "data"))
    clientside_callback(ClientsideFunction("moe_probe", "stale"),
                        Output(_gate(path) + "-stale", "data"),
                        Input(_gate(path) + "-built", "data"), State("sel", "data"))


def _gate(path: str) -> str:
    return f"{PAGES[path].name.lower()}-fold"


def first_screen(path: str, sel) -> tuple[dict, list]:
    """The first screen of the page at `path` for the selection `sel` (the shell's store, which
    the pages router passes to a layout function, see app.py): ({view id: its dcc.Graph}, the
    gate's stores). Its figures are built here, so they arrive with the page itself: no callback
    round trip and no placeholder drawn first; their callbacks (prevent_initial_call, and
    `opened_with_page`) only answer later changes, `first_screen_stale(path)` among them.
    Views below the fold take `after_first_screen(path)` as an Input: on a first visit their
    requests, server work and drawing would otherwise compete with the first screen for the
    CPU."""
    page = PAGES[path]
    first = [v for v in page.views if v.first_screen]
    root = root_of()
    figs = {}
    try:
        values = page.values(root, sel)
    except Exception as e:  # noqa: BLE001 - as figures_or_message: the page shows it
        values = e
    for v in first:
        try:
            if isinstance(values, Exception):
                raise values
            figs[v.id] = v.figure(root, values)
        except Exception as e:  # noqa: BLE001 - one view's error hides no other view
            figs[v.id] = message_figure(_message(e, v.id), v.title)
    stores = [dcc.Store(id=_gate(path) + "-graphs", data=[v.id for v in first]),
              dcc.Store(id=_gate(path), data=None),
              dcc.Store(id=_gate(path) + "-built", data=sel),
              dcc.Store(id=_gate(path) + "-stale", data=None)]
    return {i: graph(i, f) for i, f in figs.items()}, stores


def first_screen_stale(path: str) -> Input:
    """An Input of the callbacks of the first screen of the page at `path`: written when the
    selection changed while the page was on its way (assets/clientside.js, `stale`)."""
    return Input(_gate(path) + "-stale", "data")


def after_first_screen(path: str) -> Input:
    """The Input that views below the first screen of the page at `path` wait for."""
    return Input(_gate(path), "data")


def _message(e: Exception, where: str) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not isinstance(e, DataError):
        # unexpected: keep the page usable, but leave the trace in the server log
        log.warning("%s failed: %s", where, msg, exc_info=True)
    return msg


def figures_or_message(n_figs: int, titles: tuple[str, ...] = ()):
    """Decorate a callback returning `n_figs` figures: a run that vanished, a group without rows
    yet, a half-written store... become message figures instead of a callback error, so a page
    watching a live run never shows Dash's error overlay."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a live store can fail in many ways mid-read
                msg = _message(e, fn.__name__)
                figs = [message_figure(msg, titles[i] if i < len(titles) else "")
                        for i in range(n_figs)]
                return figs[0] if n_figs == 1 else tuple(figs)
        return wrapper

    return deco


def opened_with_page(*zoom_ids: str) -> bool:
    """Whether this run of a callback is Dash's call for a page just opened, whose layout
    already built what the callback would (`first_screen`, the dropdowns' choices). Dash fires a
    callback when one of its Inputs arrives with a new page, prevent_initial_call or not: here
    the page's stale store (`first_screen_stale`) and its zoom stores `zoom_ids`, all empty on a
    page open. A real zoom (even back to all steps) writes a dict into its store, and a stale
    first screen a time into the stale store: those are changes to answer."""
    arrive = {f"{i}.data" for i in zoom_ids} | {f"{_gate(p)}-stale.data" for p in PAGES}
    trig = [t for t in ctx.triggered if t["prop_id"] != "."]
    return all(t["prop_id"] in arrive and t["value"] is None for t in trig)


def need(value, what: str):
    if value in (None, "", []):
        raise DataError(f"select a {what}")
    return value


def zoom_callback(store_id: str, *graph_ids: str) -> None:
    """Keep the zoom of a view drawn by `graph_ids` (zooming any of them zooms the view) in the
    store `zoom_store(store_id)`: the browser writes `{"range": [lo, hi] | None, "sel":
    <selection then>}` to it when a graph's visible x range changes (assets/clientside.js: redraws,
    legend clicks and y zooms never reach the server). The view's callback takes the store as
    an Input and reads it with `zoom_range`. Call at import time (Dash collects callbacks
    before the first request), the store goes into the page's layout."""
    clientside_callback(ClientsideFunction("moe_probe", "zoom"), Output(store_id, "data"),
                        *(Input(g, "relayoutData") for g in graph_ids), State("sel", "data"),
                        prevent_initial_call=True)


def zoom_store(store_id: str) -> dcc.Store:
    """The store of `zoom_callback(store_id, ...)`; empty (all steps) on every page open."""
    return dcc.Store(id=store_id, data=None)


def zoom_range(zoom, sel, key_of) -> list | None:
    """The step range to show for selection `sel`: the stored zoom if it was made for the same
    key (`key_of(sel)`: run, layer...), else None (all steps)."""
    if not zoom or key_of(zoom.get("sel") or {}) != key_of(sel or {}):
        return None
    return zoom.get("range")
