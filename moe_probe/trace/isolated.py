"""Isolated eval (paper Fig. 6): understanding with every routed expert masked, shared experts only.

Run on the fixed probe batch with ``model(batch, mask_routed=True)``. Names follow the
trainer's eval metrics (``text_loss``, ``digit_acc``) so a reader can set the two side by side;
the sets differ (probe batch here, held-out splits there), so compare trends, not levels.

``digit_acc`` reads the MMU answer like ``classify_images`` does — argmax over the digit words —
with the digit-word ids taken from the probe batch's own answer targets (every class is in it).
"""

from __future__ import annotations

import math

import torch

from moe_probe.trace.capture import capture_forward

_LM_MMU = 2  # lm_kind of the MMU answer position (data/batch.py)


def digit_accuracy(logits_BSV: torch.Tensor, batch) -> float:
    """Share of MMU answers whose argmax over the batch's digit-word ids is the right digit."""
    kind = batch.lm_kind_BS.to(logits_BSV.device)
    b_N, s_N = (kind == _LM_MMU).nonzero(as_tuple=True)
    if len(b_N) == 0:
        return math.nan
    targets_N = batch.lm_targets_BS.to(logits_BSV.device)[b_N, s_N]
    labels_N = batch.labels_B.to(logits_BSV.device)[b_N]
    # digit class c -> its word id, read off the answers themselves
    word_of_class = torch.full((int(labels_N.max()) + 1,), -1, dtype=torch.long, device=logits_BSV.device)
    word_of_class[labels_N] = targets_N
    present = (word_of_class >= 0).nonzero().flatten()
    scores = logits_BSV[b_N, s_N][:, word_of_class[present]]
    pred_N = present[scores.argmax(-1)]
    return float((pred_N == labels_N).double().mean())


def isolated_metrics(model, batch) -> dict[str, float]:
    """text_loss, mmu_loss, digit_acc of the shared-experts-only model on ``batch``."""
    out = capture_forward(model, batch, router=False, shared=False, mask_routed=True).output
    return {
        "text_loss": float(out.losses["lm"]),
        "mmu_loss": float(out.losses["mmu"]),
        "digit_acc": digit_accuracy(out.lm_logits_BSV, batch),
    }
