"""The open, versioned store schema: old stores open, unknown parts are ignored, optional arrays
may be absent ("not measured"), only a newer major version is refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from moe_probe.diagnose.rundata import load_run
from moe_probe.diagnose.runner import diagnose_run
from moe_probe.run import Run, open_run, store_path
from moe_probe.store import NotMeasured, StoreError, StoreWriter, default_coords
from moe_probe.store.schema import GROUPS, optional, parse_version

FROZEN = Path(__file__).resolve().parents[1] / "fixtures" / "frozen" / "v1.0-healthy"
"""A copy of the `healthy` fixture as moe_probe wrote it before the open schema (schema 1.0):
a frozen test input, never regenerated."""


def test_a_store_written_before_the_change_still_opens():
    r = open_run(FROZEN)
    assert r.attrs["schema_version"] == "1.0"  # migrated on read from the integer 1
    assert json.loads((FROZEN / "traces.zarr" / "zarr.json").read_text())[
        "attributes"]["schema_version"] == 1  # ... and the file is untouched
    assert r.groups == ["routing", "loss", "grad", "probe", "eval", "snapshot"]
    ds = r.dataset("routing").load()
    assert ds.sizes["step"] == 300 and ds["load"].dims == ("step", "layer", "modality", "expert")
    tokens, load = ds["tokens"].values, ds["load"].values
    np.testing.assert_array_equal(load.sum(-1), 2 * tokens)  # top-2: every token counted twice
    # Optional arrays added since (load_cv) are "not measured" in it, never made up.
    for name in optional("routing"):
        assert not r.measured("routing", name) and name not in ds
        with pytest.raises(NotMeasured, match="not measured"):
            r.read("routing", name)
    assert r.measured("routing", "capacity_rate")
    info = Run(FROZEN).info()
    assert info.schema_version == "1.0" and info.layers == ["0", "1", "2", "3"]
    # Readers built on the reader keep working on it.
    diag = diagnose_run(load_run(FROZEN))
    assert diag.final_capacity_rate and all(v is not None for v in diag.final_capacity_rate.values())


def test_resuming_an_old_store_appends_without_the_arrays_it_lacks(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(FROZEN, run)
    w, committed = StoreWriter.resume(store_path(run))
    row = {k: open_run(run).read("routing", k).isel(step=-1).values for k in
           ("tokens", "kept", "capacity_rate", "entropy", "maxvio", "dead_frac", "confidence",
            "load", "router_z")}
    nan = np.full_like(row["entropy"], np.nan)
    w.append("routing", 10_000, **row, **{k: nan for k in optional("routing")})
    w.close()
    r = open_run(run)
    assert r.committed_steps("routing") == committed["routing"] + 1
    assert not any(r.measured("routing", k) for k in optional("routing"))
    np.testing.assert_array_equal(r.read("routing", "load").isel(step=-1).values, row["load"])


def _small(tmp_path, version):
    run = tmp_path / f"v{version}"
    coords = default_coords(layers=["0"], n_experts=2, isolated_metrics=None,
                            groups=("routing", "loss"))
    with StoreWriter.create(store_path(run), attrs={"run": {"name": "v"}, "model": {}},
                            coords=coords) as w:
        w.append("loss", 0, value=np.arange(6, dtype=np.float32))
    root = zarr.open_group(str(store_path(run)), mode="r+")
    root.attrs["schema_version"] = version
    return run, root


def test_a_newer_minor_with_unknown_groups_and_arrays_opens(tmp_path):
    run, root = _small(tmp_path, "1.9")
    # What a later 1.x might add: a group and an array this version does not declare.
    extra = root.create_group("attention_heads")
    extra.attrs["committed_steps"] = 0
    a = root["loss"].create_array("value_ema", shape=(1, 6), dtype="float32",
                                  dimension_names=("step", "term"))
    a[:] = np.ones((1, 6), np.float32)
    r = open_run(run)
    assert r.groups == ["routing", "loss"]
    ds = r.dataset("loss")
    assert list(ds.data_vars) == ["value"]
    np.testing.assert_array_equal(ds["value"].values[0], np.arange(6))
    # A writer resuming it keeps its layout and does not trip on the unknown parts.
    w, committed = StoreWriter.resume(store_path(run))
    w.append("loss", 1, value=np.ones(6))
    w.close()
    assert open_run(run).committed_steps("loss") == 2 and committed["loss"] == 1


@pytest.mark.parametrize("version, needle", [
    ("2.0", "store schema version 2.0 is newer than this moe_probe reads (1.2); upgrade"),
    ("two", "schema_version 'two' is not a version"),
    (True, "schema_version True is not a version"),
])
def test_a_newer_major_or_a_bad_version_is_refused_in_one_line(tmp_path, version, needle):
    run, _ = _small(tmp_path, version)
    with pytest.raises(StoreError) as e:
        open_run(run)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg


def test_version_parsing():
    assert parse_version(1) == (1, 0) and parse_version("1.1") == (1, 1)
    assert parse_version("3") == (3, 0)


def test_missing_required_array_is_corruption_not_absence(tmp_path):
    run, root = _small(tmp_path, "1.1")
    shutil.rmtree(store_path(run) / "routing" / "tokens")
    with pytest.raises(StoreError, match=r"corrupt store: .* lacks arrays \['tokens'\]"):
        open_run(run).dataset("routing")


def test_optional_array_left_out_of_some_rows_is_nan_there(tmp_path):
    coords = default_coords(layers=["0"], n_experts=2, isolated_metrics=None, groups=("routing",))
    w = StoreWriter.create(store_path(tmp_path / "r"), attrs={"model": {}}, coords=coords)
    base = {k: np.ones((1, 3), np.float32) for k in ("kept", "capacity_rate", "entropy", "maxvio",
                                                      "dead_frac", "confidence")}
    base.update(tokens=np.ones((1, 3), np.int32), load=np.ones((1, 3, 2), np.int32),
                router_z=np.ones(1, np.float32))
    opt = {k: np.full((1, 3), 0.5, np.float32) for k in optional("routing")}
    w.append("routing", 0, **base, **opt)
    w.append("routing", 1, **base)  # this producer did not measure it at step 1
    with pytest.raises(ValueError, match=r"missing \['tokens'\]"):
        w.append("routing", 2, **{k: v for k, v in base.items() if k != "tokens"})
    with pytest.raises(ValueError, match=r"unexpected \['bogus'\]"):
        w.append("routing", 2, **base, bogus=np.ones(1))
    w.close()
    r = open_run(tmp_path / "r")
    for k in optional("routing"):
        v = r.read("routing", k).values
        assert (v[0] == 0.5).all() and np.isnan(v[1]).all()


def test_schema_declares_grad_expert_as_an_extra_group():
    assert set(GROUPS["grad_expert"]) == {"cosine", "norm_und", "norm_gen"}
    assert "grad_expert" not in default_coords(layers=["0"], n_experts=2)
