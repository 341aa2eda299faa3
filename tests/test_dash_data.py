"""Dashboard data layer without a browser: ROOT confinement, bucketing, slicing, CLI errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import moe_probe
from dashboards import data
from dashboards.bucketing import minmax_line, mean_columns

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stores"


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    shutil.copytree(FIXTURES / "healthy", r / "healthy")
    shutil.copytree(FIXTURES / "collapse", r / "group" / "collapse")
    return r


def test_runs_are_listed_relative_to_root(root):
    assert data.list_runs(root) == ["group/collapse", "healthy"]


@pytest.mark.parametrize("bad", ["../healthy", "/etc", "healthy/../../x", "", "..", "a\x00b",
                                 "C:/x", "group/../../root/healthy"])
def test_run_ids_escaping_root_are_refused(root, bad):
    with pytest.raises(data.DataError):
        data.resolve_run(root, bad)


def test_symlinks_out_of_root_are_neither_listed_nor_served(root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(FIXTURES / "healthy", outside / "secret")
    (root / "link").symlink_to(outside / "secret")
    (root / "linkdir").symlink_to(outside)
    assert "link" not in data.list_runs(root)
    for rid in ("link", "linkdir/secret"):
        with pytest.raises(data.DataError, match="outside"):
            data.read_slice(root, rid, "routing", "capacity_rate")
    # a link that stays inside ROOT is fine
    (root / "alias").symlink_to(root / "healthy")
    assert data.read_slice(root, "alias", "loss", "value", term="gen") is not None


def test_read_slice_matches_reader_and_cuts_steps(root):
    ds = moe_probe.open_run(root / "healthy").dataset("routing")
    s = data.read_slice(root, "healthy", "routing", "load", layer="2", modality="vit",
                        step_range=(10.4, 20))
    np.testing.assert_array_equal(s.steps, np.arange(11, 21))
    np.testing.assert_array_equal(s.values, ds["load"].sel(layer="2", modality="vit",
                                                           step=slice(11, 20)).values)
    assert s.dims == ("step", "expert")
    c = data.read_slice(root, "healthy", "routing", "capacity_rate", layer="1")
    np.testing.assert_array_equal(c.values, ds["capacity_rate"].sel(layer="1").values)
    assert c.coords == {"modality": ["text", "vit", "vae"]}


def test_unknown_label_is_a_data_error(root):
    with pytest.raises(data.DataError, match="layer"):
        data.read_slice(root, "healthy", "routing", "load", layer="99")


def test_minmax_buckets_keep_every_extreme():
    rng = np.random.default_rng(0)
    n = 50_000
    steps = np.arange(n) * 2
    y = rng.normal(size=n)
    y[12345] = 40.0   # a spike ...
    y[33333] = -35.0  # ... and a collapse somewhere inside buckets
    y[100:130] = np.nan
    x, v = minmax_line(steps, y, target=1000)
    assert len(x) <= 2000
    assert np.all(np.diff(x) > 0)  # still a series in step order
    assert v.max() == 40.0 and x[v.argmax()] == steps[12345]
    assert v.min() == -35.0 and x[v.argmin()] == steps[33333]
    # every bucket's min and max are present exactly
    b = -(-n // 1000)
    for i in range(0, n, b):
        chunk = y[i:i + b]
        if np.isfinite(chunk).any():
            assert np.nanmax(chunk) in v and np.nanmin(chunk) in v


def test_short_series_are_untouched_and_heatmap_buckets_average():
    x, v = minmax_line(np.arange(10), np.arange(10.0))
    np.testing.assert_array_equal(v, np.arange(10.0))
    xs, m, b = mean_columns(np.arange(10), np.arange(20.0).reshape(10, 2), target=5)
    assert b == 2 and list(xs) == [0, 2, 4, 6, 8]
    np.testing.assert_allclose(m[:, 0], [1, 5, 9, 13, 17])


def test_heatmap_buckets_are_nan_means_with_a_short_last_bucket():
    """Each column is the mean of its bucket's steps with NaN rows left out (the last bucket is
    shorter; an all-NaN bucket stays NaN), as a per-bucket reference computes it."""
    rng = np.random.default_rng(0)
    n, b = 1003, 10  # target 101 → buckets of 10, the last holds 3 steps
    v = rng.random((n, 4))
    v[rng.random(n) < 0.2] = np.nan  # steps without tokens of a modality
    v[20:30] = np.nan  # a whole bucket
    for vals in (v, np.nan_to_num(v)):  # with and without NaN
        xs, m, size = mean_columns(np.arange(n) * 5, vals, target=101)
        assert size == b and list(xs) == list(np.arange(0, n, b) * 5)
        with warnings.catch_warnings():  # nanmean of the all-NaN bucket warns
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.array([np.nanmean(vals[i:i + b], axis=0) for i in range(0, n, b)])
        np.testing.assert_allclose(m, ref, rtol=1e-12, equal_nan=True)
    assert np.isnan(mean_columns(np.arange(n), v, target=101)[1][2]).all()


def test_a_zoom_belongs_to_the_selection_it_was_made_in():
    from dashboards.pages_common import zoom_range

    def key(sel):
        return [sel.get("focus"), sel.get("layer")]
    made_in = {"focus": "a", "layer": "0", "modality": "vae"}
    z = {"range": [100.0, 140.0], "sel": made_in}
    assert zoom_range(z, dict(made_in, modality="text"), key) == [100.0, 140.0]
    assert zoom_range(z, dict(made_in, layer="1"), key) is None  # another layer: all steps
    assert zoom_range({"range": None, "sel": made_in}, made_in, key) is None  # autorange
    assert zoom_range(None, made_in, key) is None


def test_cli_bad_root_and_port_exit_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in ([str(tmp_path / "missing")], [str(tmp_path), "--port", "0"],
                 [str(tmp_path), "--refresh", "0"]):
        r = subprocess.run([sys.executable, "-m", "moe_probe", "dash", *args], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "error" in r.stderr


def test_callbacks_refuse_run_ids_escaping_root(root, tmp_path):
    """A crafted callback payload (run id `../…`) gets a message figure, never the data."""
    from dashboards.testing import Server
    import json
    import urllib.request

    outside = tmp_path / "outside"
    shutil.copytree(FIXTURES / "collapse", outside / "x")
    with Server(root, refresh=60) as srv:
        body = {"output": "routing-load-heat.figure",
                "outputs": {"id": "routing-load-heat", "property": "figure"},
                "inputs": [{"id": "sel", "property": "data",
                            "value": {"focus": "../outside/x", "layer": "0", "modality": "vae"}},
                           {"id": "versions", "property": "data", "value": {}},
                           {"id": "routing-zoom-load", "property": "data", "value": None},
                           {"id": "routing-fold-stale", "property": "data", "value": None}],
                "changedPropIds": ["sel.data"], "state": []}
        req = urllib.request.Request(srv.url + "/_dash-update-component",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            fig = json.loads(r.read())["response"]["routing-load-heat"]["figure"]
        assert fig["data"] == []
        assert "outside the dashboard root" in fig["layout"]["annotations"][0]["text"]


@pytest.fixture(scope="module")
def long_root(tmp_path_factory):
    """A run longer than the bucket target (the large generator, scaled down)."""
    from fixtures.large import build_large
    root = tmp_path_factory.mktemp("long")
    build_large(root, n_steps=4000, n_layers=2, n_experts=8, block=1000, name="long")
    return root


def test_long_series_are_bucketed_with_exact_extremes(long_root):
    from dashboards.figures import routing as R
    ds = moe_probe.open_run(long_root / "long").dataset("routing")
    fig = R.capacity_lines(long_root, "long", "1")
    for t in fig.data:
        want = ds["capacity_rate"].sel(layer="1", modality=t.name).values
        y = np.asarray(t.y, dtype=float)
        assert len(y) <= 2 * 1500 < len(want)
        assert np.nanmax(y) == np.nanmax(want) and np.nanmin(y) == np.nanmin(want)
        # every plotted point is a real (step, value) of the store
        np.testing.assert_array_equal(want[np.asarray(t.x)], y)
    heat = R.load_heatmap(long_root, "long", "1", "vae")
    z = np.asarray(heat.data[0].z, dtype=float)  # expert × bucket
    load = ds["load"].sel(layer="1", modality="vae").values.astype(float)
    assert z.shape == (8, 1334)  # 4000 steps, 3 per column
    # a column is the share of its rows' assignments (sums: what rollup windows hold)
    np.testing.assert_allclose(z[:, 0], load[:3].sum(axis=0) / load[:3].sum(), rtol=1e-6)
    assert "share of the assignments of 3 rows per column" in heat.layout.title.text
    # a zoom re-reads only the window, at full resolution
    zoomed = R.capacity_lines(long_root, "long", "1", (1000, 1999))
    np.testing.assert_array_equal(np.asarray(zoomed.data[0].x), np.arange(1000, 2000))


def test_a_broken_run_is_a_row_with_its_error_not_a_crash(root):
    from dashboards.figures.runs import run_row
    (root / "broken" / "traces.zarr").mkdir(parents=True)  # no zarr.json: not a moe_probe store
    assert "broken" in data.list_runs(root)
    row = run_row(root, "broken")
    assert "not a moe_probe store" in row["error"]
    ok = run_row(root, "healthy")
    assert ok["arch"] == "symbiotic" and ok["diagnosis"]["findings"] == []
    assert set(ok["capacity"]) == {"text", "vit", "vae"}


def test_a_diagnosis_not_ready_is_pending_then_cached(tmp_path):
    """The Runs page never waits for a long diagnosis: with no time to wait, a run not yet
    diagnosed is pending while a background thread diagnoses it; the verdict then comes from
    the cache."""
    from dashboards.figures.runs import diagnosis
    shutil.copytree(FIXTURES / "collapse", tmp_path / "collapse")  # a root nobody diagnosed
    assert diagnosis(tmp_path, "collapse", wait_s=0.0) == {"pending": "diagnosing…"}
    done = diagnosis(tmp_path, "collapse")  # waits for the same background job
    assert any("routing_collapse" in f for f in done["findings"])
    assert diagnosis(tmp_path, "collapse", wait_s=0.0) is done  # the cached verdict itself


def test_runs_with_other_token_kinds_hf_scan_style(tmp_path):
    """HF scans label token kinds by input file (text, text_b): views follow the run's labels."""
    from dashboards.figures import compare as CMP, routing as R
    from moe_probe.run import store_path
    from moe_probe.store import StoreWriter, default_coords

    coords = default_coords(layers=["0", "1"], n_experts=4, groups=("routing", "loss"))
    coords["routing"]["modality"] = ["text", "text_b"]
    attrs = {"run": {"name": "scan"}, "model": {"arch": "hf", "experts": 4, "top_k": 2},
             "modalities": ["text", "text_b"]}
    with StoreWriter.create(store_path(tmp_path / "scan"), attrs=attrs, coords=coords) as w:
        for s in range(5):
            w.append("routing", s, tokens=np.full((2, 2), 8, np.int32),
                     kept=np.full((2, 2), 16.0, np.float32),
                     capacity_rate=np.full((2, 2), 0.9 - s / 100, np.float32),
                     entropy=np.ones((2, 2), np.float32), maxvio=np.zeros((2, 2), np.float32),
                     dead_frac=np.zeros((2, 2), np.float32),
                     confidence=np.ones((2, 2), np.float32),
                     load=np.full((2, 2, 4), 4, np.int32), router_z=np.ones(2, np.float32))
            w.append("loss", s, value=np.ones(6, np.float32))
    assert data.run_meta(tmp_path, "scan")["modalities"] == ["text", "text_b"]
    fig = R.capacity_lines(tmp_path, "scan", "1")
    assert [t.name for t in fig.data] == ["text", "text_b"]
    np.testing.assert_allclose(fig.data[1].y, 0.9 - np.arange(5) / 100, rtol=1e-6)
    assert R.load_heatmap(tmp_path, "scan", "0", "text_b").data[0].z.shape == (4, 5)
    cmp = CMP.capacity_by_modality(tmp_path, ["scan"])
    assert [a.text for a in cmp.layout.annotations] == ["text", "text_b"]


def test_heatmap_axes_number_consecutive_ids_and_keep_other_labels_in_order():
    from dashboards.components import heatmap
    z = np.arange(12.0).reshape(3, 4)
    fig = heatmap(z, [0, 1, 2, 3], ["0", "1", "2"], title="t")  # layer ids as the store has them
    assert fig.layout.yaxis.type == "linear" and fig.layout.yaxis.dtick == 1
    np.testing.assert_array_equal(fig.data[0].y, [0, 1, 2])
    np.testing.assert_array_equal(fig.data[0].z, z)
    many = heatmap(np.zeros((64, 2)), [0, 1], [str(i) for i in range(64)], title="t")
    assert many.layout.yaxis.type == "linear" and many.layout.yaxis.dtick is None
    for labels in (["3", "1", "2"], ["0", "2", "4"], ["attn", "mlp", "shared"]):
        fig = heatmap(z, [0, 1, 2, 3], labels, title="t")  # gaps, order or names: categories
        assert fig.layout.yaxis.type == "category" and list(fig.data[0].y) == labels


def test_balance_view_says_not_measured_for_a_store_older_than_the_metric(tmp_path):
    """load_cv (schema 1.1) in a 1.0 store: its panel says "not measured"; the other three draw."""
    from dashboards.figures.routing import BALANCE_VARS, balance_lines

    fixtures = Path(__file__).resolve().parents[1] / "fixtures"
    shutil.copytree(fixtures / "frozen" / "v1.0-healthy", tmp_path / "old")
    shutil.copytree(fixtures / "stores" / "healthy", tmp_path / "new")
    for rid, missing in (("old", True), ("new", False)):
        fig = balance_lines(tmp_path, rid, "0")
        notes = [a.text for a in fig.layout.annotations if a.text == "not measured"]
        drawn = {t.xaxis for t in fig.data}
        assert notes == (["not measured"] if missing else [])
        assert drawn == ({"x", "x2", "x3"} if missing else {"x", "x2", "x3", "x4"})
    assert BALANCE_VARS[-1] == "load_cv"
