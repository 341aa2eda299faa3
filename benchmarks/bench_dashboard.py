"""Dashboard speed on a LARGE store (50k steps × 32 layers × 3 modalities × 64 experts).

    python benchmarks/bench_dashboard.py [--store ROOT] [--steps 50000] [--browser]

Without --store the store is generated into a temporary directory with the fixtures generator
(minutes; never committed). Times, measured once each in this run and printed (no assertions):

* first paint: every callback of a page (data path + figure building + JSON encoding, i.e. what
  the server does before the browser can draw), with cold caches, as a fresh page open does;
* slider answer: the per-step views at another step; zoom answer: the time-series views re-read
  and re-bucketed for a 5k-step window;
* with --browser: the same page opened in headless chromium, timed until its graphs hold data.
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


def routing_first_paint(root, rid, layer, verbose=True):
    """Every callback of the Routing page with cold caches, as a fresh page open on a fresh
    server does."""
    _cold()
    res = []
    t = time.perf_counter()
    _time("run meta (layers, steps)", lambda: data.run_meta(root, rid), res)
    _time("capacity lines (layer, 3 mod.)", lambda: R.capacity_lines(root, rid, layer), res)
    _time("capacity heat map (layer×step)", lambda: R.capacity_heatmap(root, rid, "vae"), res)
    _time("expert load heat map", lambda: R.load_heatmap(root, rid, layer, "vae"), res)
    _time("modality share at step", lambda: R.modality_share(root, rid, layer, None), res)
    _time("co-activation at step", lambda: R.coactivation_heatmap(root, rid, layer, None), res)
    _time("balance (3 metrics × 3 mod.)", lambda: R.balance_lines(root, rid, layer), res)
    _time("saturation", lambda: R.saturation_line(root, rid, layer), res)
    wall = time.perf_counter() - t
    slowest = max(r[1] + r[2] for r in res)
    if verbose:
        _report("Routing page, first paint (cold caches)", res, wall)
    else:
        print(f"  repeat: sum of callbacks {wall*1000:.1f} ms, slowest {slowest*1000:.1f} ms")
    # Dash fires the page's callbacks concurrently; the slowest one bounds the paint on a
    # machine with free cores, the sum on a single busy core.
    if verbose:
        print(f"  slowest single callback: {slowest*1000:.1f} ms")


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


def bench_browser(root, rid):
    from dashboards.testing import (
        Server, graph_title, make_driver, quit_driver, severe_logs, wait_for, wait_graph, zoom_x,
    )

    def drawn(gid, prefix):
        wait_for(lambda: (t := graph_title(d, gid)) and t[0].startswith(prefix) and t[1] > 0,
                 120, interval=0.05, what=gid)

    with Server(root, refresh=60.0, timeout=120) as srv:
        d = make_driver()
        try:
            for attempt in ("cold", "warm"):
                t0 = time.perf_counter()
                d.get(srv.url + "/routing")
                for gid in ("routing-cap-lines", "routing-load-heat", "routing-cap-heat",
                            "routing-share", "routing-balance", "routing-coact",
                            "routing-saturation"):
                    drawn(gid, rid)
                print(f"\nbrowser: Routing page open → all 7 graphs drawn ({attempt} server "
                      f"caches): {(time.perf_counter() - t0)*1000:.0f} ms")
                # where the time went, from the page's own clock
                cb = d.execute_script(
                    "return performance.getEntriesByType('resource')"
                    ".filter(e => e.name.includes('_dash-update-component'))"
                    ".map(e => e.responseEnd)")
                print(f"  last callback response at {max(cb):.0f} ms after navigation; "
                      f"{len(cb)} callback requests")
            time.sleep(1.0)  # let the page settle: time the zoom alone
            t0 = time.perf_counter()
            zoom_x(d, "routing-cap-lines", 20000, 25000)
            wait_graph(d, "routing-cap-lines", lambda g: min(g["traces"][0]["x"]) >= 20000, 60)
            # (this poll ships the arrays: an upper bound on the zoom answer as seen in the page)
            print(f"browser: zoom to 5k steps → re-bucketed line drawn: "
                  f"{(time.perf_counter() - t0)*1000:.0f} ms")
            errs = severe_logs(d)
            print(f"browser console errors: {len(errs)}", *errs[:3], sep="\n  ")
        finally:
            quit_driver(d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="ROOT holding an already generated large run")
    ap.add_argument("--run", default="large")
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--browser", action="store_true", help="also time the page in chromium")
    ap.add_argument("--repeat", type=int, default=3, help="cold Routing first paints to time")
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
            bench_browser(root, a.run)
    finally:
        if tmp:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
