"""Read router decisions (and, on demand, shared-expert outputs) of an HF model with forward hooks.

Every call runs one plain forward with hooks (``moe_probe.model.hooks.hooks``) on the discovered
module paths, removed when the forward returns (also when it raises): the model is never wrapped
and nothing stays attached between calls.

Legend: B batch, S sequence, T tokens (= B·S, the order routers flatten them in), E experts,
K top-k, D model dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_probe.hf.discover import MoeLayer
from moe_probe.model.hooks import HookFn, LayerRouting, RouterRecord, hooks


def picks_from_logits(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback selection for a router that returns bare logits: softmax, top-k, renormalised."""
    probs = torch.softmax(logits_TE.float(), dim=-1)
    w, ids = probs.topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


def layer_routing(layer: MoeLayer) -> LayerRouting:
    """HF MoE layers are ungrouped and dropless: one group of all experts, no capacity."""
    return LayerRouting(n_experts=layer.n_experts, top_k=layer.top_k, capacity_factor=None,
                        groups={"all": tuple(range(layer.n_experts))}, n_shared=layer.n_shared)


def router_record(layer: MoeLayer, out, modality_T: torch.Tensor) -> RouterRecord:
    """The :class:`RouterRecord` of one router call from the router module's output (the forms of
    ``MoeLayer.output``); tensors are the model's own (not detached: the counter detaches)."""
    if layer.output == "ids":
        logits_TE, w_TK, ids_TK = out[0], out[1], out[2]
    elif layer.output == "scores_logits":  # Llama 4: picks = top-k logits, sigmoid weights
        logits_TE = out[1]
        top, ids_TK = logits_TE.float().topk(layer.top_k, dim=-1)
        w_TK = torch.sigmoid(top)
    else:
        logits_TE = out
        w_TK, ids_TK = picks_from_logits(logits_TE, layer.top_k)
    logits_TE = logits_TE.reshape(-1, logits_TE.shape[-1])
    T = logits_TE.shape[0]
    return RouterRecord(logits_TE=logits_TE, topk_ids_TK=ids_TK.reshape(T, -1).long(),
                        topk_weights_TK=w_TK.reshape(T, -1), kept_TK=None, modality_T=modality_T)


@dataclass
class Capture:
    records: list[RouterRecord]
    """One per MoE layer, in ``layers`` order."""
    logits_BSV: torch.Tensor | None
    """LM logits of the same forward (only with ``want_logits``)."""


class RouterCapture:
    """``capture(input_ids_BS, modality_T)`` -> routing records of every MoE layer, one forward."""

    def __init__(self, model: torch.nn.Module, layers: list[MoeLayer]):
        self.model = model
        self.layers = layers

    def _forward(self, input_ids_BS: torch.Tensor, fns: dict[str, HookFn]):
        with torch.no_grad(), hooks(self.model, fns):
            return self.model(input_ids=input_ids_BS)

    def capture(self, input_ids_BS: torch.Tensor, modality_T: torch.Tensor, *,
                want_logits: bool = False) -> Capture:
        saved: list = [None] * len(self.layers)
        model_out = self._forward(input_ids_BS, {layer.router: lambda o, li=li: saved.__setitem__(li, o)
                                                 for li, layer in enumerate(self.layers)})
        records = [router_record(layer, out, modality_T) for layer, out in zip(self.layers, saved)]
        return Capture(records, model_out.logits if want_logits else None)

    def shared_outputs(self, input_ids_BS: torch.Tensor) -> list[torch.Tensor]:
        """Per MoE layer with shared experts: their summed output h_TD, before any shared gate."""
        saved: list[tuple[str, torch.Tensor]] = []
        self._forward(input_ids_BS, {path: lambda h, n=layer.name: saved.append((n, h))
                                     for layer in self.layers for path in layer.shared})
        by_layer: dict[str, torch.Tensor] = {}
        for name, h in saved:
            h = h.reshape(-1, h.shape[-1]).float()
            by_layer[name] = by_layer[name] + h if name in by_layer else h
        return [by_layer[layer.name] for layer in self.layers if layer.name in by_layer]

    def logits(self, input_ids_BS: torch.Tensor, *, mask_routed: bool = False) -> torch.Tensor:
        """LM logits; ``mask_routed`` zeroes every routed-experts output (shared experts only)."""
        zero = {layer.experts: torch.zeros_like for layer in self.layers} if mask_routed else {}
        return self._forward(input_ids_BS, zero).logits


def lm_loss(logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (the shift HF's ``labels=`` applies)."""
    V = logits_BSV.shape[-1]
    return torch.nn.functional.cross_entropy(logits_BSV[:, :-1].reshape(-1, V).float(),
                                             input_ids_BS[:, 1:].reshape(-1))
