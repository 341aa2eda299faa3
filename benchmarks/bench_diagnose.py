"""Whole-run diagnosis read through the rollup levels vs every row, side by side (no assertions).

    OMP_NUM_THREADS=1 python benchmarks/bench_diagnose.py RUN_DIR [RUN_DIR ...] [--repeat 3]

RUN_DIR: e.g. a store from ``python -m fixtures.generate --large DIR --steps 50000`` (rollups are
written by the writer; ``moe-probe rollup RUN_DIR`` adds them to an older store). Prints, per run
and mode, the best wall time of ``load_run`` + every detector (and that run's process CPU time),
the rows of ``routing`` read, and whether the findings are the same (they must be). Peak memory
is a per-process figure: measure it with
``/usr/bin/time -v python -m moe_probe diagnose RUN_DIR [--full-resolution]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_probe.diagnose.config import DiagnoseConfig  # noqa: E402
from moe_probe.diagnose.rundata import load_run  # noqa: E402
from moe_probe.diagnose.runner import DETECTORS, diagnose_run  # noqa: E402


def once(run_dir: str, levels: bool) -> tuple[float, dict, int, dict, float]:
    cfg = DiagnoseConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    run = load_run(run_dir, levels=levels)
    per = {"load_run": time.perf_counter() - t0}
    for d in DETECTORS:  # each detector timed on its own (the report runs them the same way)
        t = time.perf_counter()
        d(run, cfg)
        per[d.__name__.replace("detect_", "")] = time.perf_counter() - t
    cpu = time.process_time() - c0  # on a shared machine, steadier than the wall
    src = run.source("routing")
    rows = src.rows_read if src else 0
    out = json.dumps(diagnose_run(run, cfg).to_dict(), sort_keys=True)  # not timed
    return sum(per.values()), per, rows, out, cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    for run_dir in a.runs:
        res = {}
        for _ in range(a.repeat):  # interleaved: contention hits both modes alike
            for mode, levels in (("rows", False), ("rollups", True)):
                wall, per, rows, out, cpu = once(run_dir, levels)
                if mode not in res or wall < res[mode][0]:
                    res[mode] = (wall, per, rows, out, cpu)
        n = load_run(run_dir).get("routing").sizes["step"]
        print(f"\n{run_dir}: {n} routed rows")
        print(f"{'':22s}{'every row':>12s}{'rollups':>12s}{'ratio':>8s}")
        for key in res["rows"][1]:
            f, r = res["rows"][1][key], res["rollups"][1][key]
            print(f"{key:22s}{f:11.2f}s{r:11.2f}s{f / max(r, 1e-9):7.1f}x")
        f, r = res["rows"][0], res["rollups"][0]
        print(f"{'total':22s}{f:11.2f}s{r:11.2f}s{f / max(r, 1e-9):7.1f}x")
        f, r = res["rows"][4], res["rollups"][4]
        print(f"{'process CPU':22s}{f:11.2f}s{r:11.2f}s{f / max(r, 1e-9):7.1f}x")
        print(f"{'routing rows read':22s}{res['rows'][2]:12d}{res['rollups'][2]:12d}")
        same = res["rows"][3] == res["rollups"][3]
        print(f"same findings and onsets: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
