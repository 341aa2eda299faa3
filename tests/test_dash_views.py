"""The view registry (dashboards/views.py): every registered view builds with its named
arguments on fixture stores, every graph of a page is a registered view, and warming (at
start-up and when a browser asks for a page) builds exactly what the page's callbacks ask for.

The app is built in this process (pages register only into an app); one app per process."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from dash import dcc

from dashboards import cache, views
from fixtures.tokens import build_tokens

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stores"
SEL = {"focus": "healthy", "layer": "1", "modality": "vit", "runs": ["healthy", "collapse"]}
TOKENS_SEL = {**SEL, "focus": "tokens"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewsroot")
    for name in ("healthy", "collapse", "und_only_control"):
        shutil.copytree(FIXTURES / name, root / name)
    build_tokens(root / "tokens", takeover=True)  # the Experts page needs token-level routing
    old = os.environ.get("MOE_PROBE_DASH_PREWARM")
    os.environ["MOE_PROBE_DASH_PREWARM"] = "0"  # start-up warming is timed by the benchmark
    try:
        from dashboards.app import create_app
        yield create_app(root)
    finally:
        if old is None:
            os.environ.pop("MOE_PROBE_DASH_PREWARM")
        else:
            os.environ["MOE_PROBE_DASH_PREWARM"] = old


def _root(app):
    return app.server.config["MOE_PROBE_ROOT"]


def _graph_ids(component) -> list[str]:
    if isinstance(component, dcc.Graph):
        return [component.id]
    kids = getattr(component, "children", None)
    kids = kids if isinstance(kids, (list, tuple)) else [kids] if kids is not None else []
    return [i for k in kids for i in _graph_ids(k)]


def test_every_registered_view_builds_with_its_named_arguments(app):
    root = _root(app)
    assert set(views.PAGES) == {"/", "/routing", "/conflicts", "/probes", "/compare", "/live",
                                "/experts"}
    built = 0
    for page in views.PAGES.values():
        values = page.values(root, TOKENS_SEL if page.path == "/experts" else SEL)
        for v in page.views:
            fig = v.figure(root, values)
            assert fig.data, f"{v.id}: {fig.layout.annotations}"  # data, not a message
            built += 1
    assert built == len(views.VIEWS) == 21


def test_every_graph_of_a_page_is_a_registered_view_of_it(app):
    import dash
    for entry in dash.page_registry.values():
        page = views.PAGES[entry["path"]]
        with app.server.test_request_context(entry["path"]):
            layout = entry["layout"](sel=SEL) if callable(entry["layout"]) else entry["layout"]
        assert sorted(_graph_ids(layout)) == sorted(v.id for v in page.views), entry["path"]


def test_view_arguments_that_do_not_fit_the_builder_fail_at_registration():
    from dashboards.figures import routing as R
    with pytest.raises(ValueError, match="do not fit capacity_lines"):
        views.View(id="x", build=R.capacity_lines, args=("run", "layer"), title="t")


def _warm_threads():
    return [t for t in threading.enumerate() if t.name == "moe-probe-warm-on-open"]


def _callback(client, outputs, inputs):
    """Ask the server for the figures of a callback, as the browser does after a change of
    `sel`; the figures' titles."""
    outs = [{"id": o, "property": "figure"} for o in outputs]
    body = {"output": ("..{}.." if len(outputs) > 1 else "{}").format(
                "...".join(f"{o}.figure" for o in outputs)),
            "outputs": outs if len(outputs) > 1 else outs[0],
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
            "changedPropIds": ["sel.data"], "state": []}
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200, r.data[:300]
    return [r.json["response"][o]["figure"]["layout"]["title"]["text"] for o in outputs]


def test_opening_a_page_warms_what_its_callbacks_then_ask_for(app):
    """A browser's request for the Routing page warms its `warm` views through the registry
    (for the selection a fresh page gets); the page's callbacks then find every one of them
    cached: no new cache entries."""
    client = app.server.test_client()
    cache.clear_all()
    assert client.get("/conflicts").status_code == 200  # nothing to warm there
    assert not _warm_threads() and len(views._figures) == 0
    assert client.get("/routing").status_code == 200
    for t in _warm_threads():
        t.join(60)
    warm = [v.id for v in views.PAGES["/routing"].views if v.warm]
    assert len(views._figures) == len(warm) == 4
    sel = client.get("/_dash-layout").json  # the shell's selection as the browser gets it
    sel = next(c for c in _walk(sel) if c.get("props", {}).get("id") == "sel")["props"]["data"]
    assert sel["focus"] == "collapse"  # the first run
    versions = {"collapse": {}}
    titles = _callback(client, ["routing-cap-lines", "routing-cap-heat"],
                       [("sel", "data", sel), ("versions", "data", versions),
                        ("routing-zoom-cap", "data", None), ("routing-fold-stale", "data", None)])
    titles += _callback(client, ["routing-load-heat"],
                        [("sel", "data", sel), ("versions", "data", versions),
                         ("routing-zoom-load", "data", None),
                         ("routing-fold-stale", "data", None)])
    titles += _callback(client, ["routing-balance"],
                        [("sel", "data", sel), ("versions", "data", versions),
                         ("routing-zoom-bal", "data", None), ("routing-fold", "data", True)])
    assert all(t.startswith("collapse") for t in titles), titles
    assert len(views._figures) == 4  # all hits


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)
