"""`moe-probe reproduce --quick` end to end (subprocess), interrupted and resumed.

One module-scoped study (tiny recipes, 2 seeds): the first invocation is killed (SIGKILL, a
crash) while a run is half done, the second continues it, the third finds everything done.
The results are then checked against the stores: every cell's per-seed values are recomputed
from its recorded sources with this file's own numpy code, and mean / CI / verdicts from them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import moe_probe

pytestmark = pytest.mark.slow

KINDS = ["moe", "mot", "symbiotic", "und_only", "sym_no_shield", "sym_no_difflr",
         "sym_und_1_4", "sym_und_1_2"]
SEEDS = [0, 1]
VERDICTS = {"supports", "refutes", "inconclusive"}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MOE_PROBE_JOBS": "1",
            "PYTHONUNBUFFERED": "1"}


def _cmd(out, *extra):
    return [sys.executable, "-m", "moe_probe", "reproduce", "--quick", "--out", str(out), *extra]


def _runs(out: Path):
    return [out / k / f"seed{s}" for s in SEEDS for k in KINDS]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("repro") / "study"
    log = open(out.parent / "first.log", "w")
    first = subprocess.Popen(_cmd(out), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    killed_partial = None
    deadline = time.time() + 400
    try:
        # Kill once a run is finished and the next one has a checkpoint but no done marker.
        while first.poll() is None and time.time() < deadline:
            done = [r for r in _runs(out) if (r / "reproduce_done.json").is_file()]
            partial = [r for r in _runs(out) if (r / "checkpoint.pt").is_file()
                       and not (r / "reproduce_done.json").is_file()]
            if done and partial:
                first.send_signal(signal.SIGKILL)
                killed_partial = partial[0]
                break
            time.sleep(0.02)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert killed_partial is not None, "the first invocation was not caught mid-run"
    before = {r: (r / "reproduce_done.json").stat().st_mtime_ns for r in _runs(out)
              if (r / "reproduce_done.json").is_file()}

    second = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    after = {r: (r / "reproduce_done.json").stat().st_mtime_ns for r in _runs(out)}

    t0 = time.perf_counter()
    third = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=600)
    third_s = time.perf_counter() - t0
    assert third.returncode == 0, third.stderr[-3000:]
    return {"out": out, "killed_partial": killed_partial, "before": before, "after": after,
            "second": second, "third": third, "third_s": third_s}


# ----------------------------------------------------------------------------- resumability

def test_interrupted_run_is_continued_not_restarted(study):
    mark = json.loads((study["killed_partial"] / "reproduce_done.json").read_text())
    assert mark["resumed_from"] is not None and mark["resumed_from"] > 0
    store = moe_probe.open_run(study["killed_partial"])
    steps = store.dataset("loss")["step"].values
    assert list(steps) == list(range(mark["steps"]))  # no step lost or written twice


def test_resumed_run_equals_an_uninterrupted_one(study, tmp_path):
    """The continued run trains exactly like one that was never killed (same base, seed)."""
    run = study["killed_partial"]
    mark = json.loads((run / "reproduce_done.json").read_text())
    fresh = tmp_path / "fresh"
    cmd = [sys.executable, "-m", "moe_probe", "train", "--recipe", mark["recipe"], "--seed",
           str(mark["seed"]), "--out", str(fresh), "--quiet"]
    for o in mark["overrides"]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env={**_env(), "MOE_PROBE_CACHE": str(study["out"] / ".base")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = moe_probe.open_run(run), moe_probe.open_run(fresh)
    for group, var in (("loss", "value"), ("routing", "capacity_rate"), ("eval", "value"),
                       ("grad", "cosine")):
        np.testing.assert_array_equal(a.read(group, var).values, b.read(group, var).values,
                                      err_msg=f"{group}/{var}")


def test_finished_runs_are_skipped(study):
    for run, mtime in study["before"].items():
        assert study["after"][run] == mtime, f"{run} was trained again"
    third = study["third"]
    assert f"{len(KINDS) * len(SEEDS)} already done, 0 to train" in third.stdout + third.stderr
    for run, mtime in study["after"].items():
        assert (run / "reproduce_done.json").stat().st_mtime_ns == mtime
    assert study["third_s"] < 120  # reading stores + report only


def test_runs_of_a_seed_share_one_base(study):
    bases = {}
    for run in _runs(study["out"]):
        mark = json.loads((run / "reproduce_done.json").read_text())
        bases.setdefault(mark["seed"], set()).add(mark["base"])
    assert all(len(b) == 1 for b in bases.values()), bases
    assert len({next(iter(b)) for b in bases.values()}) == len(SEEDS)
    assert all((study["out"] / ".base" / next(iter(b))).is_dir() for b in bases.values())


# ----------------------------------------------------------------------------- results

def _per_step(da) -> np.ndarray:
    a = np.asarray(da.transpose("step", ...).values, dtype=float).reshape(da.sizes["step"], -1)
    out = np.full(a.shape[0], np.nan)
    for i, row in enumerate(a):
        fin = row[np.isfinite(row)]
        if fin.size:
            out[i] = fin.mean()
    return out


def _reduce(v: np.ndarray, how: str, w: int) -> float:
    if not np.isfinite(v).any():
        return math.nan
    if how == "tail_mean":
        return float(np.nanmean(v[-w:]))
    if how == "min_window_mean":
        return float(min(np.nanmean(v[i - w + 1: i + 1]) for i in range(w - 1, len(v))
                         if np.isfinite(v[i - w + 1: i + 1]).any()))
    return float({"last": lambda: v[-1], "change": lambda: v[-1] - v[0],
                  "max": lambda: np.nanmax(v), "min": lambda: np.nanmin(v),
                  "mean": lambda: np.nanmean(v)}[how]())


def _close(a, b):
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_result_files_have_the_documented_structure(study):
    out = study["out"]
    for name in ("results.md", "results.csv", "results.json", "claims.csv", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    metrics = [m["key"] for m in res["metrics"]]
    for key in ("cap_final_text", "cap_final_vit", "cap_final_vae", "cap_min_text", "cap_min_vit",
                "cap_min_vae", "gen_loss", "gen_acc", "text_loss", "digit_acc", "iso_text_loss",
                "iso_digit_acc", "selectivity", "shared_cos"):
        assert key in metrics
    assert [k["name"] for k in res["kinds"]] == KINDS
    assert set(res["cells"]) == set(KINDS)
    for kind in KINDS:
        assert set(res["cells"][kind]) == set(metrics)
        for cell in res["cells"][kind].values():
            assert {"n", "mean", "ci_low", "ci_high", "values", "sources"} <= set(cell)
            assert len(cell["sources"]) == len(SEEDS)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(KINDS) * len(metrics)
    assert {"kind", "metric", "n", "mean", "ci_low", "ci_high"} <= set(rows[0])
    for row in rows:
        cell = res["cells"][row["kind"]][row["metric"]]
        assert int(row["n"]) == cell["n"]
        assert _close(float(row["mean"]) if row["mean"] else None, cell["mean"])
    md = (out / "results.md").read_text()
    for kind in KINDS:
        assert md.count(f"| {kind} |") == 3  # one row in each sub-table
    for m in res["metrics"]:
        assert m["label"] in md
    html = (out / "report.html").read_text()
    assert "symbiotic/seed1" in html and "und_only/seed0" in html


def test_every_number_traces_back_to_a_store(study):
    out = study["out"]
    res = json.loads((out / "results.json").read_text())
    stores = {}
    for kind, row in res["cells"].items():
        for key, cell in row.items():
            for src, val in zip(cell["sources"], cell["values"]):
                assert src["run"] == val["run"] and src["run"].startswith(f"{kind}/seed")
                store = stores.setdefault(src["run"], moe_probe.open_run(out / src["run"]))
                da = store.read(src["group"], src["var"], **src["sel"])
                got = _reduce(_per_step(da), src["reduce"], src["window"])
                assert _close(got, val["value"]), (kind, key, src, got, val)
            xs = [v["value"] for v in cell["values"] if v["value"] is not None]
            assert cell["n"] == len(xs)
            if xs:
                assert _close(float(np.mean(xs)), cell["mean"])
            if len(xs) >= 2:
                sem = stats.sem(xs)
                lo, hi = ((np.mean(xs), np.mean(xs)) if sem == 0 else
                          stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=sem))
                assert _close(float(lo), cell["ci_low"]) and _close(float(hi), cell["ci_high"])
            else:
                assert cell["ci_low"] is None
    # The generation metrics of the understanding-only control are not measured, not zero.
    assert res["cells"]["und_only"]["gen_loss"]["n"] == 0
    assert res["cells"]["symbiotic"]["gen_loss"]["n"] == len(SEEDS)


def _holm_rejected(ps: dict, alpha=0.05) -> set:
    """Holm's step-down by its definition over the testable comparisons (p not None)."""
    order = sorted((k for k, p in ps.items() if p is not None), key=lambda k: ps[k])
    out = set()
    for rank, k in enumerate(order):
        if ps[k] > alpha / (len(order) - rank):
            break
        out.add(k)
    return out


def test_claim_verdicts_are_paired_tests_recomputed_from_the_stores(study):
    """Per seed, each comparison's two values are re-read from the stores (the recorded sources,
    this file's own reductions); scipy's paired t-test, Holm by its definition and the verdict
    rules are applied here, and every recorded statistic must agree."""
    out = study["out"]
    res = json.loads((out / "results.json").read_text())
    stores = {}

    def per_seed(kind, metric):
        vals = {}
        for src, val in zip(res["cells"][kind][metric]["sources"],
                            res["cells"][kind][metric]["values"]):
            store = stores.setdefault(src["run"], moe_probe.open_run(out / src["run"]))
            got = _reduce(_per_step(store.read(src["group"], src["var"], **src["sel"])),
                          src["reduce"], src["window"])
            if math.isfinite(got):
                vals[val["seed"]] = got
        return vals

    rows = list(csv.DictReader(open(out / "claims.csv")))
    assert len(rows) == sum(len(c["comparisons"]) for c in res["claims"])
    assert [c["id"] for c in res["claims"]] == list(range(1, 8))
    for claim in res["claims"]:
        ps, diffs = {}, {}
        for i, c in enumerate(claim["comparisons"]):
            a, b = per_seed(c["a"], c["metric"]), per_seed(c["b"], c["metric"])
            seeds = sorted(set(a) & set(b))
            x, y = [a[s] for s in seeds], [b[s] for s in seeds]
            t = c["paired"]
            assert t["test"] == "paired" and t["n_a"] == len(seeds) and t["seeds"] == seeds
            d = np.subtract(x, y)
            if len(seeds) >= 2 and np.std(d) > 0:
                ref = stats.ttest_rel(x, y)
                lo, hi = ref.confidence_interval(0.95)
                for got, want in ((t["diff"], d.mean()), (t["t"], ref.statistic),
                                  (t["p"], ref.pvalue), (t["ci_low"], lo), (t["ci_high"], hi),
                                  (t["effect"], d.mean() / np.std(d, ddof=1))):
                    assert _close(got, float(want)), (claim["id"], c, got, want)
                ps[i] = ref.pvalue
            else:
                assert t["p"] is None
                ps[i] = None
            diffs[i] = d.mean() if len(d) else None
        rejected = _holm_rejected(ps)
        got = []
        for i, c in enumerate(claim["comparisons"]):
            want = "inconclusive"
            if i in rejected:
                want = "supports" if (diffs[i] > 0) == (c["expect"] == "greater") else "refutes"
            assert c["verdict"] == want, (claim["id"], c)
            got.append(want)
            # the former rule, kept as secondary information
            ca, cb = res["cells"][c["a"]][c["metric"]], res["cells"][c["b"]][c["metric"]]
            if ca["n"] < 2 or cb["n"] < 2 or (ca["ci_low"] <= cb["ci_high"]
                                              and cb["ci_low"] <= ca["ci_high"]):
                assert c["overlap"]["verdict"] == "inconclusive"
            else:
                assert c["overlap"]["verdict"] == (
                    "supports" if (ca["mean"] > cb["mean"]) == (c["expect"] == "greater")
                    else "refutes")
        want = ("refutes" if "refutes" in got else
                "supports" if set(got) == {"supports"} else "inconclusive")
        assert claim["verdict"] == want
    md = (out / "results.md").read_text()
    for claim in res["claims"]:
        assert f"**Claim {claim['id']}**" in md
        assert f"**Verdict: {claim['verdict']}.**" in md
    assert md.count("expected (paper):") == 7


def test_parallel_workers_train_the_same_runs(study, tmp_path, monkeypatch):
    """Two worker processes (bases first, then runs) give the sequential study's numbers."""
    from moe_probe.reproduce.config import KINDS as ALL_KINDS, ReproduceConfig
    from moe_probe.reproduce.runner import prepare_out, run_plan

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = ReproduceConfig(quick=True, seeds=tuple(SEEDS), kinds=ALL_KINDS[:2], jobs=2)
    out = tmp_path / "par"
    prepare_out(cfg, out)
    plan = run_plan(cfg, out)
    assert len(plan) == 2 * len(SEEDS)
    for spec in plan:
        rel = spec.run_dir.relative_to(out)
        a, b = moe_probe.open_run(spec.run_dir), moe_probe.open_run(study["out"] / rel)
        for group, var in (("loss", "value"), ("eval", "value")):
            np.testing.assert_array_equal(a.read(group, var).values, b.read(group, var).values,
                                          err_msg=f"{rel} {group}/{var}")
