"""HF gradient conflict and shared-expert isolation against independent plain-torch references.

References use HF's own ``labels=`` loss, ``.backward()`` and ``.grad``, parameter names matched
with patterns written out for Qwen2-MoE here, and a forward hook zeroing the experts' output.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from moe_probe.hf.capture import RouterCapture, lm_loss  # noqa: E402
from moe_probe.hf.discover import find_moe_layers  # noqa: E402
from moe_probe.hf.grad import GradConflict  # noqa: E402
from moe_probe.hf.loading import load_model  # noqa: E402
from moe_probe.modalities import GRAD_COMPONENTS  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


def _cos(ga, gb, names):
    a = torch.cat([ga[n].flatten() for n in names]).double()
    b = torch.cat([gb[n].flatten() for n in names]).double()
    return float(a @ b / (a.norm() * b.norm())), float(a.norm()), float(b.norm())


def test_qwen2_moe_components_match_plain_backward():
    model, _, _ = load_model(str(FIX / "qwen2_moe.json"), seed=0)
    _, layers = find_moe_layers(model)
    gen = torch.Generator().manual_seed(3)
    ids_a = torch.randint(3, 256, (2, 16), generator=gen)
    ids_b = torch.randint(3, 256, (2, 16), generator=gen)
    row, experts = GradConflict(model, layers).measure(ids_a, ids_b)
    ga, gb = _grads(model, ids_a), _grads(model, ids_b)
    patterns = {"attn": ".self_attn.", "router": ".mlp.gate.", "experts": ".mlp.experts.",
                "shared": ".mlp.shared_expert", "norm": "layernorm"}
    for li in range(2):
        pre = f"model.layers.{li}."
        for comp, pat in patterns.items():
            names = [n for n in ga if n.startswith(pre) and pat in n]
            assert names, (li, comp)
            c = GRAD_COMPONENTS.index(comp)
            want = _cos(ga, gb, names)
            np.testing.assert_allclose([row["cosine"][li, c], row["norm_und"][li, c],
                                        row["norm_gen"][li, c]], want, rtol=1e-4, atol=1e-7)
        for e in range(8):
            a = torch.cat([ga[pre + f"mlp.experts.{p}"][e].flatten() for p in ("gate_up_proj", "down_proj")])
            b = torch.cat([gb[pre + f"mlp.experts.{p}"][e].flatten() for p in ("gate_up_proj", "down_proj")])
            if a.norm() > 0 and b.norm() > 0:
                np.testing.assert_allclose(experts["cosine"][li, e],
                                           float(a.double() @ b.double() / (a.norm() * b.norm())), rtol=1e-4)
    # layer "all", component "norm": both layers' norms + embeddings, final norm, lm head
    io = [n for n in ga if "layernorm" in n or not n.startswith("model.layers.")]
    np.testing.assert_allclose(row["cosine"][2, GRAD_COMPONENTS.index("norm")], _cos(ga, gb, io)[0],
                               rtol=1e-4)
    assert np.isnan(row["cosine"][:, GRAD_COMPONENTS.index("gen_experts")]).all()


def test_deepseek_dense_layer_counts_only_in_all():
    model, _, _ = load_model(str(FIX / "deepseek_v3.json"), seed=0)
    _, layers = find_moe_layers(model)
    assert [x.name for x in layers] == ["1", "2"]  # layer 0 is dense
    gen = torch.Generator().manual_seed(4)
    ids_a, ids_b = torch.randint(3, 256, (2, 12), generator=gen), torch.randint(3, 256, (2, 12), generator=gen)
    row, _ = GradConflict(model, layers).measure(ids_a, ids_b)
    ga, gb = _grads(model, ids_a), _grads(model, ids_b)
    attn = [n for n in ga if ".self_attn." in n]  # all three layers, dense one included
    np.testing.assert_allclose(row["norm_und"][2, GRAD_COMPONENTS.index("attn")], _cos(ga, gb, attn)[1],
                               rtol=1e-4)
    shared = [n for n in ga if n.startswith("model.layers.1.mlp.shared_experts.")]
    np.testing.assert_allclose(row["cosine"][0, GRAD_COMPONENTS.index("shared")], _cos(ga, gb, shared)[0],
                               rtol=1e-4)


def test_mask_routed_equals_zeroed_experts_hook():
    model, _, _ = load_model(str(FIX / "qwen2_moe.json"), seed=0)
    _, layers = find_moe_layers(model)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))
    cap = RouterCapture(model, layers)
    full, masked = cap.logits(ids), cap.logits(ids, mask_routed=True)
    handles = [layer.mlp.experts.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
               for layer in model.model.layers]
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, labels=ids)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(masked, ref.logits)
    torch.testing.assert_close(lm_loss(masked, ids), ref.loss)
    assert (full - masked).abs().max() > 0
    # the capture's hooks lived for its forwards only
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "granitemoe", "granitemoeshared",
                                    "phimoe", "gpt_oss", "llama4_text"])
def test_every_family_gets_components_and_expert_slices(family):
    model, _, _ = load_model(str(FIX / f"{family}.json"), seed=0)
    _, layers = find_moe_layers(model)
    gen = torch.Generator().manual_seed(6)
    ids_a, ids_b = torch.randint(3, 256, (2, 12), generator=gen), torch.randint(3, 256, (2, 12), generator=gen)
    row, experts = GradConflict(model, layers).measure(ids_a, ids_b)
    c = {k: GRAD_COMPONENTS.index(k) for k in GRAD_COMPONENTS}
    # PhiMoE in eval: sparsemixer's gate is a softmax over the logits within 2·jitter of the max,
    # usually one of them, so the router gets (almost) no gradient — a property of the model.
    for k in ("attn", "experts", "norm") + (() if family == "phimoe" else ("router",)):
        assert np.isfinite(row["norm_und"][:, c[k]]).all() and (row["norm_und"][:, c[k]] > 0).all(), k
    assert np.isfinite(row["cosine"][:, c["shared"]]).all() == any(x.n_shared for x in layers)
    # Every routed-expert parameter has E as first dim, so the slices add up to the layer.
    np.testing.assert_allclose((experts["norm_und"] ** 2).sum(-1), row["norm_und"][:-1, c["experts"]] ** 2,
                               rtol=1e-6)
