"""moe_probe.stats against scipy's own tests (and Holm written out here from its definition)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from moe_probe import stats


def _holm(ps, alpha=0.05):
    """Holm's step-down procedure by its definition: reject the i-th smallest p while
    p_(i) <= alpha / (m - i); returns the set of rejected indices."""
    order = np.argsort(ps)
    rejected = set()
    for rank, i in enumerate(order):
        if ps[i] > alpha / (len(ps) - rank):
            break
        rejected.add(int(i))
    return rejected


def test_paired_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.3, 6)
    b = a - 0.2 + rng.normal(0, 0.1, 6)
    got = stats.paired(dict(enumerate(a)), dict(enumerate(b)))
    ref = sps.ttest_rel(a, b)
    lo, hi = ref.confidence_interval(0.95)
    assert got["test"] == "paired" and got["n_a"] == got["n_b"] == 6
    assert math.isclose(got["diff"], float(np.mean(a - b)))
    assert math.isclose(got["t"], ref.statistic) and math.isclose(got["p"], ref.pvalue)
    assert math.isclose(got["ci_low"], lo) and math.isclose(got["ci_high"], hi)
    assert got["df"] == 5
    assert math.isclose(got["effect"], np.mean(a - b) / np.std(a - b, ddof=1))


def test_paired_uses_shared_seeds_only():
    a = {0: 1.0, 1: 2.0, 2: 3.5, 3: 9.0}
    b = {0: 0.5, 1: 1.0, 2: 2.0, 4: 7.0, 5: None}
    got = stats.paired(a, b)
    ref = sps.ttest_rel([1.0, 2.0, 3.5], [0.5, 1.0, 2.0])
    assert got["seeds"] == [0, 1, 2] and got["unpaired"] == [3, 4]
    assert math.isclose(got["p"], ref.pvalue)


def test_welch_matches_scipy_ttest_ind():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 7), rng.normal(0.8, 2.0, 5)
    got = stats.welch(list(a) + [math.nan], b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    lo, hi = ref.confidence_interval(0.95)
    assert got["test"] == "welch" and (got["n_a"], got["n_b"]) == (7, 5)
    assert math.isclose(got["t"], ref.statistic) and math.isclose(got["p"], ref.pvalue)
    assert math.isclose(got["df"], ref.df)
    assert math.isclose(got["ci_low"], lo) and math.isclose(got["ci_high"], hi)
    pooled = math.sqrt((6 * a.var(ddof=1) + 4 * b.var(ddof=1)) / 10)
    assert math.isclose(got["effect"], (a.mean() - b.mean()) / pooled)


def test_difference_pairs_when_seeds_are_shared_else_welch():
    assert stats.difference({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.5})["test"] == "paired"
    assert stats.difference({0: 1.0, 1: 2.0}, {2: 0.0, 3: 0.5})["test"] == "welch"
    assert stats.difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 3: 0.5, 4: 1.0})["test"] == "welch"


def test_too_few_or_constant_values_have_no_p():
    one = stats.paired({0: 1.0}, {0: 0.5})
    assert one["p"] is None and one["ci_low"] is None and one["diff"] == 0.5
    const = stats.paired({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})  # every difference 0.5
    assert const["p"] is None and const["ci_low"] == const["ci_high"] == 0.5
    assert stats.welch([1.0], [2.0, 3.0])["p"] is None
    assert stats.paired({}, {})["diff"] is None


@pytest.mark.parametrize("ps", [[0.01, 0.04, 0.03, 0.2], [0.001, 0.013, 0.02, 0.5, 0.04],
                                [0.06, 0.01], [0.2]])
def test_holm_rejects_what_the_step_down_procedure_rejects(ps):
    adj = stats.holm(ps)
    assert {i for i, p in enumerate(adj) if p < 0.05} == _holm(ps)
    assert all(a >= p for a, p in zip(adj, ps)) and all(a <= 1 for a in adj)


def test_holm_leaves_untestable_comparisons_out():
    assert stats.holm([0.02, None, 0.01]) == [0.02, None, 0.02]


def test_summarize_is_the_t_interval_of_the_mean():
    xs = [0.5, 0.7, 0.6, math.nan, None]
    s = stats.summarize(xs)
    fin = [0.5, 0.7, 0.6]
    lo, hi = sps.t.interval(0.95, 2, loc=np.mean(fin), scale=sps.sem(fin))
    assert s["n"] == 3 and math.isclose(s["mean"], 0.6)
    assert math.isclose(s["ci_low"], lo) and math.isclose(s["ci_high"], hi)
    assert stats.summarize([0.3])["ci_low"] is None
    assert stats.summarize([math.nan])["mean"] is None
    same = stats.summarize([1.0, 1.0])
    assert same["ci_low"] == same["ci_high"] == 1.0


def test_mean_ci_per_column_is_summarize_per_column():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 7))
    x[0, 2] = np.nan
    x[:4, 5] = np.nan  # one sample left: mean, no CI
    x[:, 6] = 0.25     # equal samples: zero width
    n, mean, lo, hi = stats.mean_ci(x)
    for j in range(7):
        col = x[:, j][np.isfinite(x[:, j])]
        assert n[j] == len(col) and math.isclose(mean[j], col.mean())
        if len(col) >= 2 and col.std() > 0:
            want = sps.t.interval(0.95, len(col) - 1, loc=col.mean(), scale=sps.sem(col))
            assert math.isclose(lo[j], want[0]) and math.isclose(hi[j], want[1])
    assert np.isnan(lo[5]) and lo[6] == hi[6] == 0.25
