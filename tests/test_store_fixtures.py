"""The committed fixture stores: deterministic, small, internally consistent, truth as planted."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from fixtures.generate import NAMES, SIZES, build
from moe_probe.run import open_run
from moe_probe.store import CORE_GROUPS
from moe_probe import metrics as mt

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "stores"


def _digest(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["healthy", "collapse", "live"])
def test_regenerating_gives_the_committed_bytes(tmp_path, name):
    # the committed stores are exactly what fixtures/generate.py writes (deterministic, current)
    assert _digest(build(name, tmp_path)) == _digest(FIX / name)


def test_fixtures_are_small():
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert total < 2_000_000, total


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_internally_consistent(name):
    r = open_run(FIX / name)
    assert r.groups == list(CORE_GROUPS)
    m = r.attrs["model"]
    ds = r.dataset("routing").load()
    k = m["top_k"]
    tokens, load, kept = ds["tokens"].values, ds["load"].values, ds["kept"].values
    # every derived metric is what metrics.py computes from the stored counts
    for li, layer in enumerate(ds["layer"].values):
        got = mt.routing_metrics(tokens[:, li], load[:, li], kept[:, li], k,
                                 m["groups"][layer], m["modality_group"][layer])
        for key, want in got.items():
            np.testing.assert_allclose(ds[key].values[:, li], want, rtol=1e-6, equal_nan=True,
                                       err_msg=f"{name} {key} layer {layer}")
    # k picks per token, all counted; kept never exceeds what was picked
    np.testing.assert_array_equal(load.sum(-1), k * tokens)
    assert (kept <= load.sum(-1) + 1e-3).all()
    # sampling rates: routing/loss every step, grad every 10, probe/eval/snapshot every 50
    n = r.committed_steps("routing")
    assert list(r.dataset("loss")["step"].values) == list(range(n))
    assert (r.dataset("grad")["step"].values % 10 == 0).all()
    for g in ("probe", "eval", "snapshot"):
        st = r.dataset(g)["step"].values
        assert st[0] == 0 and (np.diff(st) <= 50).all() and st.size >= 4, (g, st)
    assert list(r.dataset("grad")["layer"].values) == m["layers"] + ["all"]
    p = r.dataset("probe").load()
    np.testing.assert_allclose(p["selectivity"], p["accuracy"] - p["control_accuracy"], atol=1e-6)


def test_collapse_truth():
    r = open_run(FIX / "collapse")
    t = r.attrs["run"]["fixture_truth"]
    cr = r.dataset("routing")["capacity_rate"].sel(modality=t["modality"])
    for layer in t["layers"]:
        x = cr.sel(layer=layer)
        s0 = t["below_from_step"][layer]
        assert t["onset_step"] < s0 < SIZES["n_steps"]
        assert (x.sel(step=slice(s0, None)) < 0.8).all()
        assert float(x.sel(step=slice(None, t["onset_step"] - 1)).mean()) > 0.9
    others = [l for l in r.attrs["model"]["layers"] if l not in t["layers"]]
    assert float(cr.sel(layer=others).min()) > 0.8  # only the planted layers collapse


def test_dead_experts_truth():
    r = open_run(FIX / "dead_experts")
    t = r.attrs["run"]["fixture_truth"]
    ds = r.dataset("routing")
    late = ds.sel(step=slice(t["from_step"], None))
    for layer in t["layers"]:
        assert (late["load"].sel(layer=layer, expert=t["experts"]) == 0).all()
        np.testing.assert_allclose(late["dead_frac"].sel(layer=layer), t["dead_frac"])
    assert float(ds["dead_frac"].sel(step=slice(None, t["from_step"] - 1)).max()) == 0.0
    assert float(ds["capacity_rate"].min()) > 0.9  # nothing else to find


def test_grad_conflict_truth_and_healthy_contrast():
    t = open_run(FIX / "grad_conflict").attrs["run"]["fixture_truth"]
    for name, conflict in (("grad_conflict", True), ("healthy", False)):
        g = open_run(FIX / name).dataset("grad")
        late = g.sel(step=slice(t["from_step"], None), component=t["components"])
        ratio = (late["norm_gen"] / late["norm_und"]).median().item()
        cos = late["cosine"].median().item()
        if conflict:
            assert ratio > 5 and cos < -0.2, (ratio, cos)
        else:
            assert 0.5 < ratio < 2 and cos >= 0, (ratio, cos)


def test_probe_regression_and_control_truth():
    for name, falls in (("probe_regression", True), ("und_only_control", True), ("healthy", False)):
        p = open_run(FIX / name).dataset("probe")
        sel = p["selectivity"].mean(["layer", "task"]).values
        acc = p["isolated"].sel(metric="digit_acc").values
        assert (sel[-1] < sel[0] - 0.05) == falls and (acc[-1] < acc[0]) == falls, name
    ctrl = open_run(FIX / "und_only_control")
    assert ctrl.dataset("routing")["tokens"].sel(modality="vae").max() == 0
    assert np.isnan(ctrl.dataset("routing")["capacity_rate"].sel(modality="vae")).all()
    assert math.isnan(ctrl.frame("loss", "value", term="gen")["value"].iloc[-1])
