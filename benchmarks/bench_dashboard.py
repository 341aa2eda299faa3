"""Dashboard speed on a LARGE store (50k steps × 32 layers × 3 modalities × 64 experts).

    python benchmarks/bench_dashboard.py [--store ROOT] [--steps 50000] [--browser]

Without --store the store is generated into a temporary directory with the fixtures generator
(minutes; never committed). Times, measured once each in this run and printed (no assertions):

* first paint: every callback of a page (data path + figure building + JSON encoding, i.e. what
  the server does before the browser can draw), with cold caches, as a fresh page open does;
* slider answer: the per-step views at another step; zoom answer: the time-series views re-read
  and re-bucketed for a 5k-step window;
* with --browser: the same page opened in headless chromium, timed until the first graph, the
  graphs of the first screen and all graphs hold the run's data, in four situations side by
  side (median of --browser-rounds): a server that warmed the first run's Routing views at
  start (`MOE_PROBE_DASH_PREWARM`, on by default; the wait for its log line is printed) with a
  browser that never saw the dashboard; a reopen; and a server without warming, with a warm
  and with a fresh browser.
Targets from the issue: first paint < 1 s, slider/zoom answer < 300 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plotly.io as pio  # noqa: E402

from dashboards import cache, data, views  # noqa: E402


def _cold():
    """Forget every cached dataset/slice/figure, as a freshly started server has none."""
    cache.clear_all()


def _view(view_id, root, **values):
    """A view built as the page's callbacks build it: through the registry (and its cache)."""
    return lambda: views.VIEWS[view_id].figure(root, values)


def _time(label, fn, results):
    t0 = time.perf_counter()
    fig = fn()
    t1 = time.perf_counter()
    n = len(pio.to_json(fig)) if hasattr(fig, "to_plotly_json") else 0
    t2 = time.perf_counter()
    results.append((label, t1 - t0, t2 - t1, n))
    return t2 - t0


def _report(title, results, total_wall):
    print(f"\n{title}")
    for label, dt, js, n in results:
        print(f"  {label:34s} data+figure {dt*1000:7.1f} ms   json {js*1000:6.1f} ms   {n/1e6:5.2f} MB")
    print(f"  {'sum of callbacks':34s} {sum(r[1] + r[2] for r in results)*1000:7.1f} ms"
          f"   (wall {total_wall*1000:.1f} ms, serial)")


def _routing_callbacks(root, rid, layer):
    """What the Routing page's callbacks compute on open (no zoom, slider at the newest step)."""
    at = dict(run_id=rid, layer=layer, modality="vae", xrange=None, step=None)
    return [
        ("run meta (layers, steps)", lambda: data.run_meta(root, rid)),
        ("capacity lines (layer, 3 mod.)", _view("routing-cap-lines", root, **at)),
        ("capacity heat map (layer×step)", _view("routing-cap-heat", root, **at)),
        ("expert load heat map", _view("routing-load-heat", root, **at)),
        ("modality share at step", _view("routing-share", root, **at)),
        ("co-activation at step", _view("routing-coact", root, **at)),
        ("balance (3 metrics × 3 mod.)", _view("routing-balance", root, **at)),
        ("saturation", _view("routing-saturation", root, **at)),
    ]


def routing_first_paint(root, rid, layer, verbose=True):
    """Every callback of the Routing page, first with cold caches (a fresh page open on a fresh
    server), then again with the caches that first pass filled (a revisit, a second tab, or a
    server that warmed them at start), side by side. Times include JSON encoding."""
    _cold()
    cold, warm = [], []
    for label, fn in _routing_callbacks(root, rid, layer):
        _time(label, fn, cold)
    for label, fn in _routing_callbacks(root, rid, layer):
        _time(label, fn, warm)
    tot_c = sum(r[1] + r[2] for r in cold)
    tot_w = sum(r[1] + r[2] for r in warm)
    slow_c = max(r[1] + r[2] for r in cold)
    if not verbose:
        print(f"  repeat: sum of callbacks cold {tot_c*1000:.1f} ms (slowest {slow_c*1000:.1f} ms), "
              f"warm {tot_w*1000:.1f} ms")
        return
    print("\nRouting page, first paint: server time per callback (data + figure + JSON)")
    print(f"  {'':34s} {'cold caches':>12s} {'warm caches':>12s} {'JSON':>8s}")
    for (label, dc, jc, n), (_l, dw, jw, _n) in zip(cold, warm):
        print(f"  {label:34s} {(dc+jc)*1000:9.1f} ms {(dw+jw)*1000:9.1f} ms {n/1e6:6.2f} MB")
    print(f"  {'sum (serial, one core)':34s} {tot_c*1000:9.1f} ms {tot_w*1000:9.1f} ms")
    # Dash fires the page's callbacks concurrently; the slowest one bounds the paint on a
    # machine with free cores, the sum on a single busy core.
    print(f"  {'slowest single callback':34s} {slow_c*1000:9.1f} ms "
          f"{max(r[1] + r[2] for r in warm)*1000:9.1f} ms")


def bench_server_side(root, rid, layer="5", repeat=1):
    from dashboards.app import create_app
    # The app registers the pages' views, pays plotly's lazy imports (as a running server has)
    # and sets the server's zarr read settings; its start-up warming is off (timed cold here).
    old = os.environ.get("MOE_PROBE_DASH_PREWARM")
    os.environ["MOE_PROBE_DASH_PREWARM"] = "0"
    try:
        root = create_app(root).server.config["MOE_PROBE_ROOT"]
    finally:
        os.environ.pop("MOE_PROBE_DASH_PREWARM")
        if old is not None:
            os.environ["MOE_PROBE_DASH_PREWARM"] = old
    meta = data.run_meta(root, rid)
    print(f"store {root}/{rid}: {meta['committed']} committed rows, {len(meta['layers'])} layers")
    # Timings on a shared machine mean little without its load; OS file cache is warm here
    # ("cold" = this process's dataset/slice/figure caches are empty, as in a fresh server).
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    last = meta["last_step"]

    routing_first_paint(root, rid, layer, verbose=True)
    for i in range(1, repeat):
        routing_first_paint(root, rid, layer, verbose=False)

    res = []
    t = time.perf_counter()
    step = last // 3
    at = dict(run_id=rid, layer=layer, modality="vae", xrange=None, step=step)
    _time(f"modality share at step {step}", _view("routing-share", root, **at), res)
    _time(f"co-activation near step {step}", _view("routing-coact", root, **at), res)
    _report("Routing page, slider answer", res, time.perf_counter() - t)

    res = []
    t = time.perf_counter()
    win = (last // 2, last // 2 + 5000)
    at = dict(run_id=rid, layer=layer, modality="vae", xrange=win)
    _time(f"capacity lines zoom {win}", _view("routing-cap-lines", root, **at), res)
    _time(f"load heat map zoom {win}", _view("routing-load-heat", root, **at), res)
    _report("Routing page, zoom answer (5k-step window, re-bucketed)", res, time.perf_counter() - t)

    _cold()
    res = []
    t = time.perf_counter()
    at = dict(run_id=rid, component="attn", layers=[layer, "all"], xrange=None)
    _time("cosine heat map (attn)", _view("conflicts-cosine", root, **at), res)
    _time("norm ratio (layer + all)", _view("conflicts-ratio", root, **at), res)
    _report("Conflicts page, first paint (cold caches)", res, time.perf_counter() - t)

    _cold()
    res = []
    t = time.perf_counter()
    at = dict(run_ids=[rid], term="gen", metric="digit_acc", xrange=None)
    _time("Fig. 5a capacity per modality", _view("compare-capacity", root, **at), res)
    _time("Fig. 5b gen loss", _view("compare-loss", root, **at), res)
    _time("Fig. 6 isolated probe", _view("compare-isolated", root, **at), res)
    _report("Compare page (one large run), first paint (cold caches)", res, time.perf_counter() - t)


GRAPHS = ("routing-cap-lines", "routing-load-heat", "routing-cap-heat", "routing-share",
          "routing-balance", "routing-coact", "routing-saturation")

# Installed before any page script: records, on the page's own clock, when each graph first
# holds the run's data (a 10 ms poll, so ±10 ms), whether it lies in the first screen, and the
# main thread's long tasks.
_PAGE_CLOCK_JS = """
window.__drawn = {}; window.__fold = {}; window.__long = 0;
try { new PerformanceObserver(l => l.getEntries().forEach(e => { window.__long += e.duration; }))
      .observe({type: 'longtask', buffered: true}); } catch (e) {}
setInterval(() => document.querySelectorAll('.js-plotly-plot').forEach(gd => {
  const id = gd.parentElement && gd.parentElement.id;
  const t = gd._fullLayout && gd._fullLayout.title && gd._fullLayout.title.text;
  if (id && t && t.startsWith(RID) && gd._fullData.length && !(id in window.__drawn)) {
    window.__drawn[id] = performance.now();
    window.__fold[id] = gd.getBoundingClientRect().top < window.innerHeight;
  } }), 10);
"""


def _open_routing(d, srv, rid):
    """Open the Routing page; ms until the first graph holds data, until every graph of the
    first screen (window 1400×1000) does, and until all do — on the page's clock — plus the
    wall time seen by webdriver, requests and main-thread busy time."""
    from dashboards.testing import graph_title, wait_for
    t0 = time.perf_counter()
    d.get(srv.url + "/routing")
    for gid in GRAPHS:
        wait_for(lambda: (t := graph_title(d, gid)) and t[0].startswith(rid) and t[1] > 0,
                 120, interval=0.05, what=gid)
    wall = (time.perf_counter() - t0) * 1000
    time.sleep(0.3)
    page = d.execute_script(
        "const cb = performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('_dash-update-component'));"
        "const t = Object.values(window.__drawn);"
        "const f = Object.keys(window.__drawn).filter(k => window.__fold[k]).map(k => window.__drawn[k]);"
        "return [Math.min(...t), Math.max(...f), Math.max(...t), Math.max(...cb.map(e => e.responseEnd)),"
        " cb.length, cb.reduce((a, e) => a + e.transferSize, 0), window.__long,"
        " Object.keys(window.__drawn).filter(k => window.__fold[k]).sort().join(' '),"
        " typeof Plotly === 'object' && Plotly.version];")
    return dict(first=page[0], fold=page[1], drawn=page[2], wall=wall, last_cb=page[3],
                n_cb=page[4], mb=page[5] / 1e6, busy=page[6], fold_ids=page[7], plotly=page[8])


def _driver(rid):
    from dashboards.testing import make_driver
    d = make_driver()  # a fresh profile: nothing of plotly.js parsed or cached yet
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                      {"source": _PAGE_CLOCK_JS.replace("RID", repr(rid))})
    return d


def _wait_prewarm(srv):
    from dashboards.testing import wait_for
    t0 = time.perf_counter()
    line = wait_for(lambda: [ln for ln in srv.output().splitlines()
                             if ln.startswith(("prewarmed", "prewarm skipped"))], 60,
                    what="start-up warm-up")[0]
    return line, (time.perf_counter() - t0) * 1000


def _browser_round(root, rid):
    """The Routing page in headless chromium, in the situations a user meets, side by side:
    (1) `moe-probe dash` started (it warms the first run's Routing views: the page is opened
        once its log line says so; the wait is printed), a browser that never loaded the
        dashboard (fresh profile: plotly.js not cached, not compiled) — a first visit;
    (2) the same page reopened: warm server, warm browser — a reload, a second tab;
    (3) a new server with start-up warming off, the warm browser — views nobody looked at
        yet (another run or layer costs what this costs);
    (4) a new server with warming off and a fresh browser: the worst case.
    Servers run on one port in turn (the browser's caches are per URL). Then a zoom."""
    from dashboards.testing import Server, free_port, quit_driver, severe_logs

    cols, errs, port = {}, [], free_port()
    old = os.environ.get("MOE_PROBE_DASH_PREWARM")
    d = _driver(rid)
    d2 = None
    try:
        os.environ["MOE_PROBE_DASH_PREWARM"] = "1"
        with Server(root, refresh=60.0, timeout=120, port=port) as srv:
            line, prewarm_wait = _wait_prewarm(srv)
            cols["warmed server, 1st visit"] = _open_routing(d, srv, rid)
            cols["reopen (both warm)"] = _open_routing(d, srv, rid)
            time.sleep(1.0)  # let the page settle: time the answers alone
            zoom_ms = _zoom_answer(d, 20000, 25000)
            slider_ms = _slider_answer(d, 16_667)
            errs += severe_logs(d)
            d.get("about:blank")  # leave the page before its server stops (no failed requests)
        os.environ["MOE_PROBE_DASH_PREWARM"] = "0"
        with Server(root, refresh=60.0, timeout=120, port=port) as srv:
            cols["cold server, warm browser"] = _open_routing(d, srv, rid)
            d.get("about:blank")
        d2 = _driver(rid)
        with Server(root, refresh=60.0, timeout=120, port=port) as srv:
            cols["cold server, 1st visit"] = _open_routing(d2, srv, rid)
            errs += severe_logs(d2)
            d2.get("about:blank")
    finally:
        quit_driver(d)
        if d2 is not None:
            quit_driver(d2)
        if old is None:
            os.environ.pop("MOE_PROBE_DASH_PREWARM", None)
        else:
            os.environ["MOE_PROBE_DASH_PREWARM"] = old
    return cols, line, prewarm_wait, (zoom_ms, slider_ms), errs


_WAIT_JS = """
window.__answer = null;
const check = arguments[0], start = arguments[1];
let t0 = performance.now();
if (start) start.addEventListener('keydown', e => { if (e.key === 'Tab') t0 = performance.now(); },
                                  {once: true, capture: true});
const iv = setInterval(() => { if (check()) { window.__answer = performance.now() - t0;
                                              clearInterval(iv); } }, 5);
"""


def _answer_ms(d, check_js: str, act, start=None) -> float:
    """ms on the page's clock from the user's action until `check_js` (a JS expression) holds:
    request, server answer, transfer, and plotly drawing the new figure. With `start` (an
    element), the clock starts at the Tab keydown in it: the keystroke that commits an entry."""
    from dashboards.testing import wait_for
    d.execute_script(_WAIT_JS.replace("arguments[0]", f"(() => {{ {check_js} }})"), None, start)
    act()
    return wait_for(lambda: d.execute_script("return window.__answer;"), 60, interval=0.05,
                    what="answer")


def _zoom_answer(d, lo, hi) -> float:
    """Box zoom of the capacity lines to [lo, hi] → the re-bucketed window is drawn."""
    from dashboards.testing import zoom_x
    gd = "document.querySelector('#routing-cap-lines .js-plotly-plot')"
    return _answer_ms(d, f"const x = {gd}._fullData[0].x; "
                         f"return x && x.length && x[0] >= {lo} && x[x.length - 1] <= {hi};",
                      lambda: zoom_x(d, "routing-cap-lines", lo, hi))


def _slider_answer(d, step: int) -> float:
    """The step typed into the slider's number box, committed by Tab (the box commits on blur)
    → the modality share at that step is drawn; timed from the Tab keydown."""
    from selenium.webdriver.common.keys import Keys
    box = d.find_element("css selector", "#routing-step input[type=number]")
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(step))
    gd = "document.querySelector('#routing-share .js-plotly-plot')"
    return _answer_ms(d, f"return {gd}._fullLayout.title.text.endsWith('step {step}');",
                      lambda: box.send_keys(Keys.TAB), start=box)


def bench_browser(root, rid, rounds=3):
    """`rounds` rounds of `_browser_round` (each with its own fresh browsers and servers); each
    cell is the median over rounds: on a shared 2-core machine one page open varies by ±0.3 s."""
    import statistics
    runs = [_browser_round(root, rid) for _ in range(rounds)]
    num = [f for f, v in runs[0][0][next(iter(runs[0][0]))].items() if isinstance(v, (int, float))]
    cols = {k: {f: statistics.median(r[0][k][f] for r in runs) for f in num} for k in runs[0][0]}
    line, prewarm_wait = runs[-1][1], max(r[2] for r in runs)
    zoom_ms = statistics.median(r[3][0] for r in runs)
    slider_ms = statistics.median(r[3][1] for r in runs)
    errs = [e for r in runs for e in r[4]]
    some = runs[-1][0][next(iter(runs[-1][0]))]
    print(f"\nbrowser: Routing page open, times from navigation (median of {rounds} rounds)")
    print(f"  {'':34s}" + "".join(f"{k:>28s}" for k in cols))
    rows = [("first graph with data (ms)", "first", "{:.0f}"),
            ("first screen drawn (ms)", "fold", "{:.0f}"),
            ("all 7 graphs drawn (ms)", "drawn", "{:.0f}"),
            ("  same, webdriver wall (ms)", "wall", "{:.0f}"),
            ("last callback response (ms)", "last_cb", "{:.0f}"),
            ("callback requests", "n_cb", "{:.0f}"),
            ("callback bytes (MB)", "mb", "{:.2f}"),
            ("main thread in long tasks (ms)", "busy", "{:.0f}")]
    for label, key, fmt in rows:
        print(f"  {label:34s}" + "".join(f"{fmt.format(c[key]):>28s}" for c in cols.values()))
    print(f"  first screen = {some['fold_ids']} (in the 1400×1000 window); plotly.js "
          f"{some['plotly']} (vendored bundle when dashboards/assets/vendor matches plotly)")
    print(f"  start-up warm-up: {line!r}; the first visit waited {prewarm_wait:.0f} ms for it")
    print(f"browser, page clock (median): zoom to 5k steps → re-bucketed lines drawn "
          f"{zoom_ms:.0f} ms; slider to step 16667 → modality share at the new step drawn "
          f"{slider_ms:.0f} ms")
    print(f"browser console errors: {len(errs)}", *errs[:3], sep="\n  ")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="ROOT holding an already generated large run")
    ap.add_argument("--run", default="large")
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--browser", action="store_true", help="also time the page in chromium")
    ap.add_argument("--repeat", type=int, default=3, help="cold Routing first paints to time")
    ap.add_argument("--browser-rounds", type=int, default=3,
                    help="rounds of browser page opens (median reported)")
    a = ap.parse_args(argv)
    tmp = None
    root = a.store
    if root is None:
        from fixtures.large import build_large
        tmp = tempfile.TemporaryDirectory(prefix="moe_probe_bench_")
        root = tmp.name
        build_large(root, n_steps=a.steps, name=a.run)
    try:
        bench_server_side(root, a.run, repeat=a.repeat)
        if a.browser:
            bench_browser(root, a.run, rounds=a.browser_rounds)
    finally:
        if tmp:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
