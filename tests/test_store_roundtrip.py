"""StoreWriter -> disk -> open_run / plain xarray: layout, values, validation, resume."""

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from moe_probe.run import Run, find_runs, open_run, store_path
from moe_probe.store import (CORE_GROUPS, SCHEMA_VERSION, StoreError, StoreWriteError,
                             StoreWriter, default_coords)

LAYERS = ["0", "1", "2"]
E = 4


def _coords(**kw):
    return default_coords(layers=LAYERS, n_experts=E, eval_metrics=["text_loss", "digit_acc"],
                          isolated_metrics=["digit_acc"], tasks=["vit_digit"], **kw)


def _attrs():
    return {"run": {"name": "t", "recipe": "unit", "seed": 3, "config": "{}"},
            "model": {"arch": "moe", "layers": LAYERS, "experts": E, "top_k": 2}}


def routing_row(s):
    """Every routing array, values a function of the step (so a wrong row is detectable)."""
    r = np.random.default_rng(s)
    return dict(tokens=np.full((3, 3), s, np.int32), kept=r.random((3, 3)),
                capacity_rate=r.random((3, 3)), entropy=r.random((3, 3)), maxvio=r.random((3, 3)),
                dead_frac=r.random((3, 3)), confidence=r.random((3, 3)),
                load=(np.arange(36).reshape(3, 3, 4) + s).astype(np.int32), router_z=r.random(3))


def test_roundtrip_values_layout_and_attrs(tmp_path):
    w = StoreWriter.create(store_path(tmp_path / "run"), attrs=_attrs(), coords=_coords())
    for s in range(0, 1300):  # > one routing chunk (512 rows)
        w.append("routing", s, **routing_row(s))
        w.append("loss", s, value=np.arange(6) + s)
        if s % 10 == 0:
            w.append("grad", s, cosine=np.full((4, 7), s / 1e4), norm_und=np.ones((4, 7)),
                     norm_gen=np.ones((4, 7)))
    w.close()
    r = open_run(tmp_path / "run")
    assert r.attrs["schema_version"] == SCHEMA_VERSION
    assert r.attrs["run"]["name"] == "t" and "created" in r.attrs["run"]
    assert r.attrs["modalities"] == ["text", "vit", "vae"]
    assert r.groups == list(CORE_GROUPS)
    ds = r.dataset("routing")
    assert ds.sizes == {"step": 1300, "layer": 3, "modality": 3, "expert": 4}
    assert ds["step"].dtype == np.int64 and list(ds["step"].values) == list(range(1300))
    assert list(ds["modality"].values) == ["text", "vit", "vae"]
    assert ds["load"].dims == ("step", "layer", "modality", "expert")
    for s in (0, 511, 512, 1299):
        row = routing_row(s)
        for k, v in row.items():
            np.testing.assert_allclose(ds[k].isel(step=s).values, v.astype(ds[k].dtype))
    g = r.dataset("grad")
    assert list(g["layer"].values) == LAYERS + ["all"]
    assert list(g["step"].values) == list(range(0, 1300, 10))
    f = r.frame("loss", "value")
    assert list(f.columns) == ["step", "term", "value"] and len(f) == 1300 * 6
    assert f.query("step == 7 and term == 'gen'")["value"].item() == 9.0
    one = r.frame("routing", "load", layer="1", modality="vae")
    assert list(one.columns) == ["step", "expert", "value"]
    info = Run(tmp_path / "run").info()
    assert info.committed["routing"] == 1300 and info.last_step["grad"] == 1290
    assert info.committed["snapshot"] == 0 and info.last_step["snapshot"] is None
    assert info.arch == "moe" and info.experts == E and info.layers == LAYERS
    # array dims and chunking as documented: load chunked one layer at a time
    z = zarr.open_group(str(tmp_path / "run/traces.zarr"), mode="r")
    assert z["routing/load"].metadata.dimension_names == ("step", "layer", "modality", "expert")
    assert z["routing/load"].chunks == (512, 1, 3, 4)


def test_plain_xarray_opens_every_group_without_moe_probe(tmp_path):
    w = StoreWriter.create(store_path(tmp_path / "run"), attrs=_attrs(), coords=_coords())
    for s in range(5):
        w.append("routing", s, **routing_row(s))
        w.append("eval", s * 50, value=[1.0, 0.5])
    w.close()
    code = f"""
import sys, warnings
import xarray as xr
warnings.simplefilter("ignore")  # no consolidated metadata, by design
p = {str(tmp_path / 'run/traces.zarr')!r}
for g in {list(CORE_GROUPS)!r}:
    ds = xr.open_zarr(p, group=g)
    assert "step" in ds.coords, g
ds = xr.open_zarr(p, group="routing")
assert ds.sizes["step"] >= 5 and ds.attrs["committed_steps"] == 5
assert list(ds["step"].values[:5]) == [0, 1, 2, 3, 4]
assert int(ds["load"].sel(layer="2", modality="vae", expert="3").values[4]) == 35 + 4
ev = xr.open_zarr(p, group="eval")
assert list(ev["metric"].values) == ["text_loss", "digit_acc"]
assert not any(m.startswith("moe_probe") for m in sys.modules)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_reader_never_imports_torch(tmp_path):
    w = StoreWriter.create(store_path(tmp_path / "run"), attrs=_attrs(), coords=_coords())
    w.append("routing", 0, **routing_row(0))
    w.close()
    code = f"""
import sys, moe_probe
r = moe_probe.open_run({str(tmp_path / 'run')!r})
r.dataset("routing"); r.frame("routing", "load")
from moe_probe.run import Run
Run({str(tmp_path / 'run')!r}).info()
import moe_probe.store, moe_probe.metrics
assert "torch" not in sys.modules, "torch was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_append_validation(tmp_path):
    w = StoreWriter.create(store_path(tmp_path / "run"), attrs=_attrs(), coords=_coords())
    with pytest.raises(ValueError, match="missing \\['norm_gen'\\]"):
        w.append("grad", 0, cosine=np.ones((4, 7)), norm_und=np.ones((4, 7)))
    with pytest.raises(ValueError, match="row shape \\(3, 7\\), expected \\(4, 7\\)"):
        w.append("grad", 0, cosine=np.ones((3, 7)), norm_und=np.ones((4, 7)),
                 norm_gen=np.ones((4, 7)))
    with pytest.raises(ValueError, match="not in this store"):
        w.append("nope", 0, value=[1])
    bad_counts = routing_row(0)
    bad_counts["tokens"] = np.full((3, 3), np.nan)
    with pytest.raises(ValueError, match="routing/tokens holds counts"):
        w.append("routing", 0, **bad_counts)
    w.append("loss", 5, value=np.zeros(6))
    for bad in (5, 4):
        with pytest.raises(ValueError, match="strictly increasing"):
            w.append("loss", bad, value=np.zeros(6))
    with pytest.raises(ValueError, match="strictly increasing"):
        w.append_rows("eval", [3, 3], value=np.zeros((2, 2)))
    w.append("loss", 6, value=np.ones(6))  # a rejected row left nothing behind
    w.close()
    assert list(open_run(tmp_path / "run").dataset("loss")["step"].values) == [5, 6]
    with pytest.raises(ValueError, match="closed"):
        w.append("loss", 7, value=np.ones(6))
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter.create(store_path(tmp_path / "run"), attrs=_attrs(), coords=_coords())
    with pytest.raises(ValueError, match="missing \\['task'\\]"):
        StoreWriter.create(store_path(tmp_path / "r2"), attrs=_attrs(),
                           coords={"probe": {"layer": ["0"], "metric": ["a"]}})
    with pytest.raises(ValueError, match="duplicate labels"):
        StoreWriter.create(store_path(tmp_path / "r3"), attrs=_attrs(), coords={"eval": {"metric": ["a", "a"]}})
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()  # nothing half-made


def test_absent_groups_and_labels(tmp_path):
    coords = default_coords(layers=["0"], n_experts=2, isolated_metrics=None)
    assert "probe" not in coords  # no shared experts -> no probe group
    w = StoreWriter.create(store_path(tmp_path / "run"), attrs=_attrs(), coords=coords)
    assert w.labels("grad", "layer") == ["0", "all"] and w.labels("eval", "metric") == []
    w.close()
    r = open_run(tmp_path / "run")
    assert "probe" not in r.groups and "eval" in r.groups
    assert r.dataset("eval").sizes["metric"] == 0
    with pytest.raises(StoreError, match="group 'probe' is not in"):
        r.dataset("probe")


def test_writer_thread_error_surfaces_on_next_call(tmp_path):
    w = StoreWriter.create(store_path(tmp_path / "run"), attrs=_attrs(), coords=_coords(), linger=0.01)
    w.append("loss", 0, value=np.zeros(6))
    w.flush()
    # a real filesystem fault: the chunk directory of loss/value becomes a plain file
    (tmp_path / "run/traces.zarr/loss/value/c").rename(tmp_path / "moved")
    (tmp_path / "run/traces.zarr/loss/value/c").write_text("not a directory")
    w.append("loss", 1, value=np.ones(6))
    with pytest.raises(StoreWriteError, match="trace writer for .* failed"):
        w.flush()
    with pytest.raises(StoreWriteError):
        w.append("loss", 2, value=np.ones(6))
    with pytest.raises(StoreWriteError):
        w.close()
    # the failed rows were never committed
    assert json.loads((tmp_path / "run/traces.zarr/loss/zarr.json").read_text())[
        "attributes"]["committed_steps"] == 1


def test_resume_truncates_and_continues(tmp_path):
    w = StoreWriter.create(store_path(tmp_path / "run"), attrs=_attrs(), coords=_coords())
    w.append_rows("loss", np.arange(10), value=np.arange(60).reshape(10, 6))
    w.close()
    w, committed = StoreWriter.resume(store_path(tmp_path / "run"), after_step=6)
    assert committed["loss"] == 7 and w.last_step("loss") == 6 and committed["routing"] == 0
    with pytest.raises(ValueError, match="strictly increasing"):
        w.append("loss", 6, value=np.zeros(6))
    w.append("loss", 7, value=np.full(6, -1.0))
    w.close()
    ds = open_run(tmp_path / "run").dataset("loss")
    assert list(ds["step"].values) == list(range(8))
    assert ds["value"].values[6, 0] == 36 and ds["value"].values[7, 0] == -1


def test_find_runs(tmp_path):
    for p in ("a", "b/c", "d/e/f"):
        StoreWriter.create(store_path(tmp_path / p), attrs=_attrs(), coords={"loss": {}}).close()
    (tmp_path / "x/y").mkdir(parents=True)
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "b/c", tmp_path / "d/e/f"]
    assert find_runs(tmp_path / "a") == [tmp_path / "a"]
