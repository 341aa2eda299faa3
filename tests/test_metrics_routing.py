"""Metric math (moe_probe/metrics.py) on tiny cases worked out by hand."""

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

from moe_probe import metrics as mt

NAN = float("nan")


def _quiet(fn, *a, **kw):
    # NaN for empty modalities must come without RuntimeWarning spam
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*a, **kw)


def test_plain_moe_with_drops_and_empty_modality():
    # E=4, k=2, one group. text: 2 tokens -> 4 picks [2,1,1,0], one dropped -> kept 3
    # vit: 1 token -> [0,0,1,1] kept 2; vae: no tokens.
    tokens = [2, 1, 0]
    load = [[2, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    kept = [3, 2, 0]
    r = _quiet(mt.routing_metrics, tokens, load, kept, 2)
    # capacity: text 3/(2*2)=0.75, vit 2/(2*1)=1, vae NaN
    np.testing.assert_allclose(r["capacity_rate"], [0.75, 1.0, NAN])
    # entropy text: p=[.5,.25,.25,0], H=.5ln2+2*.25ln4=1.5ln2, /ln4 = 0.75; vit p=[0,0,.5,.5] -> ln2/ln4=.5
    np.testing.assert_allclose(r["entropy"], [0.75, 0.5, NAN])
    # maxvio text: mean 1, max 2 -> 1; vit: mean .5, max 1 -> 1
    np.testing.assert_allclose(r["maxvio"], [1.0, 1.0, NAN])
    # dead (<1% of uniform share): text expert 3 -> 1/4; vit experts 0,1 -> 2/4
    np.testing.assert_allclose(r["dead_frac"], [0.25, 0.5, NAN])


def test_groups_restrict_metrics_to_the_modality_group():
    # E=5: und=(0,1,2), gen=(3,4); text/vit -> und, vae -> gen; k=1
    groups = {"und": (0, 1, 2), "gen": (3, 4)}
    mg = {"text": "und", "vit": "und", "vae": "gen"}
    load = [[3, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 4, 0]]
    r = _quiet(mt.routing_metrics, [4, 3, 4], load, [4, 3, 4], 1, groups, mg)
    # text p=[.75,.25,0] over E_g=3: H = .75 ln(4/3) + .25 ln 4 = 0.2157616 + 0.3465736 = 0.5623352
    # / ln 3 (1.0986123) = 0.5118595; vit uniform over 3 -> 1; vae p=[1,0] -> 0
    np.testing.assert_allclose(r["entropy"], [0.5118595, 1.0, 0.0], atol=1e-6)
    # maxvio text: mean 4/3, max 3 -> 1.25; vit 0; vae mean 2, max 4 -> 1
    np.testing.assert_allclose(r["maxvio"], [1.25, 0.0, 1.0])
    # dead: text expert 2 -> 1/3 (gen experts don't count); vit 0; vae expert 4 -> 1/2
    np.testing.assert_allclose(r["dead_frac"], [1 / 3, 0.0, 0.5])
    np.testing.assert_allclose(r["capacity_rate"], [1.0, 1.0, 1.0])


def test_routing_metrics_for_duck_typed_layer_routing():
    class LR:  # the shape of moe_probe.model.hooks.LayerRouting, no torch needed
        top_k = 1
        groups = {"und": (0, 1, 2), "gen": (3, 4)}
        modality_group = {"text": "und", "vit": "und", "vae": "gen"}
    a = mt.routing_metrics_for(LR, [4, 3, 4], [[3, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 4, 0]],
                               [2, 3, 4])
    np.testing.assert_allclose(a["capacity_rate"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(a["maxvio"], [1.25, 0.0, 1.0])


def test_dead_threshold_is_strictly_below_one_percent_of_uniform():
    # group of 2: [199, 1] -> uniform 100, threshold 1.0, load 1 is not < 1 -> alive
    # [999, 1] -> uniform 500, threshold 5 -> dead -> 1/2
    r = mt.routing_metrics([100, 500, 1], [[199, 1], [999, 1], [1, 0]], [100, 500, 1], 2)
    np.testing.assert_allclose(r["dead_frac"], [0.0, 0.5, 0.5])


def test_single_expert_group_entropy_is_nan_not_error():
    r = _quiet(mt.routing_metrics, [2, 0, 0], [[2, 0], [0, 0], [0, 0]], [2, 0, 0], 1,
               {"a": (0,), "b": (1,)}, {"text": "a", "vit": "a", "vae": "b"})
    assert math.isnan(r["entropy"][0])  # log(E_g)=0: entropy undefined
    assert r["maxvio"][0] == 0.0 and r["dead_frac"][0] == 0.0


def test_leading_dims_match_per_layer_calls():
    rng = np.random.default_rng(0)
    load = rng.integers(0, 9, size=(7, 3, 3, 6))  # steps, layers, M, E
    load[2, 1, 2] = 0  # an empty modality somewhere
    tokens = load.sum(-1) // 2
    kept = np.minimum(load.sum(-1), tokens * 2 - 1)
    groups, mg = {"u": (0, 1, 2, 3), "g": (4, 5)}, {"text": "u", "vit": "u", "vae": "g"}
    full = _quiet(mt.routing_metrics, tokens, load, kept, 2, groups, mg)
    for s, l in [(0, 0), (2, 1), (6, 2)]:
        one = mt.routing_metrics(tokens[s, l], load[s, l], kept[s, l], 2, groups, mg)
        for k in one:
            np.testing.assert_allclose(full[k][s, l], one[k])


def test_nominal_kept_shares_capacity_by_load():
    # one forward, und=(0,1), gen=(2,3), C=1: und gets 4 assignments -> cap ceil(4/2)=2 per expert.
    # expert 0 load 4 (text 3, vit 1) -> kept 2 split 1.5 / 0.5; gen: 4 into 2 experts, cap 2,
    # experts 2,3 load 2 each -> kept 4.
    groups, mg = {"und": (0, 1), "gen": (2, 3)}, {"text": "und", "vit": "und", "vae": "gen"}
    load = [[3, 0, 0, 0], [1, 0, 0, 0], [0, 0, 2, 2]]
    np.testing.assert_allclose(mt.nominal_kept(load, groups, mg, 1.0), [1.5, 0.5, 4.0])
    # C=1.25: cap = ceil(1.25*4/2) = ceil(2.5) = 3 -> text 3*3/4 = 2.25, vit 0.75
    np.testing.assert_allclose(mt.nominal_kept(load, groups, mg, 1.25), [2.25, 0.75, 4.0])
    # capacity rate with k=1, tokens [3,1,4]: [0.5, 0.5, 1.0]
    kept = mt.nominal_kept(load, groups, mg, 1.0)
    np.testing.assert_allclose(mt.capacity_rate(kept, [3, 1, 4], 1), [0.5, 0.5, 1.0])


def test_nominal_kept_is_per_forward_not_of_summed_loads():
    # E=2, one group, C=1. forward A: text [2,0] -> cap ceil(2/2)=1 -> kept 1; B: [0,2] -> kept 1.
    # summed over forwards: 2. Summing loads first ([2,2], cap 2) would wrongly give 4.
    a = mt.nominal_kept([[2, 0], [0, 0], [0, 0]], None, None, 1.0)
    b = mt.nominal_kept([[0, 2], [0, 0], [0, 0]], None, None, 1.0)
    assert (a + b)[0] == 2.0
    assert mt.nominal_kept([[2, 2], [0, 0], [0, 0]], None, None, 1.0)[0] == 4.0


def test_nominal_kept_exact_integer_capacity_is_not_rounded_up():
    # 6 assignments over 3 experts, C=1 -> cap exactly 2; load [4,1,1] -> kept 2+1+1 = 4
    np.testing.assert_allclose(mt.nominal_kept([[4, 1, 1], [0, 0, 0], [0, 0, 0]], None, None, 1.0),
                               [4.0, 0.0, 0.0])


def test_saturation_and_coactivation():
    # token0: {0,1} vs {1,0} -> 2/2; token1: {2,3} vs {2,4} -> 1/2; mean 0.75
    assert mt.saturation([[0, 1], [2, 3]], [[1, 0], [2, 4]]) == 0.75
    # picks: {0,1}, {0,2}, {1,0}: count e0=3, e1=2, e2=1, e3=0
    # P(1|0)=2/3, P(2|0)=1/3, P(0|1)=2/2, P(2|1)=0, P(0|2)=1, P(1|2)=0; row 3 NaN
    c = mt.coactivation([[0, 1], [0, 2], [1, 0]], 4)
    np.testing.assert_allclose(c[0], [1, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(c[1], [1, 1, 0, 0])
    np.testing.assert_allclose(c[2], [1, 0, 1, 0])
    assert np.isnan(c[3]).all()
    with pytest.raises(ValueError):
        mt.saturation([[0, 1]], [[0, 1], [1, 2]])


def test_cosine_helpers():
    assert mt.cosine([1, 0], [-1, 0]) == -1.0
    assert math.isnan(_quiet(mt.cosine, [0, 0], [1, 2]))
    # a=(3,0,0), b=(-1,-1,0)*... : dot=-3, |a|^2=9, |b|^2=2 -> -3/(3*sqrt2) = -0.7071068
    np.testing.assert_allclose(mt.cosine_from_sums(-3.0, 9.0, 2.0), -0.7071068, atol=1e-7)


def test_metrics_module_does_not_import_torch():
    code = ("import sys, moe_probe.metrics as m; "
            "m.routing_metrics([1,0,0],[[1,0],[0,0],[0,0]],[1,0,0],1); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_cv_by_hand_and_over_the_modality_group():
    # text loads [2,1,1,0]: mean 1, population std sqrt((1+0+0+1)/4) = sqrt(0.5)
    # vit [0,0,1,1]: mean 0.5, std 0.5 -> cv 1; vae no load -> NaN; even load -> 0
    load = [[2, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    r = _quiet(mt.routing_metrics, [2, 1, 0], load, [3, 2, 0], 2)
    np.testing.assert_allclose(r["load_cv"][:2], [math.sqrt(0.5), 1.0])
    assert math.isnan(r["load_cv"][2])
    assert _quiet(mt.routing_metrics, [4], [[2, 2, 2, 2]], [8], 2, modalities=("text",))["load_cv"][0] == 0
    # Grouped: text routes into experts {0,1} only; its zero load on 2,3 must not count.
    groups, mg = {"und": (0, 1), "gen": (2, 3)}, {"text": "und", "vit": "und", "vae": "gen"}
    r = _quiet(mt.routing_metrics, [2, 0, 2], [[3, 1, 0, 0], [0] * 4, [0, 0, 4, 0]], [4, 0, 4], 2,
               groups, mg)
    np.testing.assert_allclose(r["load_cv"][[0, 2]], [0.5, 1.0])  # [3,1]: 1/2; [4,0]: 2/2
    assert np.std([3, 1]) / np.mean([3, 1]) == 0.5  # the same number, by numpy's definition
