"""The bounded per-step summary (moe_probe.summary) and its reading from stores
(moe_probe.export.history): same keys whatever the model's size, values as defined, committed rows
only, and the one-step function a live exporter will call giving the same numbers."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_probe import open_run  # noqa: E402
from moe_probe import summary as sm  # noqa: E402
from moe_probe.diagnose.rundata import load_run  # noqa: E402
from moe_probe.diagnose.runner import diagnose_run  # noqa: E402
from moe_probe.export.history import _load_cv, read_summary  # noqa: E402
from moe_probe.run import RunInfo  # noqa: E402

FROZEN = ROOT / "fixtures" / "frozen" / "v1.0-healthy"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from fixtures.generate import build
    from fixtures.large import build_large

    out = tmp_path_factory.mktemp("export_summary")
    for name in ("collapse", "und_only_control", "live"):
        build(name, out)
    # the benchmark store's shape (32 layers × 64 experts) on fewer steps, and a 2 × 4 one
    build_large(out, n_steps=2000, name="large")
    build_large(out, n_steps=2000, n_layers=2, n_experts=4, name="tiny")
    return out


def test_keys_do_not_grow_with_layers_or_experts(fx):
    large, tiny = read_summary(fx / "large"), read_summary(fx / "tiny")
    assert (len(open_run(fx / "large").labels("routing", "layer")),
            len(open_run(fx / "large").labels("routing", "expert"))) == (32, 64)
    assert (len(open_run(fx / "tiny").labels("routing", "layer")),
            len(open_run(fx / "tiny").labels("routing", "expert"))) == (2, 4)
    assert large.keys == tiny.keys
    assert len(large.keys) == 21 <= 24  # 3 kinds, 6 loss terms
    assert list(large.keys) == sm.summary_keys(["text", "vit", "vae"],
                                               ["lm", "mmu", "gen", "aux", "z", "total"])


def test_values_follow_their_definitions(fx):
    s = read_summary(fx / "collapse")
    store = open_run(fx / "collapse")
    r = store.dataset("routing").load()
    steps = r["step"].values
    np.testing.assert_array_equal(s.steps, steps)  # routing and loss every step, grad within
    col = {k: s.values[:, i] for i, k in enumerate(s.keys)}
    cap = r["capacity_rate"].astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_allclose(col["moe/capacity_rate_mean/text"],
                                   cap.sel(modality="text").mean("layer").values, rtol=1e-12)
        np.testing.assert_allclose(col["moe/capacity_rate_min/vae"],
                                   cap.sel(modality="vae").min("layer").values, rtol=1e-12)
        worst_SL = r["maxvio"].astype(float).max("modality").values
        for q in (50, 90):
            np.testing.assert_allclose(col[f"moe/maxvio_p{q}"],
                                       np.nanpercentile(worst_SL, q, axis=1), rtol=1e-12)
        np.testing.assert_allclose(col["moe/maxvio_max"], worst_SL.max(1), rtol=1e-12)
        for v in ("load_cv", "dead_frac", "entropy"):
            np.testing.assert_allclose(col[f"moe/{v}_mean"],
                                       r[v].astype(float).mean(("layer", "modality")).values,
                                       rtol=1e-12)
    loss = store.read("loss", "value")
    np.testing.assert_allclose(col["moe/loss/total"], loss.sel(term="total").values, rtol=1e-7)
    grad = store.read("grad", "cosine", layer="all", component="shared")
    g_steps, g_vals = s.series("moe/shared_grad_cosine")
    np.testing.assert_array_equal(g_steps, grad["step"].values)  # only where traced
    np.testing.assert_allclose(g_vals, grad.values, rtol=1e-7)
    # the collapse fixture's findings, each counted from its onset on
    findings = diagnose_run(load_run(fx / "collapse")).findings
    assert findings
    onsets = [f.onset_step for f in findings]
    np.testing.assert_array_equal(col["moe/findings_active"],
                                  [sum(o <= st for o in onsets) for st in steps])
    assert col["moe/findings_active"][0] == 0 and col["moe/findings_worst_severity"][0] == 0
    worst = max(sm.SEVERITY_LEVEL[f.severity] for f in findings)
    assert col["moe/findings_worst_severity"][-1] == worst


def test_shared_cosine_without_layer_all_is_the_mean_over_layers():
    cos_SLC = np.array([[[0.1, 0.5], [0.3, np.nan]], [[0.2, 0.4], [0.6, 0.8]]])
    out = sm.grad_summary(["0", "1"], ["attn", "shared"], cos_SLC)
    np.testing.assert_allclose(out["moe/shared_grad_cosine"], [0.5, 0.6])
    assert sm.grad_summary(["0", "all"], ["attn"], cos_SLC) == {}  # no shared experts: no key


def test_percentiles_match_numpy_with_missing_cells():
    rng = np.random.default_rng(0)
    x = rng.random((500, 9))
    x[rng.random(x.shape) < 0.3] = np.nan
    x[7] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for q in (0, 50, 90, 100):
            np.testing.assert_allclose(sm.nanpercentile_rows(x, q),
                                       np.nanpercentile(x, q, axis=1), rtol=0, atol=1e-15)


def test_load_cv_from_load_equals_the_measured_one(fx):
    """Stores written before `load_cv` existed get it from `load` with the same definition."""
    store = open_run(fx / "collapse")
    ds = store.dataset("routing")
    info = RunInfo.from_attrs(store.attrs, path=store.path)
    np.testing.assert_allclose(_load_cv(ds, info), ds["load_cv"].values, rtol=1e-6,
                               equal_nan=True)


def test_a_store_without_load_cv_exports_it_from_load():
    store = open_run(FROZEN)
    assert not store.measured("routing", "load_cv")
    steps, vals = read_summary(FROZEN, findings=False).series("moe/load_cv_mean")
    assert steps.size > 0 and np.all(vals >= 0)


def test_absent_kind_has_no_values(fx):
    s = read_summary(fx / "und_only_control")
    steps, _ = s.series("moe/capacity_rate_mean/vae")
    assert steps.size == 0  # no vae tokens: NaN everywhere, so nothing to send
    assert s.series("moe/capacity_rate_mean/text")[0].size == s.steps.size


def test_live_run_exports_committed_rows_only(fx):
    from fixtures.generate import GARBAGE

    s = read_summary(fx / "live")
    store = open_run(fx / "live")
    assert s.steps.max() == max(store.last_step(g) for g in ("routing", "loss", "grad"))
    assert s.steps.min() >= 0
    assert np.nanmax(np.abs(s.values)) < GARBAGE


def test_one_step_summary_equals_the_history_row(fx):
    """The seam for a live exporter: one step's rows, as the tracers produce them."""
    s = read_summary(fx / "collapse")
    store = open_run(fx / "collapse")
    findings = diagnose_run(load_run(fx / "collapse")).findings
    step = 200  # a grad step after the collapse onset
    r = store.dataset("routing").sel(step=step).load()
    g = store.dataset("grad").sel(step=step).load()
    one = sm.step_summary(
        step=step, modalities=store.labels("routing", "modality"),
        routing={v: r[v].transpose("layer", "modality").values for v in sm.ROUTING_VARS},
        loss_terms=store.labels("loss", "term"),
        loss=store.dataset("loss").sel(step=step)["value"].values,
        grad_layers=store.labels("grad", "layer"),
        grad_components=store.labels("grad", "component"),
        grad_cosine=g["cosine"].transpose("layer", "component").values, findings=findings)
    row = dict(s.rows())[step]
    assert one.keys() == row.keys()
    for k in row:
        assert one[k] == pytest.approx(row[k], rel=1e-12), k
