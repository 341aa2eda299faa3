"""User errors of the reader: one clear line naming what was found."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from moe_probe.run import open_run, store_path
from moe_probe.store import StoreError, StoreWriter, default_coords

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "stores"


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 300, msg
    return msg


def _small(tmp_path):
    w = StoreWriter.create(store_path(tmp_path / "run"), attrs={"run": {"name": "e"}, "model": {}},
                           coords=default_coords(layers=["0"], n_experts=2, isolated_metrics=None))
    w.append_rows("loss", np.arange(40), value=np.arange(240.0).reshape(40, 6))
    w.close()
    return tmp_path / "run"


def test_missing_and_not_a_run(tmp_path):
    with pytest.raises(StoreError) as e:
        open_run(tmp_path / "nope")
    assert _one_line(e) == f"no such run directory: {tmp_path / 'nope'}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError) as e:
        open_run(tmp_path / "empty")
    assert _one_line(e) == f"not a moe_probe run: {tmp_path / 'empty'} has no traces.zarr"
    (tmp_path / "bare" / "traces.zarr").mkdir(parents=True)
    with pytest.raises(StoreError, match="has no zarr.json") as e:
        open_run(tmp_path / "bare")
    _one_line(e)


def test_foreign_v2_and_other_schema_versions(tmp_path):
    zarr.open_group(str(tmp_path / "foreign" / "traces.zarr"), mode="w", zarr_format=3,
                    attributes={"title": "someone else's data"})
    with pytest.raises(StoreError) as e:
        open_run(tmp_path / "foreign")
    assert _one_line(e) == (f"not a moe_probe store: {tmp_path / 'foreign' / 'traces.zarr'} "
                            "has no schema_version attribute")
    zarr.open_group(str(tmp_path / "v2" / "traces.zarr"), mode="w", zarr_format=2)
    with pytest.raises(StoreError, match="is a zarr v2 store") as e:
        open_run(tmp_path / "v2")
    _one_line(e)
    run = _small(tmp_path)
    meta = run / "traces.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["schema_version"] = 7
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError) as e:
        open_run(run)
    assert _one_line(e).startswith("store schema version 7.0 is newer than this moe_probe "
                                   "reads (1.2); upgrade moe_probe")
    with pytest.raises(StoreError, match="version 7"):
        StoreWriter.resume(store_path(run))  # resume refuses it too, before touching anything


def test_corrupt_chunk_and_metadata(tmp_path):
    run = _small(tmp_path)
    chunk = next((run / "traces.zarr" / "loss" / "value" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])  # truncated chunk
    r = open_run(run)
    ds = r.dataset("loss")  # lazy: opening works, reading the chunk does not
    with pytest.raises(StoreError) as e:
        ds["value"].values
    assert _one_line(e).startswith(f"corrupt store: a chunk of {run / 'traces.zarr'}/loss/value "
                                   "cannot be read")
    with pytest.raises(StoreError, match="loss/value"):
        r.frame("loss", "value")
    (run / "traces.zarr" / "loss" / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="loss/zarr.json is not valid JSON") as e:
        r.committed_steps("loss")
    _one_line(e)


def test_unknown_variable_and_label(tmp_path):
    r = open_run(_small(tmp_path))
    with pytest.raises(StoreError, match="has no variable 'nope'"):
        r.frame("loss", "nope")
    with pytest.raises(StoreError, match="no such label"):
        r.frame("loss", "value", term="nope")


def test_live_fixture_hides_rows_past_the_marker(tmp_path):
    shutil.copytree(FIX / "live", tmp_path / "live")
    r = open_run(tmp_path / "live")
    truth = r.attrs["run"]["fixture_truth"]
    raw = zarr.open_group(str(tmp_path / "live" / "traces.zarr"), mode="r")
    for g, n in truth["committed"].items():
        assert r.committed_steps(g) == n
        assert raw[g]["step"].shape[0] > n and raw[g]["step"][n] == truth["garbage_step"]
        ds = r.dataset(g).load()
        assert ds.sizes["step"] == n and (np.diff(ds["step"].values) > 0).all()
        for v in ds.data_vars:
            vals = ds[v].values
            assert not (vals == truth["garbage"]).any() and not (vals == 123456789).any(), (g, v)
    # resuming the "crashed" run drops the garbage and continues after the last committed step
    w, committed = StoreWriter.resume(store_path(tmp_path / "live"))
    assert committed == truth["committed"]
    last = w.last_step("loss")
    w.append("loss", last + 1, value=np.zeros(6))
    w.close()
    ds = open_run(tmp_path / "live").dataset("loss")
    assert ds.sizes["step"] == truth["committed"]["loss"] + 1
    assert (np.diff(ds["step"].values) == 1).all()


def test_flipped_byte_in_a_chunk_is_an_error_not_wrong_numbers(tmp_path):
    run = _small(tmp_path)
    chunks = [p for p in (run / "traces.zarr" / "loss" / "value" / "c").rglob("*") if p.is_file()]
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0x40  # same length, one bit different
    chunks[0].write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt store: a chunk of .*loss/value") as e:
        open_run(run).frame("loss", "value")
    _one_line(e)
