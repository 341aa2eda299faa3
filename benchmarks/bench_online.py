"""Cost of one online check (``watch(on_finding=...)``) on a long, wide run, side by side.

The first ``--rows`` routed rows of a store (e.g. the 50k-step benchmark store,
``python -m fixtures.generate --large --steps 50000 DIR``) are handed to an
:class:`~moe_probe.diagnose.online.OnlineDiagnosis` row by row, as a writer hands them; then a
check (the first folds every row into the in-memory levels), ten more rows, and the next check,
timed against the same detectors on every row (no levels). Prints the times, the rows read and
whether the findings agree.

    OMP_NUM_THREADS=1 python benchmarks/bench_online.py RUN_DIR [--rows 20000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_probe import open_run  # noqa: E402
from moe_probe.diagnose.online import OnlineDiagnosis  # noqa: E402
from moe_probe.diagnose.rundata import NEEDED, RunData  # noqa: E402
from moe_probe.diagnose.runner import diagnose_run  # noqa: E402
from moe_probe.store.schema import LABEL_DIMS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rows", type=int, nargs="*", default=[20000])
    a = p.parse_args(argv)
    store = open_run(a.run_dir)
    labels = {"routing": {d: store.labels("routing", d) for d in LABEL_DIMS["routing"]}}
    print(f"{'rows':>8}{'first check s':>15}{'next check s':>14}{'rows read':>11}"
          f"{'every row s':>13}{'rows read':>11}{'ratio':>7}  same findings")
    for n in a.rows:
        ds = store.dataset("routing").isel(step=slice(0, n + 10))
        rows = {k: ds[k].values for k in NEEDED["routing"]}
        steps = ds["step"].values
        online = OnlineDiagnosis(attrs=store.attrs, labels=labels, run_dir=str(a.run_dir))

        def feed(lo, hi):
            for i in range(lo, hi):
                online.add("routing", int(steps[i]), **{k: v[i] for k, v in rows.items()})

        feed(0, n)
        t = time.perf_counter()
        online.diagnose()
        first = time.perf_counter() - t
        feed(n, len(steps))
        t = time.perf_counter()
        run = online.run_data()
        got = diagnose_run(run)
        nxt = time.perf_counter() - t
        every = RunData(name=run.name, run_dir=run.run_dir, attrs=run.attrs, groups=run.groups)
        t = time.perf_counter()
        want = diagnose_run(every)
        full = time.perf_counter() - t
        print(f"{len(steps):>8}{first:>15.2f}{nxt:>14.2f}{run.source('routing').rows_read:>11}"
              f"{full:>13.2f}{every.source('routing').rows_read:>11}{full / nxt:>7.1f}  "
              f"{got.to_dict() == want.to_dict()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
