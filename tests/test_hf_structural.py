"""Structural discovery on an architecture no table knows: a ModuleList of expert MLPs and a
``nn.Linear`` gate that returns bare logits (the pre-transformers-5 layout, and many custom-code
models). The model records its own picks; the adapter must recount them from the gate logits."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from moe_probe.hf.capture import RouterCapture  # noqa: E402
from moe_probe.hf.discover import find_moe_layers  # noqa: E402

D, E, K, V = 16, 6, 2, 64


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
