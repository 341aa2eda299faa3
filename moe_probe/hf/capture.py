"""Read router decisions (and, on demand, shared-expert outputs) of an HF model through nnsight.

One ``NNsight`` wrapper per model; every call opens one ``trace`` and saves only what is asked,
so nothing stays attached between calls (nnsight removes its interventions when the trace
exits). Modules are accessed in forward order inside a trace (nnsight 0.8 requires it), which
is why shared-expert outputs — called *before* the router in Qwen2-MoE — get their own trace.

Legend: B batch, S sequence, T tokens (= B·S, the order routers flatten them in), E experts,
K top-k, D model dim, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nnsight import NNsight

from moe_probe.hf.discover import MoeLayer
from moe_probe.model.hooks import RouterRecord


def _envoy(root, path: str):
    env = root
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def picks_from_logits(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback selection for a router that returns bare logits: softmax, top-k, renormalised."""
    probs = torch.softmax(logits_TE.float(), dim=-1)
    w, ids = probs.topk(k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


@dataclass
class Capture:
    records: list[RouterRecord]
    """One per MoE layer, in ``layers`` order."""
    logits_BSV: torch.Tensor | None
    """LM logits of the same forward (only with ``want_logits``)."""


_SLOTS = ("forward", "__nnsight__")
"""Instance attributes nnsight 0.8 installs on every wrapped module (its inert-outside-a-trace
``Controller`` forward and its state). ``detach`` takes them off again."""


class RouterCapture:
    """``capture(input_ids_BS, modality_T)`` -> routing records of every MoE layer, one forward.

    Use as a context manager (or call ``detach``): nnsight leaves a controller ``forward`` on
    every module it wraps, and the model must come back exactly as it was handed in.
    """

    def __init__(self, model: torch.nn.Module, layers: list[MoeLayer]):
        self.model = model
        self.layers = layers
        self._before = {m: {k: m.__dict__[k] for k in _SLOTS if k in m.__dict__} for m in model.modules()}
        self.traced = NNsight(model)
        self._installed = {m: {k: m.__dict__[k] for k in _SLOTS if k in m.__dict__}
                           for m in model.modules()}
        self.attached = True

    def detach(self) -> None:
        """Restore every module's own attributes (the model runs exactly as before wrapping)."""
        for m, mine in self._installed.items():
            for k in mine:
                m.__dict__.pop(k, None)
            m.__dict__.update(self._before[m])
        self.attached = False

    def attach(self) -> None:
        """Re-install the controllers ``detach`` took off (cheap: no re-wrapping)."""
        for m, mine in self._installed.items():
            m.__dict__.update(mine)
        self.attached = True

    def __enter__(self) -> "RouterCapture":
        if not self.attached:
            self.attach()
        return self

    def __exit__(self, *exc) -> bool:
        self.detach()
        return False

    def capture(self, input_ids_BS: torch.Tensor, modality_T: torch.Tensor, *,
                want_logits: bool = False) -> Capture:
        saved = []
        logits = None
        with torch.no_grad(), self.traced.trace(input_ids=input_ids_BS):
            for layer in self.layers:
                saved.append(_envoy(self.traced, layer.router).output.save())
            if want_logits:
                logits = self.traced.output.logits.save()
        records = []
        for layer, out in zip(self.layers, saved):
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
            records.append(RouterRecord(
                logits_TE=logits_TE, topk_ids_TK=ids_TK.reshape(logits_TE.shape[0], -1).long(),
                topk_weights_TK=w_TK.reshape(logits_TE.shape[0], -1), kept_TK=None,
                modality_T=modality_T))
        return Capture(records, logits)

    def shared_outputs(self, input_ids_BS: torch.Tensor) -> list[torch.Tensor]:
        """Per MoE layer with shared experts: their summed output h_TD, before any shared gate."""
        saved = []
        with torch.no_grad(), self.traced.trace(input_ids=input_ids_BS):
            for layer in self.layers:
                for path in layer.shared:
                    saved.append((layer.name, _envoy(self.traced, path).output.save()))
        by_layer: dict[str, torch.Tensor] = {}
        for name, h in saved:
            h = h.reshape(-1, h.shape[-1]).float()
            by_layer[name] = by_layer[name] + h if name in by_layer else h
        return [by_layer[layer.name] for layer in self.layers if layer.name in by_layer]

    def logits(self, input_ids_BS: torch.Tensor, *, mask_routed: bool = False) -> torch.Tensor:
        """LM logits; ``mask_routed`` zeroes every routed-experts output (shared experts only)."""
        with torch.no_grad(), self.traced.trace(input_ids=input_ids_BS):
            if mask_routed:
                for layer in self.layers:
                    env = _envoy(self.traced, layer.experts)
                    env.output = torch.zeros_like(env.output)
            out = self.traced.output.logits.save()
        return out


def lm_loss(logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (the shift HF's ``labels=`` applies)."""
    V = logits_BSV.shape[-1]
    return torch.nn.functional.cross_entropy(logits_BSV[:, :-1].reshape(-1, V).float(),
                                             input_ids_BS[:, 1:].reshape(-1))
