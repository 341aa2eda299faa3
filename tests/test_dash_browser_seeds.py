"""The Compare page's seed groups in a real headless chromium: runs of two configs over five
seeds (fixtures/groups.py) ticked on the Runs page are grouped by config without the seed and
drawn as mean ± 95% t interval per step; the drawn band is recomputed here from the stores with
scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import moe_probe
from dashboards.testing import (
    Server, need_browser, make_driver, quit_driver, severe_logs, wait_for, wait_graph,
)
from fixtures.groups import SEEDS, build_groups

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    need_browser()
    r = tmp_path_factory.mktemp("seedroot")
    build_groups(r)
    return r


@pytest.fixture(scope="module")
def driver(root):
    with Server(root, refresh=1.0) as srv:
        d = make_driver()
        try:
            yield d, srv
        finally:
            quit_driver(d)


def _arr(v):
    return np.array([np.nan if x is None else x for x in v], dtype=float)


def _band(root, group, modality):
    """mean, lo, hi per step over the group's seeds: capacity rate mean over layers."""
    rows = np.stack([np.nanmean(moe_probe.open_run(root / group / f"seed{s}")
                                .read("routing", "capacity_rate", modality=modality)
                                .values.astype(float), axis=1) for s in SEEDS])
    mean = rows.mean(axis=0)
    lo, hi = stats.t.interval(0.95, len(SEEDS) - 1, loc=mean, scale=stats.sem(rows, axis=0))
    return mean, lo, hi


def test_seed_groups_draw_mean_and_95_ci_over_seeds(driver, root):
    d, server = driver
    severe_logs(d)
    d.get(server.url + "/")
    wait_for(lambda: d.find_elements("css selector", "#runs-pick input"), 60, what="run list")
    for g in ("base", "lr_x3"):
        for s in SEEDS:
            d.find_element("css selector", f"#runs-pick input[value='{g}/seed{s}']").click()
    d.find_element("id", "nav-compare").click()
    fig = wait_graph(d, "compare-bands", lambda g: len(g["traces"]) == 6, timeout=60)
    names = [t["name"] for t in fig["traces"]]
    assert names[2] == "train.lr_new=0.001 (n=5)" and names[5] == "train.lr_new=0.003 (n=5)"
    for i, group in ((0, "base"), (3, "lr_x3")):
        mean, lo, hi = _band(root, group, "text")
        steps = moe_probe.open_run(root / group / "seed0").dataset("routing")["step"].values
        np.testing.assert_array_equal(_arr(fig["traces"][i + 2]["x"]), steps)
        np.testing.assert_allclose(_arr(fig["traces"][i + 2]["y"]), mean, rtol=1e-5)
        np.testing.assert_allclose(_arr(fig["traces"][i]["y"]), hi, rtol=1e-5)
        np.testing.assert_allclose(_arr(fig["traces"][i + 1]["y"]), lo, rtol=1e-5)
    # another series: the bands follow the dropdown
    d.find_element("id", "compare-band-series").click()
    opt = wait_for(lambda: [o for o in d.find_elements("css selector", "[role=option]")
                            if o.text.strip() == "capacity rate · vae"], 10, what="option")
    opt[0].click()
    fig = wait_graph(d, "compare-bands", lambda g: g["title"].startswith("capacity rate · vae"))
    np.testing.assert_allclose(_arr(fig["traces"][2]["y"]), _band(root, "base", "vae")[0],
                               rtol=1e-5)
    assert not severe_logs(d)
