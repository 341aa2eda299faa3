"""Gradient conflict of an HF MoE model between two text sets (``--text`` vs ``--text-b``).

Two plain LM losses on the same parameters, gradients by ``torch.autograd.grad`` (no ``.grad``
left on the model, no optimizer). Per MoE layer and component, the store's ``grad`` arrays:
``cosine`` = cos(∇L_text, ∇L_text_b) over the flattened gradients of the component (NaN where
either is zero), ``norm_und`` = ‖∇L_text‖, ``norm_gen`` = ‖∇L_text_b‖ (the store's names: *und*
is the first text set, *gen* the second). Layer ``all`` is the whole model (embeddings, heads,
dense layers included). Components: ``attn`` (self-attention), ``router``, ``shared`` (shared
experts and their gate), ``experts`` (routed), ``norm`` (the layer's norms); ``und_experts`` /
``gen_experts`` stay NaN (an HF model has no expert groups).

Per-expert detail: the routed experts' fused 3-D parameters are sliced along their first dim
(E), giving (layer, expert) cosines and norms — ``expert_rows``.

Legend: L MoE layers, C components, E experts.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_probe.hf.capture import lm_loss
from moe_probe.hf.discover import MoeLayer, decoder_layers
from moe_probe.modalities import GRAD_COMPONENTS


def param_components(model: torch.nn.Module, layers: list[MoeLayer]) -> dict[str, tuple[int, str]]:
    """Parameter name -> (MoE layer row, component); parameters outside MoE layers -> (-1, "io")."""
    path, _ = decoder_layers(model)
    out: dict[str, tuple[int, str]] = {}
    for name, _p in model.named_parameters():
        out[name] = (-1, "io")
        for li, layer in enumerate(layers):
            pre = f"{path}.{layer.index}."
            if not name.startswith(pre):
                continue
            if name.startswith(layer.router + "."):
                comp = "router"
            elif name.startswith(layer.experts + "."):
                comp = "experts"
            elif any(name.startswith(s + ".") for s in (*layer.shared, layer.shared_gate or "\0")):
                comp = "shared"
            elif "norm" in name[len(pre):].split(".")[0]:
                comp = "norm"
            elif "attn" in name or "attention" in name:
                comp = "attn"
            else:
                comp = "norm"  # anything else a layer owns (rare: biases, scalars) — small, kept visible
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
            c = GRAD_COMPONENTS.index("norm" if comp == "io" else comp)
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
