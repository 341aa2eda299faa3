"""RoutingCounter (attached with model.hooks) against routings worked out by hand (see the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from moe_probe.model.hooks import HookPoint, LayerRouting, RouterRecord, hooks, layer_hooks
from moe_probe import metrics
from moe_probe.trace.routing import RoutingCounter, counter_for

NINF = -math.inf
PLAIN = LayerRouting(n_experts=4, top_k=2, capacity_factor=None, groups={"all": (0, 1, 2, 3)})


def rec(logits, ids, modality, kept=None, weights=None):
    ids = torch.tensor(ids, dtype=torch.int64)
    return RouterRecord(
        logits_TE=torch.tensor(logits, dtype=torch.float32),
        topk_ids_TK=ids,
        topk_weights_TK=torch.ones(ids.shape) if weights is None else weights,
        kept_TK=None if kept is None else torch.tensor(kept, dtype=torch.bool),
        modality_T=torch.tensor(modality, dtype=torch.int64),
    )


L2 = math.log(2)
# Forward A (4 tokens, E=4, K=2): text t0 -> {0,1}, text t1 -> {0,2}, vit t2 -> {0,1}, vae t3 -> {3,0}.
REC_A = rec([[0, 0, 0, 0], [L2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[0, 1], [0, 2], [0, 1], [3, 0]], [0, 0, 1, 2])


def test_plain_dropless_nominal_hand_worked():
    c = RoutingCounter(["0"], [PLAIN], nominal_capacity=1.0)
    c.add(0, REC_A)
    row = c.finish()
    # load per modality: text [2,1,1,0], vit [1,1,0,0], vae [1,0,0,1]
    np.testing.assert_array_equal(row["tokens"], [[2, 1, 1]])
    np.testing.assert_array_equal(row["load"][0], [[2, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1]])
    # 8 assignments into 4 experts -> cap 2; e0 holds 4 -> keeps 2, split text 1, vit .5, vae .5
    # text kept = 1 + 1 (e1) + 1 (e2) = 3; vit = .5 + 1 = 1.5; vae = 1 (e3) + .5 = 1.5
    np.testing.assert_allclose(row["kept"], [[3.0, 1.5, 1.5]])
    np.testing.assert_allclose(row["capacity_rate"], [[0.75, 0.75, 0.75]])
    # text: p = [.5,.25,.25,0] -> H = 1.5 ln2, / ln4 = .75; vit/vae: two equal experts -> .5
    np.testing.assert_allclose(row["entropy"], [[0.75, 0.5, 0.5]])
    # text: max 2, mean 1 -> 1; vit: max 1, mean .5 -> 1
    np.testing.assert_allclose(row["maxvio"], [[1.0, 1.0, 1.0]])
    # dead: text e3 (0 < .01 * 1) -> 1/4; vit and vae two of four
    np.testing.assert_allclose(row["dead_frac"], [[0.25, 0.5, 0.5]])
    # top-1 softmax prob: zeros -> .25; [ln2,0,0,0] -> 2/5
    np.testing.assert_allclose(row["confidence"], [[(0.25 + 0.4) / 2, 0.25, 0.25]], rtol=1e-6)
    z = (3 * math.log(4) ** 2 + math.log(5) ** 2) / 4
    np.testing.assert_allclose(row["router_z"], [z], rtol=1e-6)


def test_micro_batches_sum_and_capacity_is_per_forward():
    c = RoutingCounter(["0"], [PLAIN], nominal_capacity=1.0)
    c.add(0, REC_A)
    # Forward B: two text tokens both -> {0,1}: 4 assignments, cap 1 -> keeps 1 + 1 = 2.
    # (Capping the summed loads instead would give cap 3 and keep more: 6 of 8 text.)
    c.add(0, rec([[0, 0, 0, 0]] * 2, [[0, 1], [0, 1]], [0, 0]))
    row = c.finish()
    np.testing.assert_array_equal(row["tokens"], [[4, 1, 1]])
    np.testing.assert_allclose(row["kept"], [[5.0, 1.5, 1.5]])
    np.testing.assert_allclose(row["capacity_rate"][0, 0], 5 / 8)
    np.testing.assert_array_equal(row["load"][0, 0], [4, 3, 1, 0])
    # finish() resets: the next step starts from zero
    c.add(0, REC_A)
    np.testing.assert_array_equal(c.finish()["tokens"], [[2, 1, 1]])


def test_capacity_layer_uses_actual_drops():
    info = LayerRouting(n_experts=4, top_k=2, capacity_factor=1.0, groups={"all": (0, 1, 2, 3)})
    c = RoutingCounter(["0"], [info])
    r = REC_A
    r = RouterRecord(r.logits_TE, r.topk_ids_TK, r.topk_weights_TK,
                     torch.tensor([[1, 1], [1, 0], [1, 0], [1, 1]], dtype=torch.bool), r.modality_T)
    c.add(0, r)
    row = c.finish()
    np.testing.assert_allclose(row["kept"], [[3, 1, 2]])
    np.testing.assert_allclose(row["capacity_rate"], [[0.75, 0.5, 1.0]])
    # load counts picks before drops
    np.testing.assert_array_equal(row["load"][0].sum(-1), [4, 2, 2])


def test_groups_nominal_capacity_and_dead_experts():
    # symbiotic-like: und = {0,1,2}, gen = {3}, K=1; vae tokens see -inf outside the gen group.
    info = LayerRouting(n_experts=4, top_k=1, capacity_factor=None,
                        groups={"und": (0, 1, 2), "gen": (3,)},
                        modality_group={"text": "und", "vit": "und", "vae": "gen"})
    und_logits, gen_logits = [0, 0, 0, NINF], [NINF, NINF, NINF, 0]
    r = rec([und_logits, und_logits, und_logits, gen_logits, gen_logits],
            [[0], [0], [1], [3], [3]], [0, 0, 1, 2, 2])
    c = RoutingCounter(["0"], [info], nominal_capacity=1.0)
    c.add(0, r)
    row = c.finish()
    # und: 3 assignments / 3 experts -> cap 1: e0 keeps 1 of 2 (text), e1 1 of 1 (vit);
    # gen: 2 assignments / 1 expert -> cap 2: vae keeps both.
    np.testing.assert_allclose(row["kept"], [[1, 1, 2]])
    np.testing.assert_allclose(row["capacity_rate"], [[0.5, 1.0, 1.0]])
    # text over und: [2,0,0] -> entropy 0, maxvio (2 - 2/3)/(2/3) = 2, dead 2/3
    np.testing.assert_allclose(row["entropy"][0, :2], [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(row["maxvio"][0], [2.0, 2.0, 0.0])
    np.testing.assert_allclose(row["dead_frac"][0], [2 / 3, 2 / 3, 0.0])
    assert np.isnan(row["entropy"][0, 2])  # a one-expert group has no entropy scale
    # group softmax: 1/3 inside und, 1.0 inside the one-expert gen group; z: lse = ln3 / 0
    np.testing.assert_allclose(row["confidence"], [[1 / 3, 1 / 3, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(row["router_z"], [3 * math.log(3) ** 2 / 5], rtol=1e-6)


def test_absent_modality_is_nan_and_layers_of_different_width():
    small = LayerRouting(n_experts=2, top_k=1, capacity_factor=None)
    c = RoutingCounter(["a", "b"], [PLAIN, small])
    c.add(1, rec([[0.0, 0.0], [0.0, 0.0]], [[1], [1]], [0, 0]))
    row = c.finish()
    assert row["load"].shape == (2, 3, 4)
    np.testing.assert_array_equal(row["load"][1, 0], [0, 2, 0, 0])
    assert np.isnan(row["capacity_rate"][0]).all()  # layer a saw nothing
    assert np.isnan(row["capacity_rate"][1, 1:]).all() and np.isnan(row["router_z"][0])
    # 2 assignments, 2 experts -> cap 1: e1 keeps 1 of 2
    np.testing.assert_allclose(row["capacity_rate"][1, 0], 0.5)
    np.testing.assert_allclose(row["dead_frac"][1, 0], 0.5)


@pytest.mark.parametrize("C", [1.0, 1.25, 0.5, 2.0, 1.1])
def test_counter_nominal_kept_equals_metrics(C):
    """The counter's batched on-device nominal kept == the numpy reader's, one forward at a time."""
    g = torch.Generator().manual_seed(0)
    for info in (PLAIN, LayerRouting(n_experts=6, top_k=1, capacity_factor=None,
                                     groups={"und": (0, 2, 4, 5), "gen": (1,)})):
        allowed = [e for ids in info.groups.values() for e in ids]  # expert 3 may be in no group
        c = RoutingCounter(["0"], [info], nominal_capacity=C)
        want = np.zeros(3)
        for _ in range(20):
            T = int(torch.randint(1, 12, (1,), generator=g))
            ids = torch.tensor(allowed)[torch.randint(0, len(allowed), (T, info.top_k), generator=g)]
            mod = torch.randint(0, 3, (T,), generator=g)
            c.add(0, RouterRecord(torch.zeros(T, info.n_experts), ids, torch.ones(ids.shape), None, mod))
            load = np.zeros((3, info.n_experts))
            np.add.at(load, (mod[:, None].expand_as(ids).numpy(), ids.numpy()), 1)
            want += metrics.nominal_kept(load, info.groups, info.modality_group, C)
        np.testing.assert_allclose(c.finish()["kept"][0], want, rtol=1e-12, atol=1e-12)


def test_any_number_of_modalities():
    """The modality width is the counter's names: 5 kinds, counts land under their own index."""
    names = ["a", "b", "c", "d", "e"]
    c = RoutingCounter(["0"], [PLAIN], modalities=names)
    c.add(0, rec([[0, 0, 0, 0]] * 6, [[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]], [0, 1, 2, 3, 4, 4]))
    row = c.finish()
    np.testing.assert_array_equal(row["tokens"], [[1, 1, 1, 1, 2]])
    np.testing.assert_array_equal(row["load"][0], [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1],
                                                   [1, 0, 0, 1], [1, 1, 1, 1]])
    assert row["entropy"].shape == row["capacity_rate"].shape == (1, 5)
    with pytest.raises(ValueError, match="at least one modality"):
        RoutingCounter(["0"], [PLAIN], modalities=[])


# ----------------------------------------------------------------------------- a tiny real module

class TinyMoEFFN(nn.Module):
    """A real top-k router with the hook contract (no experts needed to test the counter)."""

    def __init__(self, d, n_experts, k):
        super().__init__()
        self.router = nn.Linear(d, n_experts, bias=False)
        self.k = k
        self.hook_router = HookPoint()

    def routing_info(self):
        return LayerRouting(n_experts=self.router.out_features, top_k=self.k, capacity_factor=None)

    def forward(self, x_TD, modality_T):
        logits = self.router(x_TD)
        w, ids = torch.topk(torch.softmax(logits, -1), self.k, -1)
        self.hook_router(RouterRecord(logits, ids, w, None, modality_T))
        return x_TD + w.sum(-1, keepdim=True) * x_TD


class TinyModel(nn.Module):
    def __init__(self, d=8, n_experts=4, k=2, n_layers=2):
        super().__init__()
        self.layers = nn.ModuleList(TinyMoEFFN(d, n_experts, k) for _ in range(n_layers))

    def moe_layers(self):
        return [(str(i), m) for i, m in enumerate(self.layers)]

    def forward(self, x_TD, modality_T):
        for m in self.layers:
            x_TD = m(x_TD, modality_T)
        return x_TD


def _n_hooks(model):
    return sum(len(m.hook_router._forward_hooks) for _, m in model.moe_layers())


def test_tracer_counts_real_router_and_removes_hooks():
    torch.manual_seed(0)
    model = TinyModel()
    x, mod = torch.randn(10, 8), torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    seen = []
    for _, m in model.moe_layers():  # an independent observer of the same records
        m.hook_router.register_forward_hook(lambda _m, a, _o: seen.append(a[0]))
    counter = counter_for(model)
    with hooks(model, layer_hooks(model, "hook_router", counter.add)):
        assert _n_hooks(model) == 4
        model(x, mod)
    assert _n_hooks(model) == 2
    row = counter.finish()
    for li, r in enumerate(seen):
        load = np.zeros((3, 4))
        for t in range(10):
            for e in r.topk_ids_TK[t].tolist():
                load[int(r.modality_T[t]), e] += 1
        np.testing.assert_array_equal(row["load"][li], load)
        p = torch.softmax(r.logits_TE, -1).max(-1).values
        for m in range(3):
            np.testing.assert_allclose(row["confidence"][li, m], p[r.modality_T == m].mean().item(), rtol=1e-6)
        z = torch.logsumexp(r.logits_TE, -1).pow(2).mean().item()
        np.testing.assert_allclose(row["router_z"][li], z, rtol=1e-6)
    # forwards outside the tracer are not counted
    model(x, mod)
    assert counter.finish()["tokens"].sum() == 0


def test_tracer_removes_hooks_on_exception():
    model = TinyModel()
    counter = counter_for(model)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, layer_hooks(model, "hook_router", counter.add)):
            assert _n_hooks(model) == 2
            raise RuntimeError("boom")
    assert _n_hooks(model) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a GPU")
def test_add_never_syncs_with_the_host_on_cuda():
    info = LayerRouting(n_experts=4, top_k=2, capacity_factor=None,
                        groups={"und": (0, 1), "gen": (2, 3)}, modality_group={"vae": "gen"})
    c = RoutingCounter(["0"], [info], device="cuda")
    r = REC_A
    r = RouterRecord(*(t.cuda() for t in (r.logits_TE, r.topk_ids_TK, r.topk_weights_TK)), None,
                     r.modality_T.cuda())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        c.add(0, r)
        c.add(0, r)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    np.testing.assert_array_equal(c.finish()["tokens"], [[4, 2, 2]])
