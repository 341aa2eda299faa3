"""Rows of the Runs page: arch, steps, last capacity rate per modality, diagnosis verdicts.

Verdicts come from `moe_probe.diagnose` (never re-implemented here); a diagnosis is cached per
run and committed-row counts, because a 50k-step run takes a while and a live run keeps changing.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

from dashboards import data

log = logging.getLogger("moe_probe.dashboards")
_diag_cache: dict = {}
_jobs: dict = {}  # (root, run) -> Future of the diagnosis under way (one per run at most)
_lock = threading.Lock()
_one_at_a_time = threading.Lock()


DIAGNOSE_EVERY_S = 30.0
"""A run that keeps committing is re-diagnosed at most this often (a 50k-step diagnosis takes
seconds; the Runs page refreshes every few)."""


def diagnosis(root, run_id, wait_s: float | None = None) -> dict:
    """{"checks": {kind: status}, "findings": [...], "final_capacity_rate": {m: x}, "as_of":
    committed routing rows} or {"error": ...}. Cached per run and committed rows.

    Computed in a background thread, one run at a time: a 50k-step run takes ~30 s, and the
    Runs page must not hang on it. Waits up to `wait_s` seconds (None: until done) for a result
    not cached yet; then returns the run's previous result, or {"pending": ...} if it has none
    (the page shows the verdict on a later refresh)."""
    committed = data.committed(root, run_id)
    key = (str(root), run_id)
    version = tuple(sorted(committed.items()))
    with _lock:
        hit = _diag_cache.get(key)
        if hit and (hit[0] == version or time.monotonic() - hit[1] < DIAGNOSE_EVERY_S):
            return hit[2]
        job = _jobs.get(key)
        if job is None:
            job = _jobs[key] = _start(root, run_id, version, key)
    try:
        return job.result(timeout=wait_s)
    except concurrent.futures.TimeoutError:
        return hit[2] if hit else {"pending": "diagnosing…"}


def _start(root, run_id, version, key) -> concurrent.futures.Future:
    """Diagnose in a daemon thread (a server stopped with Ctrl-C must not wait ~30 s for it),
    one run at a time (each is CPU-bound)."""
    fut = concurrent.futures.Future()

    def work():
        with _one_at_a_time:
            fut.set_result(_diagnose(root, run_id, version, key))

    threading.Thread(target=work, name="moe-probe-diagnose", daemon=True).start()
    return fut


def _diagnose(root, run_id, version, key) -> dict:
    try:
        from moe_probe.diagnose.rundata import load_run
        from moe_probe.diagnose.runner import diagnose_run
        d = diagnose_run(load_run(data.resolve_run(root, run_id)))
        out = {"checks": dict(d.checks),
               "findings": list(dict.fromkeys(  # one line per kind/modality/onset, not per layer
                   f"{f.severity}: {f.kind}"
                   + (f" ({f.modality})" if f.modality else "")
                   + (f" from step {f.onset_step}" if f.onset_step is not None else "")
                   for f in d.findings)),
               "final_capacity_rate": dict(d.final_capacity_rate),
               "as_of": d.last_step}
    except ImportError as e:
        out = {"error": f"diagnosis unavailable ({e})"}
    except Exception as e:  # noqa: BLE001 - a half-written run must not break the table
        log.warning("diagnose %s: %s", run_id, e)
        out = {"error": f"diagnosis failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"}
    with _lock:
        _diag_cache[key] = (version, time.monotonic(), out)
        while len(_diag_cache) > 256:
            _diag_cache.pop(next(iter(_diag_cache)))
        _jobs.pop(key, None)
    return out


def last_capacity(root, run_id) -> dict:
    """Mean over layers of the last committed capacity rate per modality."""
    import numpy as np
    ds = data.group_dataset(root, run_id, "routing")
    if ds is None:
        return {}
    last = np.asarray(ds["capacity_rate"].isel(step=-1).transpose("layer", "modality").values,
                      dtype=float)
    out = {}
    for j, m in enumerate(ds["modality"].values):
        col = last[:, j]
        out[str(m)] = float(np.nanmean(col)) if np.isfinite(col).any() else None
    return out


def run_row(root, run_id, with_diagnosis: bool = True, wait_s: float | None = None) -> dict:
    try:
        meta = data.run_meta(root, run_id)
    except data.DataError as e:
        return {"id": run_id, "error": str(e)}
    row = {"id": run_id, "name": meta["name"], "arch": meta["arch"], "recipe": meta["recipe"],
           "steps": meta["last_step"], "committed": meta["committed"],
           "capacity": last_capacity(root, run_id)}
    if with_diagnosis:
        row["diagnosis"] = diagnosis(root, run_id, wait_s)
    return row
