"""Glue shared by the page modules: the server's ROOT and error-to-message handling."""

from __future__ import annotations

import functools
import logging

import flask

from dash import ClientsideFunction, Input, Output, State, clientside_callback, ctx, dcc

from dashboards.components import message_figure
from dashboards.data import DataError

log = logging.getLogger("moe_probe.dashboards")


def root_of() -> str:
    """ROOT of the app serving this request (set by `create_app`, never taken from the client)."""
    return flask.current_app.config["MOE_PROBE_ROOT"]


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
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                if not isinstance(e, DataError):
                    # unexpected: keep the page usable, but leave the trace in the server log
                    log.warning("%s failed: %s", fn.__name__, msg, exc_info=True)
                figs = [message_figure(msg, titles[i] if i < len(titles) else "")
                        for i in range(n_figs)]
                return figs[0] if n_figs == 1 else tuple(figs)
        return wrapper

    return deco


def opened_with_page(zoom_id: str, zoom) -> bool:
    """Whether this run of a view's callback is Dash's call for a page just opened, whose layout
    already built the view's figures. Dash fires a callback when one of its Inputs arrives with
    a new page, prevent_initial_call or not: here the page's empty zoom store `zoom_id` (a real
    zoom, even back to all steps, writes a dict into it)."""
    trig = set(ctx.triggered_prop_ids)
    return not trig or (trig == {f"{zoom_id}.data"} and zoom is None)


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
