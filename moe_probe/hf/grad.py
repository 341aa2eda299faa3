"""Gradient conflict of an HF MoE model between two text sets (``--text`` vs ``--text-b``).

Two plain LM losses on the same parameters, gradients by ``torch.autograd.grad`` (no ``.grad``
left on the model, no optimizer). Per MoE layer and component, the store's ``grad`` arrays:
``cosine`` = cos(∇L_text, ∇L_text_b) over the flattened gradients of the component (NaN where
either is zero), ``norm_und`` = ‖∇L_text‖, ``norm_gen`` = ‖∇L_text_b‖ (the store's names: *und*
is the first text set, *gen* the second). Components: ``attn`` (self-attention), ``router``,
``shared`` (shared experts and Qwen2-MoE's shared gate), ``experts`` (routed), ``norm`` (the
layer's norms, plus anything else it owns); ``und_experts`` / ``gen_experts`` stay NaN (an HF
model has no expert groups). Layer ``all``, per component, sums every decoder layer — dense
ones (DeepSeek-V3's first layers) included, their MLP in ``norm`` — and puts embeddings, final
norm and LM head in ``norm`` (the contract's ``io``).

Per-expert detail: the routed experts' fused parameters (first dim E; gpt-oss's expert biases
too) are sliced per expert, giving (layer, expert) cosines and norms, the second return value.

Legend: L MoE layers, C components, E experts.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_probe.hf.capture import lm_loss
from moe_probe.hf.discover import MoeLayer, decoder_layers
from moe_probe.modalities import GRAD_COMPONENTS


def _generic_component(local: str) -> str:
    """Component of a decoder-layer parameter by name (``local`` = name inside the layer)."""
    head = local.split(".")[0]
    if "norm" in head:
        return "norm"
    if "attn" in head or "attention" in head:
        return "attn"
    return "norm"  # anything else (a dense layer's MLP, stray scalars): the catch-all column


def param_components(model: torch.nn.Module, layers: list[MoeLayer]) -> dict[str, tuple[int, str]]:
    """Parameter name -> (MoE layer row or -1, component). Row -1 counts only toward layer
    ``all``: embeddings/head/final norm ("norm", the contract's ``io``), and dense decoder
    layers (DeepSeek-V3's first ones) by their own components."""
    path, _ = decoder_layers(model)
    row_of = {layer.index: li for li, layer in enumerate(layers)}
    out: dict[str, tuple[int, str]] = {}
    for name, _p in model.named_parameters():
        if not name.startswith(path + "."):
            out[name] = (-1, "norm")
            continue
        idx_s, _, local = name[len(path) + 1:].partition(".")
        li = row_of.get(int(idx_s), -1) if idx_s.isdigit() else -1
        comp = _generic_component(local)
        if li >= 0:
            layer = layers[li]
            if name.startswith(layer.router + "."):
                comp = "router"
            elif name.startswith(layer.experts + "."):
                comp = "experts"
            elif any(name.startswith(s + ".") for s in (*layer.shared, layer.shared_gate or "\0")):
                comp = "shared"
        out[name] = (li, comp)
    return out


class GradConflict:
    """``measure(ids_a, ids_b)`` -> (grad row for the store, per-expert rows)."""

    def __init__(self, model: torch.nn.Module, layers: list[MoeLayer]):
        self.model = model
        self.layers = layers
        comps = param_components(model, layers)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [dict(model.named_parameters())[n] for n in self.names]
        self.where = [comps[n] for n in self.names]
        self.experts_E = [int(layer.n_experts) for layer in layers]

    def _grads(self, ids_BS: torch.Tensor) -> list[torch.Tensor]:
        loss = lm_loss(self.model(input_ids=ids_BS).logits, ids_BS)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)]

    def measure(self, ids_a: torch.Tensor, ids_b: torch.Tensor) -> tuple[dict, dict]:
        ga, gb = self._grads(ids_a), self._grads(ids_b)
        L, C = len(self.layers), len(GRAD_COMPONENTS)
        E = max(self.experts_E)
        # Sums of a·b, a², b² add over parameters: cells per (layer, component), and layer "all"
        # (row L) per component over every layer, embeddings/heads/dense layers counted in "norm"
        # there, as the model tracer does.
        s = np.zeros((L + 1, C, 3))
        present = np.zeros((L + 1, C), dtype=bool)
        se = np.zeros((L, E, 3))
        for (li, comp), a, b in zip(self.where, ga, gb):
            a64, b64 = a.detach().double(), b.detach().double()
            trip = np.array([(a64 * b64).sum().item(), a64.square().sum().item(),
                             b64.square().sum().item()])
            c = GRAD_COMPONENTS.index(comp)
            if li >= 0:
                s[li, c] += trip
                present[li, c] = True
            s[L, c] += trip
            present[L, c] = True
            # Fused expert params (and gpt-oss's per-expert biases) have E as their first dim.
            if li >= 0 and comp == "experts" and a.ndim >= 2 and a.shape[0] == self.experts_E[li]:
                dims = tuple(range(1, a.ndim))
                se[li, : a.shape[0]] += torch.stack([(a64 * b64).sum(dims), a64.square().sum(dims),
                                                     b64.square().sum(dims)], -1).numpy()
        cos, na, nb = _ratios(s)
        for arr in (cos, na, nb):
            arr[~present] = np.nan  # a component the layer lacks is NaN, not 0
        ecos, ena, enb = _ratios(se)
        return ({"cosine": cos, "norm_und": na, "norm_gen": nb},
                {"cosine": ecos, "norm_und": ena, "norm_gen": enb})


def _ratios(s: np.ndarray):
    dot, sa, sb = s[..., 0], s[..., 1], s[..., 2]
    na, nb = np.sqrt(sa), np.sqrt(sb)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), np.clip(dot / (na * nb), -1.0, 1.0), np.nan)
    return cos, na, nb
