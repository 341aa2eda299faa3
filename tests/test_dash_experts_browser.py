"""The Experts page in a real headless chromium against a trained run's `token_routing` group.

What the graphs draw is compared with counts made here from the group read with plain xarray
(not through moe_probe.specialization, which the page uses)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from sklearn.datasets import load_digits

import moe_probe
from dashboards.testing import (
    Server, need_browser, make_driver, quit_driver, severe_logs, wait_for, wait_graph,
)
from moe_probe.run import store_path

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    need_browser()
    from moe_probe.cli import main

    r = tmp_path_factory.mktemp("experts")
    assert main(["train", "--recipe", "tiny-moe", "--out", str(r / "tiny"), "--steps", "4"]) == 0
    return r


@pytest.fixture(scope="module")
def page(root):
    with Server(root, refresh=1.0) as srv:
        d = make_driver()
        try:
            yield d, srv
            assert not severe_logs(d), "browser console errors"
        finally:
            quit_driver(d)


def _select(d, dropdown_id, value):
    d.find_element("id", dropdown_id).click()
    opt = wait_for(lambda: [o for o in d.find_elements("css selector", "[role=option]")
                            if o.text.strip() == str(value)], 10, what=f"option {value}")
    opt[0].click()


def _took(ds, step, layer, expert):
    """Boolean per token: it picks ``expert`` at ``step`` in ``layer``."""
    return (ds.topk_ids.sel(step=step, layer=layer).values == expert).any(-1)


def test_experts_page_draws_what_the_store_holds(page, root):
    d, srv = page
    run = root / "tiny"
    ds = xr.open_zarr(store_path(run), group="token_routing", consolidated=False).load()
    attrs = moe_probe.open_run(run).attrs
    legend, mods = attrs["token_routing"], attrs["modalities"]
    first, last = int(ds.step.values[0]), int(ds.step.values[-1])
    kind, label = ds.kind.values[0], ds.label.values[0]
    d.get(srv.url + "/experts")

    # expert 0 of layer 0 by default, steps first vs last: the top words at the last step
    g = wait_graph(d, "experts-words", lambda g: "layer 0 expert 0" in g["title"], timeout=60)
    assert f"step {first} vs {last}" in g["title"]
    took = _took(ds, last, "0", 0)
    tid = ds.token_id.values[0]
    ids, counts = np.unique(tid[took & (tid >= 0)], return_counts=True)
    want = {legend["vocab"][str(i)]: c for i, c in zip(ids, counts)}
    bars = next(t for t in g["traces"] if t["name"] == f"step {last}")
    drawn = dict(zip(bars["y"], bars["x"]))
    assert all(want.get(w, 0) == c for w, c in drawn.items())
    shown = [c for c in drawn.values() if c]
    rest = [c for w, c in want.items() if w not in drawn]
    assert len(shown) == min(15, len(want)) and (not rest or min(shown) >= max(rest))

    # another expert: digit classes of its vit tokens, patch positions, the real digits
    _select(d, "experts-expert", 3)
    lab = wait_graph(d, "experts-labels", lambda g: "expert 3" in g["title"])
    took = _took(ds, last, "0", 3)
    vit = mods.index("vit")
    vit_bars = next(t for t in lab["traces"] if t["name"] == f"vit · step {last}")
    want_cls = np.bincount(label[took & (kind == vit)], minlength=10)[:10]
    np.testing.assert_array_equal(np.asarray(vit_bars["y"], float), want_cls)

    pat = wait_graph(d, "experts-patches", lambda g: "expert 3" in g["title"])
    grid = legend["patch_grid"]
    patch = ds.patch.values[0]
    per_patch = np.bincount(patch[took & (kind == vit)], minlength=grid[0] * grid[1])
    pixels = np.kron(per_patch.reshape(grid), np.ones((2, 2)))
    assert np.asarray(pat["traces"][1]["z"], float).shape == (8, 8)  # vit at the last step
    np.testing.assert_array_equal(np.asarray(pat["traces"][1]["z"], float), pixels)

    imgs = wait_graph(d, "experts-images", lambda g: "expert 3" in g["title"])
    on = took & (ds.image.values[0] >= 0)
    pairs, n = np.unique(np.stack([ds.image.values[0][on], kind[on]], 1), axis=0,
                         return_counts=True)
    digits = load_digits()
    best = pairs[np.argmax(n)]
    np.testing.assert_array_equal(np.asarray(imgs["traces"][0]["z"], float),
                                  digits.images[best[0]])

    # step A moves: the words graph compares the chosen snapshots
    _select(d, "experts-step-a", last)
    wait_graph(d, "experts-words", lambda g: f"step {last} vs {last}" in g["title"])

    # the layer × expert map: the dominant kind's band plus its share of the expert's picks
    m = wait_graph(d, "experts-map", lambda g: g["title"].startswith("tiny"))
    z = np.array([[np.nan if v is None else v for v in r] for r in m["traces"][0]["z"]], float)
    for li, layer in enumerate(ds.layer.values):
        for e in range(z.shape[1]):
            t = _took(ds, last, layer, e)
            per_kind = np.bincount(kind[t], minlength=len(mods))
            if per_kind.sum():
                k = int(np.argmax(per_kind))
                assert z[li, e] == pytest.approx(k + min(per_kind[k] / per_kind.sum(), 0.999),
                                                 abs=1e-5)
            else:
                assert np.isnan(z[li, e])
