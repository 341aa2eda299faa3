"""The dashboard in a real headless chromium against fixture stores.

Values drawn in the graphs (read back from plotly's data in the page) are compared with values
read from the stores through the public reader; every test also checks the browser console.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import moe_probe
from dashboards.testing import (
    Server, need_browser, graph_data, make_driver, quit_driver, severe_logs, wait_for,
    wait_graph, zoom_x,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stores"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A writable copy of the fixture stores (the live test appends to one of them)."""
    need_browser()
    r = tmp_path_factory.mktemp("dashroot")
    for name in ("healthy", "collapse", "grad_conflict", "probe_regression", "und_only_control",
                 "live"):
        shutil.copytree(FIXTURES / name, r / name)
    return r


@pytest.fixture(scope="module")
def server(root):
    with Server(root, refresh=1.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def driver(server):
    d = make_driver()
    yield d
    quit_driver(d)


@pytest.fixture
def page(driver, server):
    """Driver with console errors checked after the test."""
    severe_logs(driver)  # drop entries of earlier tests
    yield driver
    errs = severe_logs(driver)
    assert not errs, f"browser console errors: {errs}"


def _ds(root, run, group):
    return moe_probe.open_run(root / run).dataset(group)


def _arr(v):
    return np.array([np.nan if x is None else x for x in v], dtype=float)


def _mat(z):
    return np.array([[np.nan if x is None else x for x in r] for r in z], dtype=float)


def _select(d, dropdown_id, value):
    """Pick an option of a Dash 4 dropdown the way a user does: open it, click the option."""
    d.find_element("id", dropdown_id).click()
    opt = wait_for(lambda: [o for o in d.find_elements("css selector", "[role=option]")
                            if o.text.strip() == str(value)], 10, what=f"option {value}")
    opt[0].click()


def _goto(d, server, path, focus="healthy"):
    d.get(server.url + path)
    wait_for(lambda: d.find_element("id", "focus-run").text.strip(), 30, what="run list")
    if d.find_element("id", "focus-run").text.strip() != focus:
        _select(d, "focus-run", focus)
    wait_for(lambda: d.find_element("id", "focus-run").text.strip() == focus, 10, what="focus")


def test_routing_page_draws_store_values_and_follows_layer_and_modality(page, server, root):
    d = page
    _goto(d, server, "/routing", "collapse")
    ds = _ds(root, "collapse", "routing")
    steps = ds["step"].values
    g = wait_graph(d, "routing-cap-lines", lambda g: g["title"] == "collapse · capacity rate per modality — layer 0")
    for t in g["traces"]:
        want = ds["capacity_rate"].sel(layer="0", modality=t["name"]).values
        np.testing.assert_array_equal(_arr(t["x"]), steps)
        np.testing.assert_allclose(_arr(t["y"]), want, rtol=1e-6)
    assert [t["name"] for t in g["traces"]] == ["text", "vit", "vae"]

    # layer 3 collapses for text from step ~150: the plotted text series must show it
    _select(d, "layer", "3")
    g = wait_graph(d, "routing-cap-lines", lambda g: "layer 3" in g["title"])
    text = _arr(next(t for t in g["traces"] if t["name"] == "text")["y"])
    want = ds["capacity_rate"].sel(layer="3", modality="text").values
    np.testing.assert_allclose(text, want, rtol=1e-6)
    assert text[-20:].mean() < 0.8 < text[:50].mean()

    # expert-load heat map: share of the modality's assignments per expert, expert × step
    d.find_element("css selector", "#modality input[value=text]").click()
    h = wait_graph(d, "routing-load-heat", lambda g: "layer 3, text" in g["title"])
    load = ds["load"].sel(layer="3", modality="text").values.astype(float)
    share = load / load.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(_mat(h["traces"][0]["z"]), share.T, rtol=1e-6)
    c = wait_graph(d, "routing-cap-heat", lambda g: g["title"].endswith("text"))
    np.testing.assert_allclose(_mat(c["traces"][0]["z"]),
                               ds["capacity_rate"].sel(modality="text").values.T, rtol=1e-6)

    # modality share per expert at the slider's step (defaults to the newest committed step)
    sh = wait_graph(d, "routing-share", lambda g: "layer 3" in g["title"])
    last = ds["load"].sel(layer="3").isel(step=-1).values.astype(float)  # (modality, expert)
    got = np.array([_arr(t["y"]) for t in sh["traces"]])
    np.testing.assert_allclose(got, last / last.sum(axis=0), rtol=1e-6)
    assert f"step {int(steps[-1])}" in sh["title"]

    # balance and snapshot views carry the store's numbers too
    b = wait_graph(d, "routing-balance", lambda g: "layer 3" in g["title"])
    ent = next(t for t in b["traces"] if t["name"] == "text")
    np.testing.assert_allclose(_arr(ent["y"]), ds["entropy"].sel(layer="3", modality="text").values,
                               rtol=1e-6)
    snap = _ds(root, "collapse", "snapshot")
    s = wait_graph(d, "routing-saturation", lambda g: "layer 3" in g["title"])
    np.testing.assert_allclose(_arr(s["traces"][0]["y"]), snap["saturation"].sel(layer="3").values,
                               rtol=1e-6)
    co = wait_graph(d, "routing-coact", lambda g: "layer 3" in g["title"])
    np.testing.assert_allclose(_mat(co["traces"][0]["z"]),
                               snap["coactivation"].sel(layer="3").isel(step=-1).values, rtol=1e-6)


def test_step_slider_moves_the_per_step_views(page, server, root):
    from selenium.webdriver.common.keys import Keys

    d = page
    _goto(d, server, "/routing", "healthy")
    wait_graph(d, "routing-share", lambda g: g["title"].startswith("healthy"))
    box = d.find_element("css selector", "#routing-step input[type=number]")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("120", Keys.TAB)  # the number box commits on blur
    sh = wait_graph(d, "routing-share", lambda g: g["title"].endswith("layer 0, step 120"))
    load = _ds(root, "healthy", "routing")["load"].sel(layer="0", step=120).values.astype(float)
    np.testing.assert_allclose(np.array([_arr(t["y"]) for t in sh["traces"]]),
                               load / load.sum(axis=0), rtol=1e-6)
    # snapshots are every 50 steps: the co-activation view snaps to the nearest one (100)
    co = wait_graph(d, "routing-coact", lambda g: g["title"].endswith("step 100"))
    snap = _ds(root, "healthy", "snapshot")["coactivation"].sel(layer="0", step=100).values
    np.testing.assert_allclose(_mat(co["traces"][0]["z"]), snap, rtol=1e-6)


def test_zoom_rebuckets_to_the_visible_range(page, server, root):
    d = page
    _goto(d, server, "/routing", "healthy")
    wait_graph(d, "routing-cap-lines", lambda g: g["title"].startswith("healthy"))
    # what a user's box zoom does: plotly_relayout with the new x range
    zoom_x(d, "routing-cap-lines", 100, 140)
    g = wait_graph(d, "routing-cap-lines", lambda g: max(g["traces"][0]["x"]) <= 140)
    x = _arr(g["traces"][0]["x"])
    assert x.min() >= 100 and x.max() <= 140 and len(x) == 41
    ds = _ds(root, "healthy", "routing")
    want = ds["capacity_rate"].sel(layer="0", modality="text", step=slice(100, 140)).values
    np.testing.assert_allclose(_arr(g["traces"][0]["y"]), want, rtol=1e-6)
    # the capacity heat map shows the same window, and keeps it across a modality switch
    d.find_element("css selector", "#modality input[value=text]").click()
    c = wait_graph(d, "routing-cap-heat", lambda g: g["title"].endswith("text"))
    assert _arr(c["traces"][0]["x"]).tolist() == list(range(100, 141))
    np.testing.assert_allclose(
        _mat(c["traces"][0]["z"]),
        ds["capacity_rate"].sel(modality="text", step=slice(100, 140)).values.T, rtol=1e-6)
    # a double click (autorange) shows every step again
    d.execute_script("Plotly.relayout(document.querySelector('#routing-cap-lines .js-plotly-plot'),"
                     " {'xaxis.autorange': true});")
    g = wait_graph(d, "routing-cap-lines", lambda g: max(g["traces"][0]["x"]) > 140)
    np.testing.assert_array_equal(_arr(g["traces"][0]["x"]), ds["step"].values)
    # the zoom belongs to (run, layer): another layer shows every step again
    zoom_x(d, "routing-cap-lines", 100, 140)
    wait_graph(d, "routing-cap-lines", lambda g: max(g["traces"][0]["x"]) <= 140)
    _select(d, "layer", "1")
    g = wait_graph(d, "routing-cap-lines", lambda g: g["title"].endswith("layer 1"))
    np.testing.assert_array_equal(_arr(g["traces"][0]["x"]), ds["step"].values)


_TRACE_TYPES_JS = """
const gds = [...document.querySelectorAll('.js-plotly-plot')];
if (!gds.length || gds.some(gd => !gd._fullLayout || JSON.stringify(gd.layout).includes('loading…')))
  return null;
return {traces: gds.flatMap(gd => gd.data.map((t, i) => [gd.parentElement.id,
                                                          t.type || 'scatter', gd._fullData[i].type]))};
"""


def test_every_trace_is_drawn_as_its_type(page, server):
    """The vendored bundle holds only the trace types the pages use (scripts/plotly_bundle.js).
    plotly.js draws a trace of a type it lacks as a scatter; on every page, each trace must be
    drawn as the type its figure asks for (Compare draws lines only, once runs are picked)."""
    d, seen = page, set()
    for path in ("/routing", "/conflicts", "/probes", "/live"):
        _goto(d, server, path, "probe_regression")
        traces = wait_for(lambda: d.execute_script(_TRACE_TYPES_JS), 30,
                          what=f"graphs of {path}")["traces"]
        wrong = [t for t in traces if t[1] != t[2]]
        assert not wrong, f"{path}: (graph, asked, drawn) {wrong}"
        seen |= {t[1] for t in traces}
    assert seen >= {"scatter", "bar", "heatmap"}, seen  # the check saw every type it guards


def test_pages_use_the_vendored_plotly(page, server):
    """plotly.js comes from dashboards/assets/vendor (a bundle of the trace types the pages
    draw, loaded async, and only once Dash has sent its first callback request: it must not
    hold up the renderer's boot), and Dash's full 4.8 MB bundle is never requested."""
    from plotly.offline import get_plotlyjs_version
    d = page
    _goto(d, server, "/routing", "healthy")
    wait_graph(d, "routing-cap-lines", lambda g: g["title"].startswith("healthy"))
    version, res = d.execute_script(
        "return [Plotly.version, performance.getEntriesByType('resource')"
        ".map(e => [e.name, e.startTime])];")
    assert version == get_plotlyjs_version()
    urls = [u for u, _t in res]
    assert not any("package_data/plotly.min.js" in u for u in urls)
    plotly_at = [t for u, t in res if u.endswith("/assets/vendor/plotly-dash.min.js")]
    first_callback_at = min(t for u, t in res if "_dash-update-component" in u)
    assert len(plotly_at) == 1 and plotly_at[0] >= first_callback_at, (plotly_at, first_callback_at)
    # Dash's @babel/polyfill is swapped for the regenerator-runtime its bundles use (app.py)
    assert not any("/deps/polyfill@" in u for u in urls)
    assert any(u.endswith("/assets/vendor/regenerator-runtime.js") for u in urls)


# Installed before the page's scripts: for each callback request, its outputs and whether the
# Routing page's first-screen graphs had been drawn when it was sent.
_REQUESTS_JS = """
(() => {
  window.__requests = [];
  const fetch0 = window.fetch;
  window.fetch = function (input, init) {
    if (String(input && input.url || input).includes('_dash-update-component')) {
      const drawn = ['routing-cap-lines', 'routing-cap-heat', 'routing-load-heat'].every(id => {
        const gd = document.querySelector('#' + id + ' .js-plotly-plot');
        return !!(gd && gd._fullLayout); });
      window.__requests.push([JSON.parse(init.body).output, drawn]);
      return fetch0.apply(this, arguments).then(r => {
        // what came back (outputs left as no_update are not in an answer; 204: none at all)
        r.clone().text().then(t => window.__answered.push(
          ...(t ? Object.keys(JSON.parse(t).response || {}) : [])));
        return r;
      });
    }
    return fetch0.apply(this, arguments);
  };
  window.__answered = [];
})();
"""


def _open_routing_recorded(d, server):
    """Open the Routing page with `_REQUESTS_JS` installed, until its views below the first
    screen are drawn: (each callback request's outputs and whether the first screen was drawn
    when it was sent, the component ids that came back)."""
    script = d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                               {"source": _REQUESTS_JS})["identifier"]
    try:
        d.get(server.url + "/routing")
        for gid in ("routing-balance", "routing-share", "routing-saturation"):
            wait_graph(d, gid, lambda g: g["title"].startswith("collapse"))  # the first run
        time.sleep(0.5)  # answers still on their way
        return d.execute_script("return [window.__requests, window.__answered];")
    finally:
        d.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script})


def test_views_below_the_first_screen_wait_until_it_is_drawn(page, server):
    """On the Routing page, the views below the first screen (balance, per step, saturation)
    are requested only once the first screen's graphs are drawn, so that on a first visit they
    do not compete with it for the CPU; then they are drawn too."""
    requests, _answered = _open_routing_recorded(page, server)
    below = [(out, drawn) for out, drawn in requests
             if any(g in out for g in ("routing-balance", "routing-share", "routing-saturation"))]
    assert len(below) >= 3, requests
    assert all(drawn for _out, drawn in below), below


def test_a_page_open_does_not_send_its_first_screen_twice(page, server):
    """The first screen comes with the page's layout; the callbacks Dash fires for the page's
    stores arriving with it must not build and send those figures again (a second transfer and
    redraw, which slowed every page open)."""
    _requests, answered = _open_routing_recorded(page, server)
    assert {"routing-balance", "routing-share"} <= set(answered), answered
    first = {"routing-cap-lines", "routing-cap-heat", "routing-load-heat"}
    assert not first & set(answered), answered


_WIDTHS_JS = """
return [...document.querySelectorAll('.js-plotly-plot')].map(gd => [gd.parentElement.id,
  parseFloat(getComputedStyle(gd).width), gd._fullLayout && gd._fullLayout.width]);
"""


def test_graphs_fit_their_box_after_a_window_resize(page, server):
    """Graphs that already fit their box skip plotly's re-plot after the first draw
    (assets/plotly_loader.js); every graph still follows a change of the window's width."""
    d = page
    _goto(d, server, "/routing", "healthy")
    for gid in ("routing-cap-lines", "routing-load-heat", "routing-balance"):
        wait_graph(d, gid, lambda g: g["title"].startswith("healthy"))
    try:
        for width in (1400, 1000):
            d.set_window_size(width, 1000)
            fits = lambda: (w := d.execute_script(_WIDTHS_JS)) and all(
                abs(c - f) <= 1 for _id, c, f in w) and w
            widths = wait_for(fits, 10, what=f"graphs fitted to a {width} px window")
            assert len(widths) == 7
        assert dict((i, f) for i, _c, f in widths)["routing-load-heat"] < 1000  # it shrank
    finally:
        d.set_window_size(1400, 1000)


def test_conflicts_page_cosine_heatmap_and_norm_ratio(page, server, root):
    d = page
    _goto(d, server, "/conflicts", "grad_conflict")
    ds = _ds(root, "grad_conflict", "grad")
    _select(d, "conflicts-component", "attn")
    h = wait_graph(d, "conflicts-cosine",
                   lambda g: g["title"].startswith("grad_conflict") and g["title"].endswith("attn"))
    want = ds["cosine"].sel(component="attn").values.T  # layer × step
    np.testing.assert_allclose(_mat(h["traces"][0]["z"]), want, rtol=1e-6)
    r = wait_graph(d, "conflicts-ratio",
                   lambda g: g["title"].startswith("grad_conflict") and "attn" in g["title"])
    t = next(t for t in r["traces"] if t["name"] == "layer 0")
    sel = ds.sel(layer="0", component="attn")
    np.testing.assert_allclose(_arr(t["y"]), sel["norm_gen"].values / sel["norm_und"].values,
                               rtol=1e-5)
    # planted conflict: after step 100 the gen gradient is ~10× the und one
    assert np.nanmedian(_arr(t["y"])[_arr(t["x"]) >= 100]) > 5
    # zooming the ratio zooms the heat map too: both re-read for the visible steps
    zoom_x(d, "conflicts-ratio", 100, 200)
    h = wait_graph(d, "conflicts-cosine", lambda g: max(g["traces"][0]["x"]) <= 200)
    x = _arr(h["traces"][0]["x"])
    assert x.min() >= 100 and x.max() <= 200
    np.testing.assert_allclose(_mat(h["traces"][0]["z"]),
                               ds["cosine"].sel(component="attn", step=slice(100, 200)).values.T,
                               rtol=1e-6)


def test_probes_page_with_control_overlay(page, server, root):
    d = page
    _goto(d, server, "/probes", "probe_regression")
    ds = _ds(root, "probe_regression", "probe")
    task = str(ds["task"].values[0])
    g = wait_graph(d, "probes-lines", lambda g: g["title"].startswith("probe_regression") and task in g["title"])
    acc = [t for t in g["traces"] if t["name"] == "layer 1"]
    assert len(acc) == 2  # accuracy and selectivity panels
    np.testing.assert_allclose(_arr(acc[0]["y"]), ds["accuracy"].sel(layer="1", task=task).values,
                               rtol=1e-6)
    np.testing.assert_allclose(_arr(acc[1]["y"]), ds["selectivity"].sel(layer="1", task=task).values,
                               rtol=1e-6)
    # the understanding-only control is overlaid by default (named like a control run)
    iso = wait_graph(d, "probes-isolated",
                     lambda g: g["title"].startswith("probe_regression") and any(t["name"].startswith("und_only_control") for t in g["traces"]))
    ctl = _ds(root, "und_only_control", "probe")
    m = str(ctl["metric"].values[0])
    t = next(t for t in iso["traces"] if t["name"] == f"und_only_control · {m}")
    np.testing.assert_allclose(_arr(t["y"]), ctl["isolated"].sel(metric=m).values, rtol=1e-6)


def test_runs_page_verdicts_and_compare_overlay(page, server, root):
    d = page
    d.get(server.url + "/")
    # one JS read of the whole table: cells as [text, data-value] per row; verdicts that took
    # longer than the page waits for show as pending and fill in on a later refresh
    rows = wait_for(lambda: (r := d.execute_script(
        "return Array.from(document.querySelectorAll('#runs-tbl tbody tr')).map(r =>"
        " Array.from(r.querySelectorAll('td')).map(c => [c.innerText, c.dataset.value || null]))"))
        and not any("diagnosing" in c[0] for row in r for c in row) and r, 60, what="verdicts")
    assert [r[0][0] for r in rows] == sorted(p.name for p in root.iterdir())
    text = {r[0][0]: " ".join(c[0] for c in r) for r in rows}
    assert "routing_collapse" in text["collapse"] and "gradient_conflict" in text["grad_conflict"]
    assert text["healthy"].endswith("ok")
    # last capacity rate per modality = mean over layers of the last committed row
    ds = _ds(root, "collapse", "routing")
    row = next(r for r in rows if r[0][0] == "collapse")
    for cell, m in zip(row[4:7], ("text", "vit", "vae")):
        want = float(np.nanmean(ds["capacity_rate"].sel(modality=m).isel(step=-1).values))
        assert float(cell[1]) == pytest.approx(want, rel=1e-6)

    for name in ("collapse", "healthy"):
        d.find_element("css selector", f"#runs-pick input[value={name}]").click()
    d.find_element("id", "nav-compare").click()  # client-side navigation keeps the selection
    g = wait_graph(d, "compare-capacity", lambda g: {t["name"] for t in g["traces"]} ==
                   {"collapse", "healthy"})
    for t in g["traces"]:
        cap = _ds(root, t["name"], "routing")["capacity_rate"]
        # three panels (text, vit, vae) hold one trace per run each, in that order
        i = [u for u in g["traces"] if u["name"] == t["name"]].index(t)
        m = ("text", "vit", "vae")[i]
        np.testing.assert_allclose(_arr(t["y"]), np.nanmean(cap.sel(modality=m).values, axis=1),
                                   rtol=1e-5)
    lo = wait_graph(d, "compare-loss", lambda g: len(g["traces"]) == 2)
    for t in lo["traces"]:
        want = _ds(root, t["name"], "loss")["value"].sel(term="gen").values
        np.testing.assert_allclose(_arr(t["y"]), want, rtol=1e-6)
    iso = wait_graph(d, "compare-isolated", lambda g: len(g["traces"]) == 2)
    assert {t["name"] for t in iso["traces"]} == {"collapse", "healthy"}
    # zoom the loss: re-read for the visible steps; the capacity view keeps all of them
    zoom_x(d, "compare-loss", 50, 80)
    lo = wait_graph(d, "compare-loss", lambda g: max(g["traces"][0]["x"]) <= 80)
    for t in lo["traces"]:
        want = _ds(root, t["name"], "loss")["value"].sel(term="gen", step=slice(50, 80)).values
        np.testing.assert_allclose(_arr(t["y"]), want, rtol=1e-6)
    g = graph_data(d, "compare-capacity")
    assert min(g["traces"][0]["x"]) == 0


def test_live_run_appends_and_runs_come_and_go(page, server, root):
    """A writer appends to `live` while the page refreshes: new committed steps appear, garbage
    rows past the marker never do; a run directory appearing/disappearing is no error."""
    from moe_probe.run import store_path
    from moe_probe.store import StoreWriter

    d = page
    _goto(d, server, "/routing", "live")
    before = _ds(root, "live", "routing")
    last = int(before["step"].values[-1])
    g = wait_graph(d, "routing-cap-lines", lambda g: g["title"].startswith("live"))
    assert max(g["traces"][0]["x"]) == last
    assert np.nanmax(_arr(g["traces"][0]["y"])) < 2  # no GARBAGE (1e9) past the marker

    writer, _ = StoreWriter.resume(store_path(root / "live"))
    L, M, E = (before.sizes[k] for k in ("layer", "modality", "expert"))
    try:
        for s in range(last + 1, last + 6):
            load = np.full((L, M, E), 10, np.int32)
            writer.append("routing", s, tokens=np.full((L, M), 40, np.int32),
                          kept=np.full((L, M), 80.0, np.float32),
                          capacity_rate=np.full((L, M), 0.5, np.float32),
                          entropy=np.ones((L, M), np.float32), maxvio=np.zeros((L, M), np.float32),
                          dead_frac=np.zeros((L, M), np.float32),
                          confidence=np.full((L, M), 0.3, np.float32), load=load,
                          router_z=np.ones(L, np.float32))
            writer.flush()
            time.sleep(0.4)  # appends land between refreshes
    finally:
        writer.close()
    g = wait_graph(d, "routing-cap-lines", lambda g: max(g["traces"][0]["x"]) == last + 5, 30)
    y = _arr(g["traces"][0]["y"])
    assert list(y[-5:]) == [0.5] * 5

    # a run appears, then disappears, while pages refresh
    shutil.copytree(root / "healthy", root / "newcomer")
    d.find_element("id", "nav-live").click()
    wait_for(lambda: "newcomer" in d.find_element("id", "live-tbl").text, 30, what="new run")
    shutil.rmtree(root / "newcomer")
    wait_for(lambda: "newcomer" not in d.find_element("id", "live-tbl").text, 30, what="gone")
    live_row = wait_for(lambda: [r for r in d.find_elements("css selector", "#live-tbl tr")
                                 if r.text.startswith("live ")], 10, what="live row")
    assert str(last + 5) in live_row[0].text


def test_a_watched_hf_trainer_run_is_shown_while_it_trains(page, server, root):
    """A real HF Trainer run with TraceCallback (its own process, tests/_hf_live.py) writes a
    new run under the dashboard's root: the Live table lists it while it trains, and the Routing
    page then draws every committed step with the store's values."""
    import subprocess
    import sys

    d, steps = page, 60
    script = Path(__file__).with_name("_hf_live.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(root / "hf-live"), str(steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        d.get(server.url + "/live")

        def row_while_training():
            rows = [r.text for r in d.find_elements("css selector", "#live-tbl tr")
                    if r.text.startswith("hf-live ")]
            last = rows and rows[0].split()[-1]
            assert proc.poll() is None, "training ended before the dashboard showed a row"
            return int(last) if last and last.isdigit() else None

        seen = wait_for(row_while_training, 120, interval=0.3, what="hf-live row while training")
        assert 0 < seen < steps
        assert proc.wait(120) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    _goto(d, server, "/routing", "hf-live")
    g = wait_graph(d, "routing-cap-lines", lambda g: g["title"].startswith("hf-live")
                   and max(g["traces"][0]["x"]) == steps, 60)
    layer = g["title"].rsplit("layer ", 1)[1]
    ds = _ds(root, "hf-live", "routing")
    np.testing.assert_array_equal(ds["step"].values, np.arange(1, steps + 1))
    assert sorted(t["name"] for t in g["traces"]) == ["even", "odd"]
    for t in g["traces"]:
        np.testing.assert_array_equal(_arr(t["x"]), ds["step"].values)
        np.testing.assert_allclose(_arr(t["y"]), ds["capacity_rate"].sel(
            layer=layer, modality=t["name"]).values, rtol=1e-6)
    shutil.rmtree(root / "hf-live")  # the other tests' run lists stay as they were


def test_empty_and_vanishing_root_show_a_message(tmp_path):
    need_browser()
    empty = tmp_path / "empty"
    empty.mkdir()
    with Server(empty, refresh=0.5) as srv:
        d = make_driver()
        try:
            d.get(srv.url + "/routing")
            msg = wait_for(lambda: d.find_element("id", "root-msg").text, 30, what="message")
            assert "No runs under" in msg
            empty.rmdir()
            wait_for(lambda: "Cannot read the dashboard root" in
                     d.find_element("id", "root-msg").text, 30, what="vanished-root message")
            # page still there, no crash (the empty figure may be drawn after the message)
            wait_for(lambda: graph_data(d, "routing-cap-lines") is not None, 30,
                     what="routing graph still drawn")
            assert not severe_logs(d)
        finally:
            quit_driver(d)


def test_a_remote_root_serves_its_runs(tmp_path):
    """`moe-probe dash s3://bucket/runs`: runs read from a local S3 server draw the same numbers
    as the local stores, and the Runs page diagnoses them."""
    need_browser()
    if not os.environ.get("CI"):  # the test extra has it: CI runs this test
        pytest.importorskip("moto")
    from fixtures.s3server import S3Server

    with S3Server() as s3:
        for name in ("collapse", "healthy"):
            s3.put(FIXTURES / name, f"s3://moe/runs/{name}")
        with Server("s3://moe/runs", refresh=1.0, env=s3.env) as srv:
            d = make_driver()
            try:
                _goto(d, srv, "/routing", "collapse")
                ds = _ds(FIXTURES, "collapse", "routing")
                g = wait_graph(d, "routing-cap-lines", lambda g: g["title"].startswith("collapse"))
                np.testing.assert_array_equal(_arr(g["traces"][0]["x"]), ds["step"].values)
                for t in g["traces"]:
                    want = ds["capacity_rate"].sel(layer="0", modality=t["name"]).values
                    np.testing.assert_allclose(_arr(t["y"]), want, rtol=1e-6)
                h = wait_graph(d, "routing-load-heat", lambda g: "layer 0" in g["title"])
                load = ds["load"].sel(layer="0", modality="vae").values.astype(float)
                np.testing.assert_allclose(_mat(h["traces"][0]["z"]),
                                           (load / load.sum(axis=1, keepdims=True)).T, rtol=1e-6)
                d.get(srv.url + "/")
                text = wait_for(lambda: (t := d.find_element("id", "runs-tbl").text)
                                and "diagnosing" not in t and t, 60, what="verdicts")
                assert "routing_collapse" in text and "healthy" in text
                assert not severe_logs(d)
            finally:
                quit_driver(d)
