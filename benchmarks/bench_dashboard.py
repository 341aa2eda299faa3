"""Dashboard speed on a LARGE store (50k steps × 32 layers × 3 modalities × 64 experts).

    python benchmarks/bench_dashboard.py [--store ROOT] [--steps 50000] [--browser]

Without --store the store is generated into a temporary directory with the fixtures generator
(minutes; never committed). Times, measured once each in this run and printed (no assertions):

* first paint: every callback of a page (data path + figure building + JSON encoding, i.e. what
  the server does before the browser can draw), with cold caches, as a fresh page open does;
* slider answer: the per-step views at another step; zoom answer: the time-series views re-read
  and re-bucketed for a 5k-step window;
* with --browser: the same page opened in headless chromium, timed until its graphs hold data,
  in four situations side by side (median of --browser-rounds): cold server + fresh browser,
  reopen (both warm), cold server + warm browser, and a server that warmed the first run's
  Routing views at start (`MOE_PROBE_DASH_PREWARM`, on by default; the wait for its log line
  is printed, so the warm start is never passed off as a cold one).
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

from dashboards import data, figures  # noqa: E402
from dashboards.figures import compare as CMP, conflicts as C, routing as R  # noqa: E402


def _cold():
    """Forget every cached dataset/slice, as a freshly started server has none."""
    data._cache = data._LRU(128, 256 << 20)
    data._ds_cache = data._LRU(32)
    data._block_cache = data._LRU(32, 384 << 20)
    figures._figs = data._LRU(64, 1 << 60)


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
    return [
        ("run meta (layers, steps)", lambda: data.run_meta(root, rid)),
        ("capacity lines (layer, 3 mod.)", lambda: R.capacity_lines(root, rid, layer)),
        ("capacity heat map (layer×step)", lambda: R.capacity_heatmap(root, rid, "vae")),
        ("expert load heat map", lambda: R.load_heatmap(root, rid, layer, "vae")),
        ("modality share at step", lambda: R.modality_share(root, rid, layer, None)),
        ("co-activation at step", lambda: R.coactivation_heatmap(root, rid, layer, None)),
        ("balance (3 metrics × 3 mod.)", lambda: R.balance_lines(root, rid, layer)),
        ("saturation", lambda: R.saturation_line(root, rid, layer)),
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
    from dashboards.app import _warm_up
    _warm_up()  # a running server has paid plotly's lazy imports already
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
    _time(f"modality share at step {step}", lambda: R.modality_share(root, rid, layer, step), res)
    _time(f"co-activation near step {step}", lambda: R.coactivation_heatmap(root, rid, layer, step), res)
    _report("Routing page, slider answer", res, time.perf_counter() - t)

    res = []
    t = time.perf_counter()
    win = (last // 2, last // 2 + 5000)
    _time(f"capacity lines zoom {win}", lambda: R.capacity_lines(root, rid, layer, win), res)
    _time(f"load heat map zoom {win}", lambda: R.load_heatmap(root, rid, layer, "vae", win), res)
    _report("Routing page, zoom answer (5k-step window, re-bucketed)", res, time.perf_counter() - t)

    _cold()
    res = []
    t = time.perf_counter()
    _time("cosine heat map (attn)", lambda: C.cosine_heatmap(root, rid, "attn"), res)
    _time("norm ratio (layer + all)", lambda: C.norm_ratio(root, rid, "attn", [layer, "all"]), res)
    _report("Conflicts page, first paint (cold caches)", res, time.perf_counter() - t)

    _cold()
    res = []
    t = time.perf_counter()
    _time("Fig. 5a capacity per modality", lambda: CMP.capacity_by_modality(root, [rid]), res)
    _time("Fig. 5b gen loss", lambda: CMP.loss_term(root, [rid]), res)
    _time("Fig. 6 isolated probe", lambda: CMP.isolated_metric(root, [rid], "digit_acc"), res)
    _report("Compare page (one large run), first paint (cold caches)", res, time.perf_counter() - t)


GRAPHS = ("routing-cap-lines", "routing-load-heat", "routing-cap-heat", "routing-share",
          "routing-balance", "routing-coact", "routing-saturation")

# Installed before any page script: records, on the page's own clock, when each graph first
# holds the run's data (a 10 ms poll, so ±10 ms), and the main thread's long tasks.
_PAGE_CLOCK_JS = """
window.__drawn = {}; window.__long = 0;
try { new PerformanceObserver(l => l.getEntries().forEach(e => { window.__long += e.duration; }))
      .observe({type: 'longtask', buffered: true}); } catch (e) {}
setInterval(() => document.querySelectorAll('.js-plotly-plot').forEach(gd => {
  const id = gd.parentElement && gd.parentElement.id;
  const t = gd._fullLayout && gd._fullLayout.title && gd._fullLayout.title.text;
  if (id && t && t.startsWith(RID) && gd._fullData.length && !(id in window.__drawn))
    window.__drawn[id] = performance.now(); }), 10);
"""


def _open_routing(d, srv, rid):
    """Open the Routing page; wall ms until all graphs are drawn (webdriver polls) plus what the
    page's own clock says: all drawn, last callback response, requests, main-thread busy."""
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
        "return [Math.max(...Object.values(window.__drawn)), Math.max(...cb.map(e => e.responseEnd)),"
        " cb.length, cb.reduce((a, e) => a + e.transferSize, 0), window.__long];")
    return dict(wall=wall, drawn=page[0], last_cb=page[1], n_cb=page[2], mb=page[3] / 1e6,
                busy=page[4])


def _driver(rid):
    from dashboards.testing import make_driver
    d = make_driver()  # a fresh profile: nothing of plotly.js parsed or cached yet
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                      {"source": _PAGE_CLOCK_JS.replace("RID", repr(rid))})
    return d


def _browser_round(root, rid):
    """The Routing page in headless chromium. A browser's first page pays plotly.js's parse and
    set-up (seconds on its own), so server effects are shown with a warm browser too: one
    browser, and servers started in turn on one port (the browser's code cache is per URL):
    (1) server with start-up warming off, fresh browser profile: cold server, cold browser;
    (2) same page reopened: warm server, warm browser;
    (3) a new server, warming off: cold server, warm browser;
    (4) a new server that warmed the first run's Routing views at start, opened once its
        warm-up line is logged (the wait is printed): server warmed at start, warm browser.
    Then a zoom on the last page."""
    from dashboards.testing import (
        Server, free_port, quit_driver, severe_logs, wait_for, wait_graph, zoom_x,
    )

    cols, errs, port = {}, [], free_port()
    old = os.environ.get("MOE_PROBE_DASH_PREWARM")
    d = _driver(rid)
    try:
        os.environ["MOE_PROBE_DASH_PREWARM"] = "0"
        with Server(root, refresh=60.0, timeout=120, port=port) as srv:
            cols["cold server, cold browser"] = _open_routing(d, srv, rid)
            cols["warm server (reopen)"] = _open_routing(d, srv, rid)
            d.get("about:blank")  # leave the page before its server stops (no failed requests)
        with Server(root, refresh=60.0, timeout=120, port=port) as srv:
            cols["cold server, warm browser"] = _open_routing(d, srv, rid)
            d.get("about:blank")
        os.environ["MOE_PROBE_DASH_PREWARM"] = "1"
        with Server(root, refresh=60.0, timeout=120, port=port) as srv:
            t0 = time.perf_counter()
            try:
                import dashboards.app
                if not hasattr(dashboards.app, "_prewarm"):
                    raise TimeoutError  # an older tree, without start-up warming
                line = wait_for(lambda: [ln for ln in srv.output().splitlines()
                                         if ln.startswith(("prewarmed", "prewarm skipped"))], 60,
                                what="start-up warm-up")[0]
                prewarm_wait = (time.perf_counter() - t0) * 1000
                cols["warmed at start, warm browser"] = _open_routing(d, srv, rid)
            except TimeoutError:  # a dashboard without start-up warming (older trees)
                line, prewarm_wait = "none logged in 60 s (column left out)", 0.0
                d.get(srv.url + "/routing")  # the zoom below needs the page
            time.sleep(1.0)  # let the page settle: time the zoom alone
            t0 = time.perf_counter()
            zoom_x(d, "routing-cap-lines", 20000, 25000)
            wait_graph(d, "routing-cap-lines", lambda g: min(g["traces"][0]["x"]) >= 20000, 60)
            # (this poll ships the arrays: an upper bound on the zoom answer as seen in the page)
            zoom_ms = (time.perf_counter() - t0) * 1000
            errs += severe_logs(d)
            d.get("about:blank")
    finally:
        quit_driver(d)
        if old is None:
            os.environ.pop("MOE_PROBE_DASH_PREWARM", None)
        else:
            os.environ["MOE_PROBE_DASH_PREWARM"] = old

    return cols, line, prewarm_wait, zoom_ms, errs


def bench_browser(root, rid, rounds=3):
    """`rounds` rounds of `_browser_round` (each with its own fresh browser and servers); each
    cell is the median over rounds: on a shared 2-core machine one page open varies by ±1 s."""
    import statistics
    runs = [_browser_round(root, rid) for _ in range(rounds)]
    cols = {k: {f: statistics.median(r[0][k][f] for r in runs) for f in runs[0][0][k]}
            for k in runs[0][0]}
    line, prewarm_wait = runs[-1][1], max(r[2] for r in runs)
    zoom_ms = statistics.median(r[3] for r in runs)
    errs = [e for r in runs for e in r[4]]
    print(f"\nbrowser: Routing page open → all 7 graphs drawn (median of {rounds} rounds)")
    print(f"  {'':32s}" + "".join(f"{k:>31s}" for k in cols))
    rows = [("wall, webdriver polls (ms)", "wall", "{:.0f}"),
            ("all drawn, page clock (ms)", "drawn", "{:.0f}"),
            ("last callback response (ms)", "last_cb", "{:.0f}"),
            ("callback requests", "n_cb", "{:.0f}"),
            ("callback bytes (MB)", "mb", "{:.2f}"),
            ("main thread in long tasks (ms)", "busy", "{:.0f}")]
    for label, key, fmt in rows:
        print(f"  {label:32s}" + "".join(f"{fmt.format(c[key]):>31s}" for c in cols.values()))
    print(f"  start-up warm-up: {line!r}; the page was opened {prewarm_wait:.0f} ms after the "
          f"server answered (waiting for that line)")
    print(f"browser: zoom to 5k steps → re-bucketed line drawn: {zoom_ms:.0f} ms (median)")
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
