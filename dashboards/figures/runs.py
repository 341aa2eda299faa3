"""Rows of the Runs page: arch, steps, last capacity rate per modality, diagnosis verdicts.

Verdicts come from `moe_probe.diagnose` (never re-implemented here); a diagnosis is cached per
run and committed-row counts, because a 50k-step run takes a while and a live run keeps changing.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading

from dashboards import data
from dashboards.cache import Cache

log = logging.getLogger("moe_probe.dashboards")
_diagnoses = Cache("diagnoses", entries=256)
_one_at_a_time = threading.Lock()  # each diagnosis is CPU-bound: never two at once


DIAGNOSE_EVERY_S = 30.0
"""A run that keeps committing is re-diagnosed at most this often (a 50k-step diagnosis takes
seconds; the Runs page refreshes every few)."""


def diagnosis(root, run_id, wait_s: float | None = None) -> dict:
    """{"checks": {kind: status}, "findings": [...], "final_capacity_rate": {m: x}, "as_of":
    committed routing rows} or {"error": ...}. Cached per run, versioned by committed rows.

    Computed in a background thread, one run at a time: a 50k-step run takes ~30 s, and the
    Runs page must not hang on it. Waits up to `wait_s` seconds (None: until done) for a result
    not cached yet; then returns the run's previous result, or {"pending": ...} if it has none
    (the page shows the verdict on a later refresh)."""
    version = tuple(sorted(data.committed(root, run_id).items()))
    key = (str(root), run_id)
    old = _diagnoses.peek(key)
    if old and (old.version == version or old.age_s() < DIAGNOSE_EVERY_S):
        return old.value
    # One diagnosis per run at a time: a live run's newer rows wait for the one under way.
    job = _diagnoses.in_flight(key) or _diagnoses.submit(key, version,
                                                          lambda: _diagnose(root, run_id))
    try:
        return job.result(timeout=wait_s)
    except concurrent.futures.TimeoutError:
        return old.value if old else {"pending": "diagnosing…"}


def _diagnose(root, run_id) -> dict:
    try:
        from moe_probe.diagnose.rundata import load_run
        from moe_probe.diagnose.runner import diagnose_run
        with _one_at_a_time:
            d = diagnose_run(load_run(data.resolve_run(root, run_id)))
        return {"checks": dict(d.checks),
                "findings": list(dict.fromkeys(  # one line per kind/modality/onset, not per layer
                    f"{f.severity}: {f.kind}"
                    + (f" ({f.modality})" if f.modality else "")
                    + (f" from step {f.onset_step}" if f.onset_step is not None else "")
                    for f in d.findings)),
                "final_capacity_rate": dict(d.final_capacity_rate),
                "as_of": d.last_step}
    except ImportError as e:
        return {"error": f"diagnosis unavailable ({e})"}
    except Exception as e:  # noqa: BLE001 - a half-written run must not break the table
        log.warning("diagnose %s: %s", run_id, e)
        return {"error": f"diagnosis failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"}


def last_capacity(root, run_id) -> dict:
    """Mean over layers of the last committed capacity rate per modality."""
    from moe_probe.diagnose.runner import final_capacity_rate

    return final_capacity_rate(data.group_dataset(root, run_id, "routing"))


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
