"""One no-grad forward on a fixed batch with the hook points' values kept (snapshots, probes).

Hooks are added for this forward only and removed in ``finally``; the model's train/eval mode
is restored, so a snapshot taken between training steps changes nothing in training.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from moe_probe.model.hooks import hooks, layer_hooks


@dataclass
class Captured:
    """What one forward exposed at the hook points, per layer (in ``model.moe_layers()`` order)."""

    output: object = None
    """The model's forward output (``ModelOutput``)."""
    topk_ids: list[torch.Tensor | None] = field(default_factory=list)
    """Top-k ids (T, K) of each layer's last router call."""
    topk_gates: list[torch.Tensor | None] = field(default_factory=list)
    """Gate weights (T, K) of those picks."""
    shared: list[torch.Tensor | None] = field(default_factory=list)
    """Shared-expert output (T, D) of each layer; None where the layer has no shared experts."""


def capture_forward(model, batch, *, router: bool = True, shared: bool = True,
                    mask_routed: bool = False) -> Captured:
    """Run ``model(batch, mask_routed=...)`` under no_grad and return the captured values."""
    n = len(model.moe_layers())
    cap = Captured(topk_ids=[None] * n, topk_gates=[None] * n, shared=[None] * n)

    def on_router(li, record):
        cap.topk_ids[li] = record.topk_ids_TK.detach()
        cap.topk_gates[li] = record.topk_weights_TK.detach()

    def on_shared(li, h_TD):
        cap.shared[li] = h_TD.detach()

    fns = {**(layer_hooks(model, "hook_router", on_router) if router else {}),
           **(layer_hooks(model, "hook_shared", on_shared) if shared else {})}
    was_training = model.training
    with ExitStack() as stack:
        stack.enter_context(hooks(model, fns))
        stack.callback(model.train, was_training)
        model.eval()
        with torch.no_grad():
            cap.output = model(batch, mask_routed=mask_routed)
    return cap


def token_rows(batch, n_rows: int) -> torch.Tensor:
    """(n_rows, 2) batch/sequence position of each captured row.

    The model may hand hooks either every position (T = B·S) or only the valid ones (pads kept
    out of routing): both layouts flatten row-major, so the valid mask maps rows back.
    """
    B, S = batch.tokens_BS.shape
    if n_rows == B * S:
        b = torch.arange(B).repeat_interleave(S)
        s = torch.arange(S).repeat(B)
        return torch.stack([b, s], 1)
    valid = batch.valid_BS.cpu()
    if n_rows == int(valid.sum()):
        return valid.nonzero()
    raise ValueError(f"hook gave {n_rows} rows for a batch of {B}x{S} ({int(valid.sum())} valid)")
