"""Specialization metrics equal an independent recomputation from the `token_routing` group.

The recomputations read the group with plain xarray and follow OLMoE's analysis code
(allenai/OLMoE scripts/run_moe_analysis.py, plot_routing_analysis_v2.ipynb) with Counters and
sets, and sklearn's NMI: written apart from moe_probe.specialization on purpose."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from sklearn.metrics import normalized_mutual_info_score

import moe_probe
from fixtures.tokens import build_tokens
from moe_probe.run import store_path
from moe_probe.specialization import TokenRouting, specialization

FROZEN = Path(__file__).resolve().parents[1] / "fixtures" / "frozen" / "v1.0-healthy"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return build_tokens(tmp_path_factory.mktemp("tok") / "planted", takeover=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real tiny run: the group as the trainer writes it."""
    from moe_probe.cli import main

    out = tmp_path_factory.mktemp("tok") / "tiny"
    assert main(["train", "--recipe", "tiny-moe", "--out", str(out), "--steps", "4"]) == 0
    return out


def _olmoe_vocabulary(input_ids, exp_ids, topk, n_experts):
    """OLMoE's do_token_analysis_layers_experts / print_avg (normalize=False), per expert."""
    input_id_to_exp = defaultdict(list)
    for _id, exp_id in zip(input_ids, exp_ids):
        input_id_to_exp[_id].extend(exp_id)
    exp_id_to_probs = defaultdict(list)
    for _id, exps in input_id_to_exp.items():
        most_freq_id, val = sorted(Counter(exps).items(), key=lambda x: -x[1])[0]
        exp_id_to_probs[most_freq_id].append(val / (len(exps) // topk))
    return [np.mean(exp_id_to_probs[e]) if e in exp_id_to_probs else np.nan
            for e in range(n_experts)]


def _recompute(run):
    ds = xr.open_zarr(store_path(run), group="token_routing", consolidated=False).load()
    attrs = moe_probe.open_run(run).attrs
    E, mods = attrs["model"]["experts"], attrs["modalities"]
    labels = attrs["token_routing"]["labels"]
    n_digit, topics = len(labels["digit"]), labels["topic"]
    kind, label = ds.kind.values[0], ds.label.values[0]
    tid, patch = ds.token_id.values[0], ds.patch.values[0]
    ids = ds.topk_ids.values.astype(int)
    S, L, N, K = ids.shape
    want = defaultdict(lambda: np.full((S, L, E), np.nan))
    share = np.full((S, L, len(topics), E), np.nan)
    sat = np.full((S, L), np.nan)
    load = np.zeros((S, L, len(mods), E))
    text = [n for n in range(N) if mods[kind[n]] == "text"]
    for s in range(S):
        for li in range(L):
            sets = [set(ids[s, li, n]) for n in range(N)]
            last = [set(ids[-1, li, n]) for n in range(N)]
            want["vocabulary"][s, li] = _olmoe_vocabulary(
                [tid[n] for n in text], [list(ids[s, li, n]) for n in text], K, E)
            for d in range(len(topics)):
                c = Counter(e for n in text if label[n] == n_digit + d for e in ids[s, li, n])
                total = sum(c.values())
                if total:
                    share[s, li, d] = [c[e] / total for e in range(E)]
            seen = share[s, li][~np.isnan(share[s, li]).any(1)]
            for e in range(E):
                if seen.size and seen[:, e].sum() > 0:
                    want["domain"][s, li, e] = seen[:, e].max() / seen[:, e].sum()
                took = [n for n in range(N) if e in sets[n]]
                if took:
                    want["saturation"][s, li, e] = np.mean([e in last[n] for n in took])
                for m in ("vit", "vae"):
                    toks = [n for n in range(N) if mods[kind[n]] == m and 0 <= label[n] < n_digit]
                    chosen = [int(e in sets[n]) for n in toks]
                    if any(chosen):
                        want[f"class_{m}"][s, li, e] = normalized_mutual_info_score(
                            [label[n] for n in toks], chosen)
                        want[f"position_{m}"][s, li, e] = normalized_mutual_info_score(
                            [patch[n] for n in toks], chosen)
                for n in range(N):
                    load[s, li, kind[n], e] += e in sets[n]
            sat[s, li] = np.mean([len(sets[n] & last[n]) / K for n in range(N)])
    return want, share, sat, load


@pytest.mark.parametrize("which", ["planted", "trained"])
def test_every_metric_equals_an_independent_recomputation(which, request):
    run = request.getfixturevalue(which)
    got = specialization(TokenRouting.from_store(moe_probe.open_run(run)))
    want, share, sat, load = _recompute(run)
    for var, w in want.items():
        np.testing.assert_allclose(got[var].values, w, rtol=1e-9, atol=1e-12, err_msg=var)
    np.testing.assert_allclose(got["domain_share"].values, share, rtol=1e-12, atol=0)
    np.testing.assert_allclose(got["layer_saturation"].values, sat, rtol=1e-12)
    np.testing.assert_array_equal(got["load"].values, load)
    assert set(want) == {"vocabulary", "domain", "saturation", "class_vit", "class_vae",
                         "position_vit", "position_vae"}
    assert np.isfinite(got["class_vit"].values).any() and np.isfinite(got["vocabulary"].values).any()


def test_planted_specialization_is_found(planted):
    sp = specialization(TokenRouting.from_store(moe_probe.open_run(planted))).sel(step=0, layer="0")
    cls, pos = sp.class_vit.values, sp.position_vae.values
    # experts 0-3 take digit classes (vit), 6-7 patch halves (vae); 4 takes words 0-5 always
    assert cls[:4].min() > 5 * np.nanmax(cls[4:])
    assert pos[6:].min() > 5 * np.nanmax(pos[:6])
    assert sp.vocabulary.values[4] > 0.75 and sp.layer_saturation.item() < 0.7


def test_old_stores_have_no_token_routing_and_say_so():
    from moe_probe.store import NotMeasured

    with pytest.raises(NotMeasured, match="not measured"):
        TokenRouting.from_store(moe_probe.open_run(FROZEN))
