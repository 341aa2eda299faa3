"""Rollup levels (schema 1.2): written by the writer as rows arrive, by `moe-probe rollup` for
older stores, consistent with the rows through resume, truncation and a writer killed mid-way."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from fixtures import synth
from moe_probe import open_run
from moe_probe.cli import main
from moe_probe.store import NotMeasured, StoreError, StoreWriter, default_coords
from moe_probe.store.rollup import add_rollups
from moe_probe.store.schema import ROLLUP_FACTORS, ROLLUP_FINEST_LAYERS, rollup_path

FROZEN = Path(__file__).resolve().parents[1] / "fixtures" / "frozen" / "v1.0-healthy"
L, E, K = 2, 8, 2
SMALL = {256: 1, 4096: 1}
"""Windows per chunk of the coarser levels in these short runs: a level is written a whole chunk
at a time, so with the default chunks (16384 and 65536 rows) they would stay empty here."""


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    groups, mgroup = synth.group_layout("symbiotic", E)
    mask = synth.mt.group_masks(E, groups, mgroup)
    probs = np.broadcast_to(synth.base_probs(rng, L, E, mask), (n, L, 3, E))
    tokens = synth.draw_tokens(rng, n, L, (12, 8, 16))
    tokens[n // 3:n // 3 + 40, :, 1] = 0  # vit absent for a while: NaN rates inside windows
    load = synth.draw_load(rng, tokens, probs, K)
    routing = synth.routing_rows(rng, tokens, load, K, groups, mgroup, 1.0)
    attrs = {"run": {"name": "r"}, "model": {
        "top_k": K, "groups": {str(i): {g: list(v) for g, v in groups.items()} for i in range(L)},
        "modality_group": {str(i): dict(mgroup) for i in range(L)}}}
    return attrs, routing, synth.loss_rows(rng, np.arange(n))


def _write(path, n, *, rollups=SMALL, flush_every=None, seed=0, steps=None):
    attrs, routing, loss = _rows(n, seed)
    coords = default_coords(layers=[str(i) for i in range(L)], n_experts=E,
                            isolated_metrics=None, groups=("routing", "loss"))
    steps = np.arange(n) if steps is None else steps
    with StoreWriter.create(path, attrs=attrs, coords=coords, rollups=rollups, linger=0.01) as w:
        for i, s in enumerate(steps):
            w.append("routing", int(s), **{k: v[i] for k, v in routing.items()})
            w.append("loss", int(s), value=loss[i])
            if flush_every and i % flush_every == flush_every - 1:
                w.flush()
    return path


def _levels(path):
    r = open_run(path)
    return {(g, f): r.dataset(g, level=f).load() for g in ("routing", "loss") for f in r.levels(g)}


def _assert_same_levels(a, b):
    la, lb = _levels(a), _levels(b)
    assert la.keys() == lb.keys()
    for k in la:
        xr.testing.assert_identical(la[k].drop_attrs(), lb[k].drop_attrs())


def test_levels_hold_window_sums_and_rate_stats(tmp_path):
    p = _write(tmp_path / "s", 600)
    r = open_run(p)
    rows = r.dataset("routing").load()
    for f in (16, 256):
        lv = r.dataset("routing", level=f)
        n_win = 600 // f
        assert lv.sizes["step"] == n_win and lv.attrs["factor"] == f
        assert (lv["step"].values == rows["step"].values[::f][:n_win]).all()
        assert (lv["step_last"].values == rows["step"].values[f - 1::f][:n_win]).all()
        win = rows.isel(step=slice(0, n_win * f)).coarsen(step=f)
        np.testing.assert_array_equal(lv["load"].values, win.sum()["load"].values)
        np.testing.assert_array_equal(lv["tokens"].values, win.sum()["tokens"].values)
        cr = lv["capacity_rate"]
        np.testing.assert_array_equal(cr.sel(stat="min").values, win.min()["capacity_rate"].values)
        np.testing.assert_array_equal(cr.sel(stat="max").values, win.max()["capacity_rate"].values)
        np.testing.assert_allclose(cr.sel(stat="mean").values, win.mean()["capacity_rate"].values,
                                   rtol=1e-6)
        np.testing.assert_array_equal(cr.sel(stat="count").values,
                                      win.count()["capacity_rate"].values)
        kept, tokens = win.sum()["kept"].values, win.sum()["tokens"].values
        np.testing.assert_allclose(lv["window_capacity_rate"].values, kept / (K * tokens),
                                   rtol=1e-6)
    assert r.levels("routing") == list(ROLLUP_FACTORS)
    assert r.dataset("routing", level="x4096").sizes["step"] == 0


def test_plain_xarray_reads_a_level(tmp_path):
    p = _write(tmp_path / "s", 300)
    ds = xr.open_zarr(p, group=rollup_path("routing", 16), consolidated=False)
    np.testing.assert_array_equal(ds["load"].values, open_run(p).dataset("routing", level=16)
                                  ["load"].values)
    assert set(ds["stat"].values) == {"min", "max", "mean", "count", "positive"}


def test_level_chunks_and_codecs_as_documented(tmp_path):
    p = _write(tmp_path / "s", 40)
    z = zarr.open_group(str(p), mode="r")
    # the finest level (written while training) holds several layers per load chunk, coarser
    # ones one layer, as the rows; levels are lz4, rows zstd, all with a checksum
    x16, x256 = z[rollup_path("routing", 16)], z[rollup_path("routing", 256)]
    assert x16["load"].chunks[1:] == (min(ROLLUP_FINEST_LAYERS, L), 3, E)
    assert x256["load"].chunks[1:] == (1, 3, E)
    for arr, cname in ((x16["capacity_rate"], "lz4"), (z[rollup_path("loss", 4096)]["value"], "lz4"),
                       (z["routing/load"], "zstd")):
        blosc, crc = arr.compressors
        assert (blosc.cname.value, type(crc).__name__) == (cname, "Crc32cCodec")
    coords = default_coords(layers=[str(i) for i in range(6)], n_experts=E, isolated_metrics=None,
                            groups=("routing",))
    StoreWriter.create(tmp_path / "six", attrs=_rows(1)[0], coords=coords).close()
    assert zarr.open_group(str(tmp_path / "six"), mode="r")[rollup_path("routing", 16)][
        "load"].chunks[1:] == (ROLLUP_FINEST_LAYERS, 3, E)  # 4 + 2 layers: a partial chunk


def test_built_while_writing_equals_built_afterwards(tmp_path):
    # rows handed one at a time with flushes at odd places vs. `moe-probe rollup` on the rows,
    # with the default chunks (the coarser levels still empty at 1100 rows) and small ones
    for name, chunks in (("default", True), ("small", SMALL)):
        live = _write(tmp_path / f"live-{name}", 1100, rollups=chunks, flush_every=37)
        later = _write(tmp_path / f"later-{name}", 1100, rollups=False)
        assert open_run(later).levels("routing") == []
        with pytest.raises(NotMeasured, match="moe-probe rollup"):
            open_run(later).dataset("routing", level=16)
        if chunks is True:
            assert main(["rollup", str(later)]) == 0
        else:
            add_rollups(later, chunks=chunks)
        _assert_same_levels(live, later)


def test_coarser_levels_are_written_a_whole_chunk_at_a_time(tmp_path):
    p = _write(tmp_path / "s", 1100, rollups={16: 8, 256: 3, 4096: 1})
    r = open_run(p)
    rows = r.dataset("routing").load()
    # the finest level: every finished window (the close writes its last, partial chunk)
    assert r.dataset("routing", level=16).sizes["step"] == 1100 // 16
    # x256: 4 finished windows, one whole chunk of 3 written (the 4th waits for its chunk);
    # readers take steps past it from the finer level
    lv = r.dataset("routing", level=256)
    assert lv.sizes["step"] == 3
    np.testing.assert_array_equal(lv["load"].values,
                                  rows["load"][:768].coarsen(step=256).sum().values)
    assert r.dataset("routing", level=4096).sizes["step"] == 0
    with pytest.raises(ValueError, match="windows per chunk"):
        _write(tmp_path / "bad", 10, rollups={256: 0})
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_resume_and_truncation_keep_levels_consistent(tmp_path):
    full = _write(tmp_path / "full", 900)
    cut = _write(tmp_path / "cut", 900, flush_every=100)
    w, committed = StoreWriter.resume(cut, after_step=299)  # a checkpoint at step 299
    assert committed["routing"] == 300
    r = open_run(cut)
    assert r.dataset("routing", level=16).sizes["step"] == 300 // 16
    assert r.dataset("routing", level=256).sizes["step"] == 1
    attrs, routing, loss = _rows(900)
    for s in range(300, 900):  # the same rows again: the result must be the uninterrupted store's
        w.append("routing", s, **{k: v[s] for k, v in routing.items()})
        w.append("loss", s, value=loss[s])
    w.close()
    _assert_same_levels(full, cut)


def test_a_writer_killed_mid_way_leaves_levels_behind_the_rows(tmp_path):
    full = _write(tmp_path / "full", 700)
    dead = _write(tmp_path / "dead", 700)
    # what a SIGKILL can leave: row markers moved back, levels further along than the rows
    root = zarr.open_group(str(dead), mode="r+")
    for g in ("routing", "loss"):
        root[g].attrs["committed_steps"] = 333
    assert open_run(dead).dataset("routing", level=16).sizes["step"] == 333 // 16  # capped
    w, _ = StoreWriter.resume(dead)
    for f in ROLLUP_FACTORS:
        assert root[rollup_path("routing", f)].attrs["committed_steps"] <= 333 // f
    attrs, routing, loss = _rows(700)
    w.append_rows("routing", np.arange(333, 700), **{k: v[333:] for k, v in routing.items()})
    w.append_rows("loss", np.arange(333, 700), value=loss[333:])
    w.close()
    _assert_same_levels(full, dead)


def test_rollup_command_on_old_stores_and_bad_input(tmp_path, capsys):
    old = tmp_path / "v1.0"
    shutil.copytree(FROZEN, old)
    assert open_run(old).levels("routing") == []
    assert main(["rollup", str(old)]) == 0
    r = open_run(old)
    assert r.attrs["schema_version"] == "1.0"  # left as written
    n = r.committed_steps("routing")
    lv = r.dataset("routing", level=16)
    assert lv.sizes["step"] == n // 16
    np.testing.assert_array_equal(lv["load"].sum("step").values,
                                  r.dataset("routing")["load"][:n // 16 * 16].sum("step").values)
    assert main(["rollup", str(old)]) == 0  # again: nothing to add, same levels
    capsys.readouterr()
    assert main(["rollup", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such run directory" in err
    with pytest.raises(StoreError, match="no rollup level 'x5'"):
        r.dataset("routing", level="x5")
