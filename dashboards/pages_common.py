"""Glue shared by the page modules: the server's ROOT and error-to-message handling."""

from __future__ import annotations

import functools
import logging

import flask

from dash import ctx
from dash.exceptions import PreventUpdate

from dashboards.bucketing import zoom_range
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


def need(value, what: str):
    if value in (None, "", []):
        raise DataError(f"select a {what}")
    return value


def next_zoom(relayouts: dict, zoom, key) -> dict:
    """`{"key", "range"}`: the step range a zoomable view shows after this callback (None: all
    steps). `relayouts` maps the view's graph ids to their relayoutData (zooming any of them
    zooms the view); `zoom` is what it showed, for `key` (run, layer...; another key resets
    it). A relayout that leaves the range as it was (every draw reports one: autosize, legend
    clicks, y zooms) raises PreventUpdate: re-sending the figures would redraw for nothing."""
    zoom = zoom or {}
    current = zoom.get("range") if zoom.get("key") == key else None
    if ctx.triggered_id not in relayouts:
        return {"key": key, "range": current}
    rng = zoom_range(relayouts[ctx.triggered_id], current)
    if rng == current and zoom.get("key") == key:
        raise PreventUpdate
    return {"key": key, "range": rng}
