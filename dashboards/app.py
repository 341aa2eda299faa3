"""The Dash app: shell layout (navigation, shared selection, refresh tick) and `moe-probe dash`.

ROOT lives in the Flask config of the server, never in the browser: the `sel` store carries only
run ids, which every callback re-resolves against ROOT (`dashboards.data.resolve_run`).
Page modules register their callbacks globally (`dash.callback`); Dash hands those to the first
app built in a process, so one process serves one app (tests start the server as a subprocess).
"""

from __future__ import annotations

import functools
import os
import re
import threading
from pathlib import Path

import dash
import flask
from dash import Input, Output, Patch, State, callback, dcc, html

from dashboards import data, views
from moe_probe.modalities import MODALITIES
from moe_probe.store.reader import tune_reads
from dashboards.pages_common import root_of

_HERE = Path(__file__).parent
_app: dash.Dash | None = None


def create_app(root, refresh_s: float = 5.0) -> dash.Dash:
    """Build the app for ROOT (validated here: a missing ROOT is a usage error, exit 2)."""
    global _app
    root_p = data.check_root(root)
    if refresh_s <= 0:
        raise ValueError(f"--refresh must be > 0 seconds, got {refresh_s}")
    if _app is not None:
        if _app.server.config["MOE_PROBE_ROOT"] != str(root_p):
            raise RuntimeError("one dashboard app per process")
        return _app
    app = dash.Dash(
        __name__, use_pages=True, pages_folder=str(_HERE / "pages"),
        serve_locally=True,  # offline: Dash's own JS bundles, no CDN
        title="moe_probe", suppress_callback_exceptions=True, update_title=None,
        assets_folder=str(_HERE / "assets"),
        # vendor/ is served (Flask serves the whole folder) but not put into the page as tags:
        # plotly_loader.js loads it asynchronously; without the loader, Dash's own bundle is used.
        assets_path_ignore=["vendor"],
        assets_ignore="" if _vendored_plotly_matches() else r"plotly_loader\.js",
        # Page layouts that are functions get the shell's selection: they can hold the figures
        # of the first screen, sent with the page instead of one callback round trip later.
        routing_callback_inputs={"sel": State("sel", "data")},
    )
    app.server.config["MOE_PROBE_ROOT"] = str(root_p)
    tune_reads()
    _without_core_js(app)
    import logging
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per callback request
    # A function: evaluated per page load, so the first run and its layers are already chosen in
    # the HTML the browser gets (saves the round trips runs → focus → layers → sel before any
    # graph callback can start).
    app.layout = functools.partial(_layout, root_p, refresh_s)
    _warm_up()
    if os.environ.get("MOE_PROBE_DASH_PREWARM", "1") != "0":
        threading.Thread(target=_prewarm, args=(root_p, views.warm_paths()),
                         name="moe-probe-prewarm", daemon=True).start()
    warm_on_open = set(views.warm_paths())

    @app.server.before_request
    def _warm_on_open():
        """A browser asking for a page with views to warm (Routing) spends ~0.3-0.6 s booting
        Dash before it asks for the page's figures: read them meanwhile (a run written since
        start-up, or a server started moments ago, has nothing cached). The page's callbacks
        then find them built or being built (a view asked for twice at once is built once)."""
        if flask.request.path in warm_on_open:
            try:
                threading.Thread(target=_prewarm, args=(root_p, [flask.request.path], True),
                                 name="moe-probe-warm-on-open", daemon=True).start()
            except RuntimeError:  # no thread to be had: the callbacks read the views themselves
                pass

    _app = app
    return app


def _without_core_js(app: dash.Dash) -> None:
    """Dash puts @babel/polyfill (core-js 2 + regenerator-runtime) before its bundles, for
    browsers without ES2015+. In a current browser core-js still replaces builtins it finds
    non-conforming (String.prototype.trim among them, which plotly.js calls per label): ~60 ms
    to run and more later. Dash's bundles need only its regenerator-runtime global:
    vendor/regenerator-runtime.js is regenerator-runtime 0.14.1 from npm (MIT, licence beside
    it)."""
    runtime = app.get_asset_url("vendor/regenerator-runtime.js")
    interpolate = app.interpolate_index

    def interpolate_index(**kw):
        kw["scripts"] = re.sub(r'src="[^"]*/deps/polyfill@[^"]*"', f'src="{runtime}"',
                               kw["scripts"], count=1)
        return interpolate(**kw)

    app.interpolate_index = interpolate_index


def _vendored_plotly_matches() -> bool:
    """The vendored plotly.js must be the version plotly's Python package generates
    figures for; on a mismatch (another plotly installed) the full bundle Dash ships is used."""
    from plotly.offline import get_plotlyjs_version
    try:
        with open(_HERE / "assets" / "vendor" / "plotly-dash.min.js", encoding="utf-8") as f:
            head = f.read(200)
    except OSError:
        return False
    return f" v{get_plotlyjs_version()}\n" in head


def _warm_up() -> None:
    """Plotly imports its graph-object classes and templates lazily (~1 s on first figure); pay
    that at start-up, not in the first page a user opens."""
    from dashboards.components import add_line, heatmap, line_figure
    import numpy as np
    import plotly.io as pio
    fig = line_figure("warm-up")
    add_line(fig, np.arange(3), np.arange(3.0), "x")
    pio.to_json(fig)
    pio.to_json(heatmap(np.zeros((2, 2)), [0, 1], ["a", "b"], title="warm-up"))
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    sub = make_subplots(rows=1, cols=3)
    sub.add_trace(go.Bar(x=[0], y=[1]), row=1, col=2)
    pio.to_json(sub)


def _prewarm(root_p: Path, paths, quiet: bool = False) -> None:
    """Build the `warm` views of the pages at `paths` (the view registry) for the first run and
    layer, in the background: at start-up, and when a browser asks for such a page (`quiet`).
    On a long run they cost ~1 s of zarr decoding; the caches are versioned by committed rows,
    so what this computes is exactly what the first visitor's callbacks would (a later commit
    simply misses the cache). Best effort: any error is left for the page to report.
    MOE_PROBE_DASH_PREWARM=0 turns off the start-up warming only (the benchmark times both); a
    request for the page still warms."""
    try:
        _runs, focus, _layers, layer, _msg = _initial_selection(root_p)
        sel = _first_sel(focus, layer)
        done = [views.warm(root_p, path, sel) for path in paths]
    except Exception as e:  # noqa: BLE001 - a cache warmer must never take the server down
        if not quiet:
            print(f"prewarm skipped: {e}", flush=True)
        return
    if not quiet:
        # The benchmark waits for this line before timing a "server warmed at start" page open.
        for what, seconds in filter(None, done):
            print(f"prewarmed {what} in {seconds:.2f} s", flush=True)


def _initial_selection(root_p: Path) -> tuple[list, str | None, list, str | None, str]:
    """Runs, first run, its layers, first layer and a root message, as the refresh callbacks
    would compute them; errors leave the choice empty (the callbacks then show the message)."""
    try:
        runs = data.list_runs(root_p)
    except (OSError, ValueError) as e:
        return [], None, [], None, f"Cannot read the dashboard root: {e}"
    if not runs:
        return [], None, [], None, (f"No runs under {root_p} "
                                    "(a run is a directory holding traces.zarr).")
    try:
        layers = data.run_meta(root_p, runs[0])["layers"]
    except data.DataError:
        layers = []
    return runs, runs[0], layers, (layers[0] if layers else None), ""


def _first_sel(focus, layer) -> dict:
    """The shell's selection when a browser opens the dashboard (and what warming warms)."""
    return {"focus": focus, "runs": [], "layer": layer, "modality": "vae"}


def _layout(root_p: Path, refresh_s: float):
    runs, focus, layers, layer, msg = _initial_selection(root_p)
    nav = [dcc.Link(p["name"], href=p["relative_path"], className="nav-link",
                    id=f"nav-{p['name'].lower()}")
           for p in dash.page_registry.values()]
    return html.Div([
        dcc.Location(id="url"),
        # Shared selection of every page. Root is for display only; the server uses its own.
        dcc.Store(id="sel", storage_type="memory",
                  data={"root": str(root_p), **_first_sel(focus, layer)}),
        dcc.Interval(id="tick", interval=int(refresh_s * 1000), n_intervals=0),
        # Committed rows per group of the runs in view; changes only when a writer committed, so
        # graphs re-render on new data instead of on every tick.
        dcc.Store(id="versions", storage_type="memory", data=_versions_of([focus], root_p)),
        html.Header([
            html.Div([html.B("moe_probe"), html.Span(f" · {root_p}", className="root")],
                     className="brand"),
            html.Nav(nav, className="nav"),
            html.Div([
                html.Div([html.Label("run"), dcc.Dropdown(id="focus-run", clearable=False,
                                                          options=runs, value=focus,
                                                          style={"width": "260px"})],
                         className="control"),
                html.Div([html.Label("layer"), dcc.Dropdown(id="layer", clearable=False,
                                                            options=layers, value=layer,
                                                            style={"width": "90px"})],
                         className="control"),
                html.Div([html.Label("modality"),
                          dcc.RadioItems(id="modality", options=list(MODALITIES),
                                         value="vae", inline=True)], className="control"),
            ], className="controls"),
            html.Div(msg, id="root-msg", className="root-msg"),
        ]),
        html.Main(dash.page_container),
    ])


# The shell's callbacks skip their initial call: `_layout` already computed what they would, and
# each would otherwise be one more round trip in the chain runs → layers → sel → versions that
# every graph callback of the page waits for.
@callback(Output("focus-run", "options"), Output("focus-run", "value"), Output("root-msg", "children"),
          Input("tick", "n_intervals"), Input("url", "pathname"), State("focus-run", "value"),
          State("focus-run", "options"), State("root-msg", "children"), prevent_initial_call=True)
def _refresh_runs(_n, _path, current, old_opts, old_msg):
    """Re-list runs on each tick: runs appear and disappear while the dashboard is open.
    Unchanged outputs are not re-sent: setting a prop, even to the same value, re-fires every
    callback downstream of it (and would reset zoomed graphs every tick)."""
    try:
        runs = data.list_runs(root_of())
        msg = "" if runs else f"No runs under {root_of()} (a run is a directory holding traces.zarr)."
    except (OSError, ValueError) as e:
        runs, msg = [], f"Cannot read the dashboard root: {e}"
    value = current if current in runs else (runs[0] if runs else None)
    return (dash.no_update if runs == old_opts else runs,
            dash.no_update if value == current else value,
            dash.no_update if msg == (old_msg or "") else msg)


@callback(Output("layer", "options"), Output("layer", "value"),
          Output("modality", "options"), Output("modality", "value"),
          Input("focus-run", "value"), Input("tick", "n_intervals"), State("layer", "value"),
          State("layer", "options"), State("modality", "value"), State("modality", "options"),
          prevent_initial_call=True)
def _layers(run_id, _n, current, old_opts, mod, old_mods):
    """Layers and modalities of the focused run (an HF scan labels its token kinds by input
    file, `text`/`text_b`, not text/vit/vae)."""
    layers, mods = [], list(MODALITIES)
    if run_id:
        try:
            meta = data.run_meta(root_of(), run_id)
            layers, mods = meta["layers"], meta["modalities"]
        except data.DataError:
            pass
    value = current if current in layers else (layers[0] if layers else None)
    mvalue = mod if mod in mods else ("vae" if "vae" in mods else mods[-1])
    return (dash.no_update if layers == old_opts else layers,
            dash.no_update if value == current else value,
            dash.no_update if mods == old_mods else mods,
            dash.no_update if mvalue == mod else mvalue)


@callback(Output("sel", "data"), Input("focus-run", "value"), Input("layer", "value"),
          Input("modality", "value"), State("sel", "data"), prevent_initial_call=True)
def _sync_sel(run_id, layer, modality, sel):
    sel = sel or {}
    if (sel.get("focus"), sel.get("layer"), sel.get("modality")) == (run_id, layer, modality):
        return dash.no_update
    p = Patch()
    p["focus"], p["layer"], p["modality"] = run_id, layer, modality
    return p


@callback(Output("versions", "data"), Input("tick", "n_intervals"), Input("sel", "data"),
          State("versions", "data"), prevent_initial_call=True)
def _versions(_n, sel, old):
    sel = sel or {}
    new = _versions_of([sel.get("focus"), *(sel.get("runs") or [])])
    return dash.no_update if new == old else new


def _versions_of(run_ids, root=None) -> dict:
    new = {}
    for rid in dict.fromkeys(r for r in run_ids if r):
        try:
            new[rid] = data.committed(root or root_of(), rid)
        except data.DataError as e:
            new[rid] = str(e)  # a vanished run is a change too: pages then show the message
    return new


def serve(args) -> int:
    """`moe-probe dash [ROOT] [--host] [--port] [--refresh]`; bad input → ValueError (exit 2)."""
    if not (0 < int(args.port) < 65536):
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    app = create_app(args.root, float(args.refresh))
    # Dash sets itself up on the first request it serves (layout validation, asset scan,
    # callback map: ~0.3 s on the large store); pay that here, not in the first visitor's page.
    r = app.server.test_client().get("/_dash-layout")
    if r.status_code != 200:
        raise RuntimeError(f"the dashboard cannot build its layout (HTTP {r.status_code}); "
                           "see the log above")
    print(f"moe_probe dashboard for {app.server.config['MOE_PROBE_ROOT']} "
          f"on http://{args.host}:{args.port}/", flush=True)
    app.run(host=args.host, port=int(args.port), debug=False)
    return 0
