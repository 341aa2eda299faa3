"""Structural discovery on an architecture no table knows: a ModuleList of expert MLPs and a
``nn.Linear`` gate that returns bare logits (the pre-transformers-5 layout, and many custom-code
models). The model records its own picks; the adapter must recount them from the gate logits."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from moe_probe.hf.capture import RouterCapture  # noqa: E402
from moe_probe.hf.discover import find_moe_layers  # noqa: E402

D, E, K, V = 16, 6, 2, 64
FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.switch = nn.Linear(D, E, bias=False)  # deliberately not called "gate"/"router"
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(D, 24), nn.GELU(), nn.Linear(24, D))
                                  for _ in range(E))
        self.picks: list[torch.Tensor] = []

    def forward(self, x_BSD):
        h = self.norm(x_BSD).reshape(-1, D)
        probs = torch.softmax(self.switch(h), -1)
        w, ids = probs.topk(K, -1)
        self.picks.append(ids)
        out = torch.zeros_like(h)
        for k in range(K):
            for e in range(E):
                sel = ids[:, k] == e
                if sel.any():
                    out[sel] += w[sel, k, None] * self.ffns[e](h[sel])
        return x_BSD + out.view_as(x_BSD)


class ToyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="toy_moe", num_hidden_layers=2, vocab_size=V,
                                      num_experts_per_tok=K)
        self.embed = nn.Embedding(V, D)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(D, V)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return SimpleNamespace(logits=self.head(x))


def test_unknown_architecture_with_bare_logit_router():
    torch.manual_seed(0)
    model = ToyMoE().eval()
    how, layers = find_moe_layers(model)
    assert how == "structural"
    assert [x.router for x in layers] == ["layers.0.switch", "layers.1.switch"]
    assert [x.experts for x in layers] == ["layers.0.ffns", "layers.1.ffns"]
    assert all(x.output == "logits" and x.n_experts == E and x.top_k == K for x in layers)
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(1))
    for b in model.layers:
        b.picks.clear()
    got = RouterCapture(model, layers).capture(ids, torch.zeros(ids.numel(), dtype=torch.long))
    assert not any(m._forward_hooks for m in model.modules())  # hooks lived for that forward only
    for b, rec in zip(model.layers, got.records):
        want = np.bincount(b.picks[-1].reshape(-1).numpy(), minlength=E)
        assert (want > 0).sum() > K
        np.testing.assert_array_equal(np.bincount(rec.topk_ids_TK.reshape(-1).numpy(), minlength=E), want)


class UnroutedBlock(Block):
    """Experts with no router beside them: picks come from elsewhere (here: token position)."""

    def __init__(self):
        super().__init__()
        del self.switch

    def forward(self, x_BSD):
        h = self.norm(x_BSD).reshape(-1, D)
        ids = torch.arange(h.shape[0]) % E
        return x_BSD + torch.stack([self.ffns[e](h[t]) for t, e in enumerate(ids.tolist())]).view_as(x_BSD)


class BiasedGate(nn.Module):
    """A gate wrapping a Linear that returns bare logits; the block adds a correction bias
    before its top-k, so logits alone do not give the picks."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, E, bias=False)

    def forward(self, h):
        return self.proj(h)


class BiasedBlock(Block):
    def __init__(self):
        super().__init__()
        self.switch = BiasedGate()
        self.e_score_correction_bias = nn.Parameter(torch.randn(E), requires_grad=False)

    def forward(self, x_BSD):
        h = self.norm(x_BSD).reshape(-1, D)
        ids = (torch.sigmoid(self.switch(h)) + self.e_score_correction_bias).topk(K, -1).indices
        out = torch.stack([sum(self.ffns[e](h[t]) for e in ids[t].tolist()) for t in range(h.shape[0])])
        return x_BSD + out.view_as(x_BSD)


def _toy_with(block_cls):
    model = ToyMoE()
    model.layers = nn.ModuleList(block_cls() for _ in range(2))
    return model.eval()


def test_expert_list_without_router_is_refused_naming_it():
    with pytest.raises(ValueError) as e:
        find_moe_layers(_toy_with(UnroutedBlock))
    msg = str(e.value)
    assert msg == f"layer 0: found an expert list ffns of {E} × Sequential but no [{E}, D] router weight beside it"


def test_model_without_moe_layer_is_refused_naming_what_it_holds():
    from moe_probe.hf.loading import load_model

    model, _, _ = load_model(str(FIX / "llama_dense.json"))
    with pytest.raises(ValueError) as e:
        find_moe_layers(model)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("LlamaForCausalLM (llama) has no MoE layer")
    assert "2 decoder layers at model.layers; layer 0 holds self_attn (LlamaAttention), mlp (LlamaMLP)" in msg


def test_bare_logits_beside_a_correction_bias_are_refused():
    """Softmax top-k of the logits would miscount here; the adapter says so instead."""
    with pytest.raises(ValueError, match=r"layer 0: router layers\.0\.switch returns bare logits but "
                                         r"a selection bias layers\.0\.e_score_correction_bias \[6\]"):
        find_moe_layers(_toy_with(BiasedBlock))
