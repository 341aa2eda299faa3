"""`moe-probe rollup RUN_DIR`: add (or complete) the rollup levels of a run's store.

For stores written before schema 1.2 (and the fixture stores): the levels are folded from the
committed rows, which are not changed. Bad input (no run, not a store, a newer schema) is a
ValueError: one line, exit 2.
"""

from __future__ import annotations

import time

from moe_probe.run import open_run
from moe_probe.store.location import local_path
from moe_probe.store.rollup import add_rollups


def rollup(args) -> int:
    # writes into the store: local only (one line for a URL)
    store = open_run(local_path(args.run_dir, "rollup"))  # one-line errors
    t0 = time.perf_counter()
    for g, rows in add_rollups(store.store_path).items():
        print(f"{g}: rollup levels cover {rows} of {store.committed_steps(g)} rows")
    print(f"rollups of {store.path} written in {time.perf_counter() - t0:.1f} s")
    return 0
