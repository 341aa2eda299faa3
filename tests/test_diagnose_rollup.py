"""Diagnosis through the rollup levels equals diagnosis of every row: every fixture store, an
older store given levels by `moe-probe rollup`, and a long generated store with planted onsets."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
import pytest
import zarr

from fixtures import synth
from fixtures.generate import NAMES
from moe_probe.cli import main
from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.rundata import load_run
from moe_probe.diagnose.runner import diagnose_run
from moe_probe.run import store_path
from moe_probe.store import StoreWriter, default_coords

ROOT = Path(__file__).resolve().parents[1] / "fixtures"


def _both(run_dir, cfg=None):
    cfg = cfg or DiagnoseConfig()
    fast, full = load_run(run_dir), load_run(run_dir, levels=False)
    a, b = diagnose_run(fast, cfg), diagnose_run(full, cfg)
    assert json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)
    return a, fast.source("routing"), full.source("routing")


@pytest.mark.parametrize("name", NAMES)
def test_fixture_store_same_findings_through_levels(name):
    _, fast, full = _both(ROOT / "stores" / name)
    assert fast.levels and not full.levels  # the levels were there, and used


@pytest.mark.parametrize("cfg", [DiagnoseConfig(window=5, smooth=1),
                                 DiagnoseConfig(window=40, smooth=4, dead_frac=0.1,
                                                collapse_rate=0.95)])
def test_other_windows_and_thresholds_same_findings(cfg):
    for name in ("collapse", "dead_experts", "healthy"):
        _both(ROOT / "stores" / name, cfg)


def test_older_store_given_levels_by_the_rollup_command(tmp_path):
    old = tmp_path / "v1.0"
    shutil.copytree(ROOT / "frozen" / "v1.0-healthy", old)
    before = diagnose_run(load_run(old), DiagnoseConfig())  # no levels: every row
    assert main(["rollup", str(old)]) == 0
    after, fast, _ = _both(old)
    assert fast.levels
    assert json.dumps(before.to_dict(), sort_keys=True) == json.dumps(after.to_dict(),
                                                                      sort_keys=True)


def _long_store(run_dir, n=20_480, collapse_from=15_001, dead_from=12_345):
    """2 layers x 8 experts, top-2, C = 1: text of layer 1 piles onto experts 0-1 from
    ``collapse_from`` (its capacity rate falls below 0.5); experts 6-7 of layer 0 get nothing from
    ``dead_from``. Written by the writer in blocks, rollups as it goes."""
    rng = np.random.default_rng(7)
    e, k, layers = 8, 2, ["0", "1"]
    groups, mgroup = synth.group_layout("moe", e)
    mask = synth.mt.group_masks(e, groups, mgroup)
    base = synth.base_probs(rng, 2, e, mask)
    attrs = {"run": {"name": "long"}, "model": {"arch": "moe", "top_k": k, "layers": layers,
                                                 "experts": e, "capacity_factor": 1.0}}
    coords = default_coords(layers=layers, n_experts=e, isolated_metrics=None,
                            groups=("routing",))
    with StoreWriter.create(store_path(run_dir), attrs=attrs, coords=coords) as w:
        for s0 in range(0, n, 4096):
            steps = np.arange(s0, min(n, s0 + 4096))
            probs = np.broadcast_to(base, (steps.size, *base.shape)).copy()
            hit = steps >= collapse_from
            conc = np.zeros(e)
            conc[:2] = 0.5
            probs[hit, 1, 0] = conc
            dead = steps >= dead_from
            p = probs[dead, 0]
            p[..., 6:] = 0
            probs[dead, 0] = p / p.sum(-1, keepdims=True)
            tokens = synth.draw_tokens(rng, steps.size, 2, (96, 64, 128))
            load = synth.draw_load(rng, tokens, probs, k)
            w.append_rows("routing", steps, **synth.routing_rows(rng, tokens, load, k, groups,
                                                                  mgroup, 1.0))
    return run_dir


def test_planted_onsets_in_a_long_store_are_exact(tmp_path):
    run_dir = _long_store(tmp_path / "long")
    d, fast, full = _both(run_dir)
    found = {(f.kind, f.modality): f for f in d.findings}
    dead = found["dead_experts", None]
    assert dead.onset_step == 12_345 and dead.layers == ("0",)
    assert dead.evidence["experts"] == [6, 7]
    col = found["routing_collapse", "text"]  # (layer 0 overflows too once 6-7 are dead)
    assert col.evidence["per_layer"]["1"]["onset_step"] == 15_001
    assert fast.rows_read < full.rows_read / 4  # the levels kept most rows unread


def test_online_diagnosis_screens_with_levels_kept_in_memory(tmp_path):
    """Online checks (rows handed over one at a time, as a writer's) fold the rows into levels
    kept in memory and screen with them: at each check the findings equal every row's, while
    most rows stay unread; the final check equals offline `diagnose` of the store."""
    from moe_probe.diagnose.online import OnlineDiagnosis
    from moe_probe.diagnose.rundata import RunData
    from moe_probe.run import open_run

    run_dir = _long_store(tmp_path / "long")
    store = open_run(run_dir)
    ds = store.dataset("routing")
    rows = {n: ds[n].values for n in ("tokens", "capacity_rate", "load")}
    online = OnlineDiagnosis(attrs=store.attrs, labels={"routing": {
        d: store.labels("routing", d) for d in ("layer", "modality", "expert")}},
        run_dir=str(run_dir))
    steps = ds["step"].values
    start, checks = 0, []
    for stop in (9_000, 13_000, 16_003, steps.size):
        for i in range(start, stop):
            online.add("routing", int(steps[i]), **{n: a[i] for n, a in rows.items()})
        start = stop
        run = online.run_data()
        got = diagnose_run(run)
        every_row = RunData(name=run.name, run_dir=run.run_dir, attrs=run.attrs,
                            groups=run.groups)
        want = diagnose_run(every_row)
        assert json.dumps(got.to_dict(), sort_keys=True) == json.dumps(want.to_dict(),
                                                                       sort_keys=True), stop
        src, full = run.source("routing"), every_row.source("routing")
        assert src.levels and src.covered == stop - stop % 16
        assert src.rows_read < full.rows_read / 4, stop  # the in-memory levels were used
        checks.append({(f.kind, f.modality): f.onset_step for f in got.findings})
    assert ("dead_experts", None) not in checks[0] and checks[1]["dead_experts", None] == 12_345
    assert checks[-1]["routing_collapse", "text"] <= 15_001
    offline = diagnose_run(load_run(run_dir))
    assert json.dumps(got.to_dict(), sort_keys=True) == json.dumps(offline.to_dict(),
                                                                   sort_keys=True)
    # the in-memory windows are the store's own (where the writer has written them)
    compared = []
    for f, lv in run.levels["routing"].items():
        stored = store.dataset("routing", level=f)
        n = min(lv.sizes["step"], stored.sizes["step"])
        for var in ("step_last", "tokens", "load", "capacity_rate", "group_dead_frac"):
            xr.testing.assert_equal(lv[var].isel(step=slice(0, n)).reset_coords(drop=True),
                                    stored[var].isel(step=slice(0, n)).reset_coords(drop=True))
        if n:
            compared.append(f)
    assert compared == [16, 256]  # x4096 holds no whole chunk in the store yet


def test_cli_full_resolution_gives_the_same_report(tmp_path, capsys):
    run = ROOT / "stores" / "collapse"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["diagnose", str(run), "--json", str(a)]) == 0
    assert main(["diagnose", str(run), "--full-resolution", "--json", str(b)]) == 0
    capsys.readouterr()
    assert a.read_text() == b.read_text() and json.loads(a.read_text())["findings"]


def test_levels_that_disagree_with_the_rows_are_not_used(tmp_path):
    # rows rewritten under levels built before (what a pre-1.2 writer's resume could leave)
    run = tmp_path / "collapse"
    shutil.copytree(ROOT / "stores" / "collapse", run)
    steps = zarr.open_array(str(store_path(run) / "routing" / "step"), mode="r+")
    steps[:] = steps[:] + 1
    fast = load_run(run)
    assert fast.levels["routing"] and not fast.source("routing").levels
    _both(run)


def _reference(x, *, window, smooth, below=None, above=None):
    """The detectors' definition on one whole series: pandas' centred running median (NaN rows
    stay NaN), then the first row of the first run of `window` rows beyond the bound."""
    import pandas as pd

    s = pd.Series(x).rolling(smooth, center=True, min_periods=1).median().to_numpy().copy()
    s[np.isnan(x)] = np.nan
    run = 0
    beyond = (s > above) if above is not None else (s < below)
    for i, m in enumerate(beyond & ~np.isnan(s)):
        run = run + 1 if m else 0
        if run >= window:
            return i - window + 1
    return None


def test_first_runs_is_the_whole_series_definition():
    import xarray as xr

    from moe_probe.diagnose.source import GroupSource, first_runs

    rng = np.random.default_rng(3)
    for _ in range(150):
        n, c = int(rng.integers(1, 700)), 3
        x = rng.random((n, c))
        x[rng.random((n, c)) < 0.1] = np.nan
        smooth, window = int(rng.integers(1, 6)), int(rng.integers(1, 25))
        src = GroupSource(xr.Dataset({"v": (("step", "layer"), x)},
                                     coords={"step": np.arange(n)}))
        got = first_runs(src, n, c, lambda a, b: x[a:b], below=0.3, window=window, smooth=smooth)
        assert got == [_reference(x[:, j], below=0.3, window=window, smooth=smooth)
                       for j in range(c)]


def _stats_level(x_RC, steps, f):
    """A finest level of one rate as the writer keeps it: per window of ``f`` rows the NaN-skipping
    min, max, mean, the count of non-NaN rows and of rows above 0."""
    import xarray as xr

    w = len(x_RC) // f
    g = x_RC[:w * f].reshape(w, f, -1)
    count = np.isfinite(g).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: NaN, as stored
        st = np.stack([np.nanmin(g, 1), np.nanmax(g, 1), np.nansum(g, 1) / count, count,
                       (g > 0).sum(1)], axis=1)
    return xr.Dataset({"v": (("step", "stat", "layer"), st),
                       "step_last": (("step",), steps[f - 1:w * f:f])},
                      coords={"step": steps[:w * f:f],
                              "stat": ["min", "max", "mean", "count", "positive"]})


def test_first_runs_screened_by_a_level_is_the_whole_series_definition():
    # sparse series with dense stretches planted: most windows can be ruled out, a few cannot
    import xarray as xr

    from moe_probe.diagnose.source import GroupSource, first_runs, rows_beyond

    rng = np.random.default_rng(11)
    read = total = 0
    for trial in range(300):
        n, c, f = int(rng.integers(40, 900)), 3, 16
        x = (rng.random((n, c)) < rng.uniform(0.05, 0.5)) * rng.integers(1, 4, (n, c)) / 4
        with_nan = trial % 2 == 1
        if with_nan:
            x[rng.random((n, c)) < rng.uniform(0, 0.3)] = np.nan
        smooth, window = int(rng.integers(1, 6)), int(rng.integers(1, 30))
        for _ in range(int(rng.integers(0, 4))):
            b, j = int(rng.integers(1, 40)), int(rng.integers(0, c))
            a = int(rng.choice([0, n - b, rng.integers(0, n)]))  # the ends are special
            i = np.arange(x[a:a + b, j].size) + int(rng.integers(0, smooth))
            # as few rows beyond as a stretch can have: per `smooth` rows, ceil(smooth/2) (the
            # others 0), or one (the others NaN); or rows beyond at random
            gap = rng.choice([i % smooth < smooth // 2, i % smooth < smooth - 1,
                              rng.random(i.size) < 0.4])
            x[a:a + b, j] = np.where(gap, np.nan if with_nan else 0.0, 0.5)
        steps = np.arange(n) * 2
        src = GroupSource(xr.Dataset({"v": (("step", "layer"), x)}, coords={"step": steps}),
                          {f: _stats_level(x, steps, f)})
        fetch = (lambda rs: src.prefetch("v", rs)) if trial % 4 < 2 else None
        for bound in ({"above": 0.0}, {"above": 0.3}, {"below": 0.3}):
            beyond = rows_beyond(src, "v", quantum=0.25 if "above" in bound else 0.0, **bound)
            got = first_runs(src, n, c, lambda a, b: src.rows("v", a, b), beyond, window=window,
                             smooth=smooth, nan_free=not with_nan, prefetch=fetch, **bound)
            assert got == [_reference(x[:, j], window=window, smooth=smooth, **bound)
                           for j in range(c)]
        read, total = read + src.rows_read, total + 3 * n
    assert read < total / 2  # the level ruled rows out


def test_groups_no_detector_reads_are_opened_on_first_use():
    from moe_probe import open_run

    run_dir = ROOT / "stores" / "collapse"
    run = load_run(run_dir)
    store = open_run(run_dir)
    assert "loss" not in run.groups and "loss" in run.openers  # diagnosis never reads it
    report = diagnose_run(run, DiagnoseConfig())
    assert "loss" not in run.groups
    assert report.steps == {g: store.committed_steps(g) for g in store.groups
                            if store.committed_steps(g)}
    assert report.last_step == max(store.last_step(g) for g in report.steps)
    loss = run.get("loss")  # the HTML report's figures: opened then, as the store has it
    assert loss.sizes["step"] == store.committed_steps("loss") and "loss" in run.groups
