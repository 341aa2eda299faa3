"""Dashboard speed on LARGE stores (N steps × 32 layers × 3 modalities × 64 experts), several
stores side by side (e.g. the 50k- and the 500k-step store).

    python benchmarks/bench_dashboard.py [--store ROOT [ROOT ...]] [--steps 50000] [--browser]

Without --store a store is generated into a temporary directory with the fixtures generator
(minutes; never committed). Times, measured once each in this run and printed (no assertions),
one column per store:

* first paint: every callback of the Routing page (data path + figure building + JSON encoding,
  i.e. what the server does before the browser can draw), with cold caches, as a fresh page open
  on a fresh server does, and again with the caches that filled;
* slider answer: the per-step views at another step; zoom answers: the time-series views re-read
  and re-bucketed for a 5k-step window and for the middle half of the run (a wide zoom: what the
  rollup levels serve);
* with --browser: the Routing page opened in headless chromium, timed on the page's clock until
  the first graph, the graphs of the first screen and all graphs hold the run's data, in four
  situations (median of --browser-rounds): a server that warmed the first run's Routing views at
  start (`MOE_PROBE_DASH_PREWARM`, on by default) with a browser that never saw the dashboard; a
  reopen; a server without warming with a warm and with a fresh browser (the issue's "first
  visit with a cold server"); then a box zoom and a slider move, timed on the page's clock.
Targets from the issue: first screen < 1 s, slider/zoom answer < 300 ms. The stores are only
read (the OS file cache is warm after the first pass: "cold" means the server's own caches).
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


def _time(fn) -> tuple[float, float, int]:
    """(s building, s JSON-encoding, bytes of JSON) of one figure (or other value)."""
    t0 = time.perf_counter()
    fig = fn()
    t1 = time.perf_counter()
    n = len(pio.to_json(fig)) if hasattr(fig, "to_plotly_json") else 0
    return t1 - t0, time.perf_counter() - t1, n


class Table:
    """(section, label) → value text of one store, printed beside the other stores'."""

    def __init__(self):
        self.rows: dict[tuple[str, str], str] = {}

    def add(self, section: str, label: str, value: str) -> None:
        self.rows[(section, label)] = value

    def ms(self, section: str, label: str, seconds: float, extra: str = "") -> None:
        self.add(section, label, f"{seconds * 1000:.1f} ms{extra}")


def print_side_by_side(tables: dict[str, Table]) -> None:
    keys = list(dict.fromkeys(k for t in tables.values() for k in t.rows))
    order = list(dict.fromkeys(sec for sec, _ in keys))
    keys.sort(key=lambda k: order.index(k[0]))  # stable: labels keep their order
    width = max(24, *(len(v) for t in tables.values() for v in t.rows.values()))
    section = None
    for sec, label in keys:
        if sec != section:
            section = sec
            print(f"\n{sec}")
            print(f"  {'':44s}" + "".join(f"{name:>{width + 2}s}" for name in tables))
        print(f"  {label:44s}" + "".join(f"{t.rows.get((sec, label), '-'):>{width + 2}s}"
                                         for t in tables.values()))


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
        ("balance (4 metrics × 3 mod.)", _view("routing-balance", root, **at)),
        ("saturation", _view("routing-saturation", root, **at)),
    ]


def routing_first_paint(root, rid, layer, table: Table | None):
    """Every callback of the Routing page, first with cold caches (a fresh page open on a fresh
    server), then again with the caches that first pass filled (a revisit, a second tab, or a
    server that warmed them at start). Times include JSON encoding. Returns the cold sum."""
    _cold()
    cold = [(label, _time(fn)) for label, fn in _routing_callbacks(root, rid, layer)]
    warm = [(label, _time(fn)) for label, fn in _routing_callbacks(root, rid, layer)]
    tot_c = sum(d + j for _, (d, j, _n) in cold)
    if table is None:
        return tot_c
    sec_c = "Routing first paint, server time per callback, COLD caches (data + figure + JSON)"
    sec_w = "Routing first paint, the same with WARM caches"
    for (label, (d, j, n)), (_l, (dw, jw, _n)) in zip(cold, warm):
        table.ms(sec_c, label, d + j, f" {n / 1e6:5.2f} MB")
        table.ms(sec_w, label, dw + jw)
    # Dash fires the page's callbacks concurrently; the slowest one bounds the paint on a
    # machine with free cores, the sum on a single busy core.
    table.ms(sec_c, "sum (serial, one core)", tot_c)
    table.ms(sec_c, "slowest single callback", max(d + j for _, (d, j, _n) in cold))
    table.ms(sec_w, "sum (serial, one core)", sum(d + j for _, (d, j, _n) in warm))
    return tot_c


def _section(table, title, items):
    """Time `items` [(label, fn)] one after the other into `table` under `title`."""
    t = time.perf_counter()
    for label, fn in items:
        d, j, n = _time(fn)
        table.ms(title, label, d + j, f" {n / 1e6:5.2f} MB")
    table.ms(title, "wall (serial)", time.perf_counter() - t)


def _app(root):
    """The dashboard app (one per process): it registers the pages' views, pays plotly's lazy
    imports (as a running server has) and sets the server's zarr read settings; its start-up
    warming is off (timed cold here). Other stores are read through the same app's code."""
    from dashboards.app import create_app
    old = os.environ.get("MOE_PROBE_DASH_PREWARM")
    os.environ["MOE_PROBE_DASH_PREWARM"] = "0"
    try:
        create_app(root)
    finally:
        os.environ.pop("MOE_PROBE_DASH_PREWARM")
        if old is not None:
            os.environ["MOE_PROBE_DASH_PREWARM"] = old


def bench_server_side(root, rid, layer="5", repeat=1) -> Table:
    root = str(data.check_root(root))
    table = Table()
    meta = data.run_meta(root, rid)
    last = meta["last_step"]
    table.add("store", "routing rows", str(meta["committed"]["routing"]))
    # Timings on a shared machine mean little without its load
    table.add("store", "load average at start (1 min)", f"{os.getloadavg()[0]:.2f}")

    routing_first_paint(root, rid, layer, table)
    sums = [routing_first_paint(root, rid, layer, None) for _ in range(1, repeat)]
    if sums:
        table.add("Routing first paint, server time per callback, COLD caches (data + figure + JSON)",
                  f"sum, {len(sums)} more cold passes",
                  " / ".join(f"{x * 1000:.0f}" for x in sums) + " ms")

    step = last // 3
    at = dict(run_id=rid, layer=layer, modality="vae", xrange=None, step=step)
    _section(table, "Routing slider answer (step = last // 3)",
             [("modality share at step", _view("routing-share", root, **at)),
              ("co-activation near step", _view("routing-coact", root, **at))])
    for name, win in (("5k-step window", (last // 2, last // 2 + 5000)),
                      ("middle half of the run", (last // 4, 3 * last // 4))):
        at = dict(run_id=rid, layer=layer, modality="vae", xrange=win)
        _section(table, f"Routing zoom answer, {name} (re-read and re-bucketed)",
                 [("capacity lines + heat map (one callback)",
                   lambda at=at: (_view("routing-cap-lines", root, **at)(),
                                  _view("routing-cap-heat", root, **at)())[0]),
                  ("expert load heat map", _view("routing-load-heat", root, **at)),
                  ("balance", _view("routing-balance", root, **at))])

    _cold()
    at = dict(run_id=rid, component="attn", layers=[layer, "all"], xrange=None)
    _section(table, "Conflicts page, first paint (cold caches)",
             [("cosine heat map (attn)", _view("conflicts-cosine", root, **at)),
              ("norm ratio (layer + all)", _view("conflicts-ratio", root, **at))])
    _cold()
    at = dict(run_ids=[rid], term="gen", metric="digit_acc", xrange=None)
    _section(table, "Compare page (one large run), first paint (cold caches)",
             [("Fig. 5a capacity per modality", _view("compare-capacity", root, **at)),
              ("Fig. 5b gen loss", _view("compare-loss", root, **at)),
              ("Fig. 6 isolated probe", _view("compare-isolated", root, **at))])
    table.add("store", "load average at end (1 min)", f"{os.getloadavg()[0]:.2f}")
    return table


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


def _browser_round(root, rid, last):
    """The Routing page in headless chromium, in the situations a user meets, side by side:
    (1) `moe-probe dash` started (it warms the first run's Routing views: the page is opened
        once its log line says so; the wait is printed), a browser that never loaded the
        dashboard (fresh profile: plotly.js not cached, not compiled) — a first visit;
    (2) the same page reopened: warm server, warm browser — a reload, a second tab;
    (3) a new server with start-up warming off, the warm browser — views nobody looked at
        yet (another run or layer costs what this costs);
    (4) a new server with warming off and a fresh browser: the worst case.
    Servers run on one port in turn (the browser's caches are per URL). On the first server,
    after the reopen: a box zoom to the middle half of the run, then one to a 5k-step window,
    then a slider move (ms on the page's clock each)."""
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
            answers = {  # wide first: its window holds the 5k one (the check needs a change)
                "zoom to the middle half → lines drawn": _zoom_answer(d, last // 4, 3 * last // 4),
                "zoom to a 5k-step window → lines drawn": _zoom_answer(d, last // 2,
                                                                       last // 2 + 5000),
                "slider to last // 3 → share drawn": _slider_answer(d, last // 3)}
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
    return cols, line, prewarm_wait, answers, errs


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


def bench_browser(root, rid, table: Table, rounds=3) -> None:
    """`rounds` rounds of `_browser_round` (each with its own fresh browsers and servers) into
    `table`; each cell is the median over rounds: on a shared 2-core machine one page open varies
    by ±0.3 s."""
    import statistics
    last = data.run_meta(root, rid)["last_step"]
    runs = [_browser_round(root, rid, last) for _ in range(rounds)]
    situations = list(runs[0][0])
    num = [f for f, v in runs[0][0][situations[0]].items() if isinstance(v, (int, float))]
    cols = {k: {f: statistics.median(r[0][k][f] for r in runs) for f in num} for k in situations}
    rows = [("first graph with data", "first", "{:.0f} ms"),
            ("FIRST SCREEN drawn", "fold", "{:.0f} ms"),
            ("all 7 graphs drawn", "drawn", "{:.0f} ms"),
            ("  same, webdriver wall", "wall", "{:.0f} ms"),
            ("last callback response", "last_cb", "{:.0f} ms"),
            ("callback requests", "n_cb", "{:.0f}"),
            ("callback bytes", "mb", "{:.2f} MB"),
            ("main thread in long tasks", "busy", "{:.0f} ms")]
    for k in situations:
        sec = f"browser, Routing page open: {k} (page clock from navigation, median of {rounds})"
        for label, key, fmt in rows:
            table.add(sec, label, fmt.format(cols[k][key]))
    sec = f"browser, answers on the page's clock (warmed server, median of {rounds})"
    for label in runs[0][3]:
        table.add(sec, label, f"{statistics.median(r[3][label] for r in runs):.0f} ms")
    some = runs[-1][0][situations[0]]
    sec = "browser, notes"
    table.add(sec, "first screen graphs (1400×1000 window)", some["fold_ids"].replace("routing-", ""))
    table.add(sec, "plotly.js", str(some["plotly"]))
    table.add(sec, "start-up warm-up wait (max)", f"{max(r[2] for r in runs):.0f} ms")
    errs = [e for r in runs for e in r[4]]
    table.add(sec, "console errors", str(len(errs)))
    for e in errs[:3]:
        print("browser console error:", e)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", nargs="+",
                    help="ROOTs holding an already generated large run (one column each)")
    ap.add_argument("--run", default="large")
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--browser", action="store_true", help="also time the page in chromium")
    ap.add_argument("--repeat", type=int, default=3, help="cold Routing first paints to time")
    ap.add_argument("--browser-rounds", type=int, default=3,
                    help="rounds of browser page opens (median reported)")
    a = ap.parse_args(argv)
    tmp = None
    roots = a.store
    if roots is None:
        from fixtures.large import build_large
        tmp = tempfile.TemporaryDirectory(prefix="moe_probe_bench_")
        roots = [tmp.name]
        build_large(tmp.name, n_steps=a.steps, name=a.run)
    print(f"machine: {os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    tables = {}
    _app(roots[0])
    try:
        for root in roots:
            if not (Path(root) / a.run).is_dir():
                print(f"error: no run {a.run!r} under {root}", file=sys.stderr)
                return 2
            tables[root] = bench_server_side(root, a.run, repeat=a.repeat)
            _cold()  # the next store starts as cold as this one did
        if a.browser:
            for root in roots:
                bench_browser(root, a.run, tables[root], rounds=a.browser_rounds)
    finally:
        if tmp:
            tmp.cleanup()
    print_side_by_side(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
