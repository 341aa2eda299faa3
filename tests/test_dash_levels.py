"""The dashboard's bucketed reads from rollup levels (data.read_buckets) against the rows.

A generated store with levels x16/x256/x4096; every check compares what the level path gives with
what the rows alone give for the same buckets (the path a store without levels takes).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from dashboards import cache, data
from dashboards.figures import compare as CMP, routing as R
from moe_probe.run import store_path

N = 20_000


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from fixtures.large import build_large
    r = tmp_path_factory.mktemp("levels")
    build_large(r, n_steps=N, n_layers=2, n_experts=8, block=4096, snapshot_every=5000,
                name="run")
    return r


@pytest.fixture(autouse=True)
def _cold():
    cache.clear_all()  # each test reads the store (other tests copy/alter stores at one path)
    yield


CASES = [  # (group, var, labels)
    ("routing", "capacity_rate", {"layer": "1"}),
    ("routing", "capacity_rate", {"modality": "vae"}),
    ("routing", "entropy", {"layer": "0"}),
    ("routing", "load", {"layer": "1", "modality": "text"}),
    ("routing", "tokens", {"layer": "0"}),
    ("loss", "value", {"term": "gen"}),
]
RANGES = [None, (3, 19_990), (4096, 8191), (777, 5000), (100, 300)]


def _both(root, group, var, sel, rng, target, rid="run"):
    lv = data.read_buckets(root, rid, group, var, step_range=rng, target=target, **sel)
    rows = data.read_buckets(root, rid, group, var, step_range=rng, target=target, levels=False,
                             **sel)
    return lv, rows


def _assert_same(lv, rows):
    """Same buckets: sums and extremes exact, means to float32 rounding (the levels store
    float32 window means), extremes' steps within the window that holds them."""
    assert lv.size == rows.size and lv.dims == rows.dims and lv.coords == rows.coords
    np.testing.assert_array_equal(lv.step, rows.step)
    if rows.sum is not None:
        np.testing.assert_array_equal(lv.sum, rows.sum)
        return
    np.testing.assert_array_equal(lv.min, rows.min)
    np.testing.assert_array_equal(lv.max, rows.max)
    np.testing.assert_array_equal(lv.count, rows.count)
    np.testing.assert_allclose(lv.mean, rows.mean, rtol=2e-7, atol=1e-7, equal_nan=True)
    for a, b in ((lv.min_step, rows.min_step), (lv.max_step, rows.max_step)):
        assert np.all((a <= b) & (b < a + lv.factor)), "extreme drawn outside its window"


@pytest.mark.parametrize("group,var,sel", CASES)
def test_level_buckets_equal_row_buckets(root, group, var, sel):
    for rng in RANGES:
        for target in (40, 300, 1500):
            lv, rows = _both(root, group, var, sel, rng, target)
            _assert_same(lv, rows)
            assert set(rows.read) == {"rows"}
            if rng is None and target <= 300:  # 20k rows in <= 300 buckets: >= 16 rows each
                assert lv.factor >= 16 and "rows" not in lv.read


def test_level_path_reads_few_rows(root):
    n_values = {}
    for levels in (True, False):
        b = data.read_buckets(root, "run", "routing", "capacity_rate", layer="0", target=750,
                              levels=levels, step_range=(5, N))
        n_values[levels] = sum(b.read.values())
    assert b.size == 32 and len(b.step) == 625  # 19995 rows in buckets of 2×16 (row-aligned)
    lv = data.read_buckets(root, "run", "routing", "capacity_rate", layer="0", target=750,
                           step_range=(5, N))
    # the head [5, 16) as rows, the rest as 16-row windows (the tail 19984.. is one whole window)
    assert lv.read == {"rows": 11, "x16": (N - 16) // 16}
    assert n_values[False] == N - 5 and n_values[True] < n_values[False] / 14
    # all steps in 40 buckets: 512-row buckets from x256 windows, none from rows; x256 holds
    # one whole chunk (64 windows: 16384 rows), the rest comes from x16
    wide = data.read_buckets(root, "run", "routing", "load", layer="0", modality="vit",
                             target=40)
    assert wide.size == 512 and wide.factor == 256
    assert wide.read == {"x256": 64, "x16": (N - 64 * 256) // 16}


def _copy(root, tmp_path, name):
    shutil.copytree(root / "run", tmp_path / name)
    return store_path(tmp_path / name)


def test_a_lagging_level_is_completed_from_finer_levels_and_rows(root, tmp_path):
    """Rows past a level's commit marker are read from finer levels, then rows."""
    s = _copy(root, tmp_path, "run")
    meta = s / "rollup" / "routing" / "x256" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["committed_steps"] = 40  # x256 covers rows [0, 10240) only
    meta.write_text(json.dumps(doc))
    lv, rows = _both(tmp_path, "routing", "capacity_rate", {"layer": "1"}, None, 40, rid="run")
    _assert_same(lv, rows)
    assert lv.read == {"x256": 40, "x16": (N - 40 * 256) // 16}


def test_a_level_that_does_not_name_the_rows_steps_is_not_read(root, tmp_path):
    """Stale windows (rows a pre-1.2 writer truncated and wrote again after the levels were
    built): the dashboard draws from the rows, as diagnose does. It compares a level's end
    windows (a rewrite shows at the end; every window would cost every row's step)."""
    s = _copy(root, tmp_path, "run")
    step = zarr.open_array(str(s / "rollup" / "routing" / "x256" / "step"), mode="r+")
    step[-1] = step[-1] + 1  # the last window no longer starts at its first row's step
    lv, rows = _both(tmp_path, "routing", "capacity_rate", {"layer": "1"}, None, 40, rid="run")
    _assert_same(lv, rows)
    assert "x256" not in lv.read and lv.read.get("x16")  # x16 still agrees and is read


def test_figures_are_the_same_with_and_without_levels(root, tmp_path):
    """A store without levels (written before schema 1.2) draws the same pictures from its
    rows: the zoom crossing from one level to another or to rows changes nothing but speed."""
    shutil.rmtree(_copy(root, tmp_path, "norollup") / "rollup")
    shutil.copytree(root / "run", tmp_path / "run")
    for xr in (None, (1000, 9000), (2000, 3000)):
        for fn, args in ((R.capacity_heatmap, ("vae",)), (R.load_heatmap, ("1", "vit"))):
            a, b = (fn(tmp_path, rid, *args, xrange=xr) for rid in ("run", "norollup"))
            np.testing.assert_allclose(np.asarray(a.data[0].z, float),
                                       np.asarray(b.data[0].z, float), rtol=1e-6, equal_nan=True)
            np.testing.assert_array_equal(a.data[0].x, b.data[0].x)
        for fn, args in ((R.capacity_lines, ("0",)), (R.balance_lines, ("1",)),
                         (lambda r, rid, xrange: CMP.loss_term(r, [rid], xrange=xrange), ())):
            a, b = (fn(tmp_path, rid, *args, xrange=xr) for rid in ("run", "norollup"))
            assert len(a.data) == len(b.data) > 0
            for ta, tb in zip(a.data, b.data):  # the same points, x within a 16-row window
                ya, yb = np.asarray(ta.y, float), np.asarray(tb.y, float)
                np.testing.assert_array_equal(np.sort(ya[np.isfinite(ya)]),
                                              np.sort(yb[np.isfinite(yb)]))
                assert np.abs(np.sort(ta.x) - np.sort(tb.x)).max() < 16


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    """A run whose vae tokens are missing at ~30% of the steps and for a whole stretch: its vae
    rates are NaN there (the rows a mean and an extreme must leave out)."""
    from fixtures import synth
    from fixtures.generate import TOKENS
    from moe_probe.store import StoreWriter, default_coords
    from moe_probe import metrics as mt

    r = tmp_path_factory.mktemp("gappy")
    rng = np.random.default_rng(1)
    n, n_layers, n_e, k = 6000, 2, 8, 2
    groups, mgroup = synth.group_layout("moe", n_e)
    base = synth.base_probs(rng, n_layers, n_e, mt.group_masks(n_e, groups, mgroup))
    layers = [str(i) for i in range(n_layers)]
    attrs = {"run": {"name": "gappy"},
             "model": {"arch": "moe", "layers": layers, "experts": n_e, "top_k": k,
                       "groups": {l: {g: list(v) for g, v in groups.items()} for l in layers},
                       "modality_group": {l: dict(mgroup) for l in layers}}}
    steps = np.arange(n)
    tokens = synth.draw_tokens(rng, n, n_layers, TOKENS)
    gone = (rng.random(n) < 0.3) | ((steps >= 2000) & (steps < 2600))
    tokens[gone, :, 2] = 0
    load = synth.draw_load(rng, tokens, np.broadcast_to(base, (n, *base.shape)), k)
    rows = synth.routing_rows(rng, tokens, load, k, groups, mgroup, 1.0)
    coords = default_coords(layers=layers, n_experts=n_e, groups=("routing", "loss"))
    # x256 a window per chunk: written whole on this short run (the default waits for 64)
    with StoreWriter.create(store_path(r / "gappy"), attrs=attrs, coords=coords,
                            rollups={256: 1}) as w:
        w.append_rows("routing", steps, **rows)
        w.append_rows("loss", steps, value=synth.loss_rows(rng, steps))
    assert np.isnan(rows["capacity_rate"][:, :, 2]).mean() > 0.3
    return r


@pytest.mark.parametrize("var", ["capacity_rate", "entropy", "load"])
def test_nan_rows_are_left_out_alike_on_both_paths(gappy, var):
    for rng in (None, (1900, 2700), (2100, 2500)):
        for target in (20, 100, 1500):
            lv, rows = _both(gappy, "routing", var, {"layer": "1"}, rng, target, rid="gappy")
            _assert_same(lv, rows)
    lv = data.read_buckets(gappy, "gappy", "routing", "capacity_rate", layer="1", target=20)
    assert lv.factor == 256
    empty = (lv.step >= 2048) & (lv.step < 2560)  # buckets of 512 rows inside the stretch
    assert empty.any() and (lv.count[empty, 2] == 0).all() and np.isnan(lv.mean[empty, 2]).all()
    x, y = lv.line(2)
    assert np.isnan(y[np.isin(x, lv.step[empty])]).all()  # a gap where a bucket has no rows
