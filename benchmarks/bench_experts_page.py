"""Experts page first paint on one run (issue 19), printed; no assertions.

    OMP_NUM_THREADS=1 python benchmarks/bench_experts_page.py ROOT RUN_ID [--layer 0]
        [--repeat 3] [--rounds 3] [--settle 3]

The method of ``bench_dashboard.py`` (which times the Routing page):

1. server side, in process: the page's first screen is what its layout builds
   (``pages_common.first_screen``: ``page.values``, then every first-screen view; all five
   Experts views are first-screen views and none is warmed at start-up), timed per view (data +
   figure, then JSON) with cold caches (``cache.clear_all``: a fresh server) and again warm;
2. browser: a fresh ``moe-probe dash ROOT`` server and a fresh headless chromium profile per
   round (chromium started ``--settle`` s before the open, as ``ab_dashboard.py`` does), the
   bench's page clock installed, ``/experts`` opened: ms from navigation until the first graph
   and until all five hold the run's data.

ROOT holds a run with a ``token_routing`` group (e.g. a demo run: ``moe-probe train --recipe
symbiotic``). The first Experts open in a process also loads scikit-learn's digits (kept for the
process, so not cleared by ``cache.clear_all``): round 1's server figure includes it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_dashboard as B  # noqa: E402

EXPERT_GRAPHS = ("experts-words", "experts-labels", "experts-patches", "experts-images",
                 "experts-map")


def server_side(root, rid: str, layer: str, repeat: int) -> None:
    from dashboards import cache
    from dashboards.app import create_app
    from dashboards.views import PAGES, VIEWS

    os.environ["MOE_PROBE_DASH_PREWARM"] = "0"
    root = create_app(root).server.config["MOE_PROBE_ROOT"]
    os.environ.pop("MOE_PROBE_DASH_PREWARM")
    page = PAGES["/experts"]
    sel = {"focus": rid, "runs": [], "layer": layer, "modality": "vae"}
    print(f"load average {os.getloadavg()[0]:.2f}")
    totals = {"cold": [], "warm": []}
    for r in range(repeat):
        cache.clear_all()
        for state in ("cold", "warm"):
            t0 = time.perf_counter()
            values = page.values(root, sel)
            res = [("page values (experts, steps)", time.perf_counter() - t0, 0.0, 0)]
            for vid in EXPERT_GRAPHS:
                res.append((vid, *B._time(lambda: VIEWS[vid].figure(root, values))))
            tot = sum(x[1] + x[2] for x in res)
            totals[state].append(tot)
            if r == 0:
                print(f"\nserver side, {state} caches ({values})")
                for label, dt, js, n in res:
                    print(f"  {label:30s} data+figure {dt * 1e3:7.1f} ms   json {js * 1e3:6.1f} ms"
                          f"   {n / 1e6:5.2f} MB")
                print(f"  {'sum (serial)':30s} {tot * 1e3:7.1f} ms")
    for state, v in totals.items():
        print(f"server side {state}, sum per open over {repeat} rounds (ms): "
              + ", ".join(f"{x * 1e3:.0f}" for x in v) + f"; median {statistics.median(v) * 1e3:.0f}")


def browser(root, rid: str, rounds: int, settle: float) -> None:
    from dashboards.testing import Server, graph_title, quit_driver, severe_logs, wait_for

    rows = []
    for r in range(rounds):
        with Server(root, refresh=60.0) as srv:
            d = B._driver(rid)
            try:
                time.sleep(settle)
                load = os.getloadavg()[0]
                d.get(srv.url + "/experts")
                for gid in EXPERT_GRAPHS:
                    wait_for(lambda: (t := graph_title(d, gid)) and t[0].startswith(rid)
                             and t[1] > 0, 120, interval=0.05, what=gid)
                time.sleep(0.3)
                first, last = d.execute_script(
                    "const t = Object.values(window.__drawn);"
                    "return [Math.min(...t), Math.max(...t)];")
                errs = severe_logs(d)
            finally:
                quit_driver(d)
        rows.append((first, last))
        print(f"browser round {r + 1}: first graph {first:.0f} ms, all {len(EXPERT_GRAPHS)} graphs "
              f"{last:.0f} ms (page clock); load {load:.2f}; console errors {len(errs)}")
    print(f"browser median over {rounds} rounds: first graph "
          f"{statistics.median(x[0] for x in rows):.0f} ms, all graphs "
          f"{statistics.median(x[1] for x in rows):.0f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root")
    ap.add_argument("run_id")
    ap.add_argument("--layer", default="0")
    ap.add_argument("--repeat", type=int, default=3, help="server-side rounds")
    ap.add_argument("--rounds", type=int, default=3, help="browser rounds (median reported)")
    ap.add_argument("--settle", type=float, default=3.0)
    a = ap.parse_args(argv)
    server_side(a.root, a.run_id, a.layer, a.repeat)
    browser(a.root, a.run_id, a.rounds, a.settle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
