"""Dashboard first visits of two or more git revisions, side by side in one run.

    python benchmarks/ab_dashboard.py --store ROOT [--rounds 10] REV_A REV_B [REV ...]

On this shared 2-core VM one page open varies by ±0.3-0.5 s from minute to minute, more than
most changes gain, so two runs of bench_dashboard.py taken apart cannot tell a change's effect.
Here each revision gets its own checkout (a git worktree) and its own server (warmed at start;
with `--cold`, a new server without start-up warming for each open), and the Routing page is
opened in a fresh chromium profile for each revision in turn, round after round, with the
starting revision rotated. Chromium is started `--settle` seconds (default 3) before the page
is opened: a user's browser is already running when they open the dashboard, while a
just-launched chromium keeps setting itself up on the same 2 cores (a second renderer process
alone used 0.3-0.5 s of CPU during pages opened at once, ~0 after 3 s); pages opened at once
took 0.1-0.3 s longer (`--settle 0` measures that case). Per open, from the page's clock and a
chromium trace:

* first screen: ms from navigation until the graphs in the 1400×1000 window hold the run's data
  (also: how many opens took < 1 s, and every open's value);
* all graphs: ms until all 7 do;
* main-thread CPU: CPU time of the renderer's main thread until the first screen (the work
  the page costs, less sensitive than wall times to what else the machine runs).

Medians per revision and their ratio to the first revision are printed; nothing is asserted.
The store is the large one of bench_dashboard.py (`python -m fixtures.generate --large ROOT`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_dashboard as B  # noqa: E402
from dashboards import testing as T  # noqa: E402

_TRACE_CATEGORIES = ("toplevel,devtools.timeline,disabled-by-default-devtools.timeline,loading,"
                     "blink.user_timing")  # navigationStart


class _Url:
    def __init__(self, url):
        self.url = url


def _main_thread_cpu_ms(events, until_ms: float) -> float:
    """CPU time (the trace's `tdur`) of the renderer main thread's top-level tasks that start
    between navigation and `until_ms` after it."""
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("name") == "thread_name"}
    per_thread = collections.Counter((e["pid"], e["tid"]) for e in events)
    main = max((k for k, v in names.items() if v == "CrRendererMain"), key=per_thread.__getitem__)
    nav = [e["ts"] for e in events
           if e.get("name") == "navigationStart" and (e["pid"], e["tid"]) == main]
    t0, t1 = nav[-1], nav[-1] + until_ms * 1000
    tasks = sorted((e for e in events if (e["pid"], e["tid"]) == main and e.get("ph") == "X"
                    and e["name"] in ("RunTask", "ThreadControllerImpl::RunTask")),
                   key=lambda e: e["ts"])
    cpu, end = 0.0, -1
    for e in tasks:  # nested task events are counted once, in the outermost
        if e["ts"] >= end:
            end = e["ts"] + e.get("dur", 0)
            if t0 <= e["ts"] <= t1:
                cpu += e.get("tdur", e.get("dur", 0))
    return cpu / 1000


def _server(tree: Path, store, cold: bool) -> T.Server:
    """`python -m moe_probe dash` of a revision's checkout, with or without start-up warming."""
    return T.Server(store, refresh=60.0, timeout=180, repo=tree,
                    env={"MOE_PROBE_DASH_PREWARM": "0" if cold else "1"})


def _first_visit(url: str, rid: str, settle_s: float) -> tuple[float, float, float, int]:
    d = T.make_driver(trace_categories=_TRACE_CATEGORIES)
    try:
        time.sleep(settle_s)
        d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                          {"source": B._PAGE_CLOCK_JS.replace("RID", repr(rid))})
        d.get_log("performance")
        r = B._open_routing(d, _Url(url), rid)
        d.get("about:blank")
        errors = len(T.severe_logs(d))
        msgs = (json.loads(e["message"])["message"] for e in d.get_log("performance"))
        events = [m["params"] for m in msgs if m.get("method") == "Tracing.dataCollected"]
        return r["fold"], r["drawn"], _main_thread_cpu_ms(events, r["fold"]), errors
    finally:
        T.quit_driver(d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("revs", nargs="+", help="git revisions (the first is the reference)")
    ap.add_argument("--store", required=True, help="ROOT holding the generated large run")
    ap.add_argument("--run", default="large")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cold", action="store_true",
                    help="servers without start-up warming (MOE_PROBE_DASH_PREWARM=0): nothing "
                         "of the run has been read when the page is opened")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds between starting chromium and opening the page (0: at once)")
    a = ap.parse_args(argv)
    if a.settle < 0:
        ap.error("--settle must be >= 0 seconds")
    if len(a.revs) < 2:
        ap.error("give at least two revisions")
    if (why := T.browser_missing()):
        ap.error(why)
    tmp = tempfile.TemporaryDirectory(prefix="moe_probe_ab_")
    trees, servers = [], contextlib.ExitStack()
    try:
        for i, rev in enumerate(a.revs):
            tree = Path(tmp.name) / str(i)
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                            str(tree), rev], check=True)
            trees.append(tree)
        warm = []
        if not a.cold:  # one server per revision, warmed at start, for all rounds
            for tree in trees:
                srv = servers.enter_context(_server(tree, a.store, cold=False))
                T.wait_for(lambda s=srv: "prewarm" in s.output(), 180,
                           what=f"start-up warm-up of {tree}")
                warm.append(srv)
        _rounds(a, trees, warm)
    finally:
        servers.close()  # before their checkouts go
        for tree in trees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           check=False)
        tmp.cleanup()
    return 0


def _rounds(a, trees, warm) -> None:
    res = {i: [] for i in range(len(a.revs))}
    for k in range(a.rounds):
        order = list(range(len(a.revs)))
        for i in order[k % len(order):] + order[:k % len(order)]:
            if a.cold:  # a new server for each open: nothing read yet
                with _server(trees[i], a.store, cold=True) as srv:
                    res[i].append(_first_visit(srv.url, a.run, a.settle))
            else:
                res[i].append(_first_visit(warm[i].url, a.run, a.settle))
    print(f"Routing page, first visits (fresh chromium profile started {a.settle:g} s before, "
          f"{'new server without start-up warming' if a.cold else 'server warmed at start'}"
          f"), median of {a.rounds} rounds; ratio to {a.revs[0]}")
    print(f"  {'revision':24s} {'first screen':>18s} {'all graphs':>18s} "
          f"{'main-thread CPU':>18s}  first screens < 1 s  console errors")
    ref = [statistics.median(x[j] for x in res[0]) for j in range(3)]
    for i, rev in enumerate(a.revs):
        med = [statistics.median(x[j] for x in res[i]) for j in range(3)]
        cells = "".join(f"{m:9.0f} ms ({m / r:4.2f})" for m, r in zip(med, ref))
        under = sum(x[0] < 1000 for x in res[i])
        print(f"  {rev[:24]:24s} {cells}  {under:>9d} of {len(res[i]):<9d} "
              f"{sum(x[3] for x in res[i])}")
        print(f"  {'':24s} first screens: {sorted(round(x[0]) for x in res[i])}")


if __name__ == "__main__":
    raise SystemExit(main())
