"""Evaluation helpers: text-to-image sampling (Euler on the flow) and MMU classification.

Legend: B batch, S sequence, N image tokens, P patch dim, H=W image side.
Both build their sequences with the data's :class:`~moe_probe.data.batch.Layout`, so the model
sees exactly the training layout ("draw a <d>" + vae block; vit block + "this digit is").
"""

from __future__ import annotations

import math

import torch

from moe_probe.data.batch import Layout, patches_to_images


def _layout(model, tokenizer) -> Layout:
    cfg = model.cfg
    p = math.isqrt(cfg.patch_dim)
    side = math.isqrt(cfg.n_image_tokens) * p
    return Layout(tokenizer, cfg.max_seq_len, p, side)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def sample_images(model, labels_B, tokenizer, n_steps: int = 20, *, generator=None) -> torch.Tensor:
    """Images (B, H, W) for digit classes ``labels_B``: start from noise at t=1 and integrate
    dx/dt = v (v = noise − x0) with ``n_steps`` Euler steps down to t=0."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    labels_B = torch.as_tensor(labels_B, dtype=torch.long).cpu()
    lay = _layout(model, tokenizer)
    B, dev = len(labels_B), _device(model)
    x_BNP = torch.randn(B, lay.n_img, lay.P, generator=generator)
    b = lay.empty(B)
    lay.fill_t2i(b, torch.arange(B), None, labels_B, x_BNP, torch.ones(B))
    b = b.to(dev)
    x_BNP = x_BNP.to(dev)
    was_training = model.training
    model.eval()
    try:
        ts = torch.linspace(1.0, 0.0, n_steps + 1)
        for i in range(n_steps):
            vae_x = torch.zeros_like(b.noise_BSP)
            vae_x[:, lay.t2i_img] = x_BNP
            h, *_ = model._hidden(b.tokens_BS, b.modality_BS, b.valid_BS, b.patches_BSP, vae_x,
                                  torch.full((B,), float(ts[i]), device=dev))
            v_BNP = model.vae_out(model.vae_norm_out(h))[:, lay.t2i_img]
            x_BNP = x_BNP + float(ts[i + 1] - ts[i]) * v_BNP
    finally:
        model.train(was_training)
    return patches_to_images(x_BNP.cpu(), lay.p, lay.image_size)


@torch.no_grad()
def classify_images(model, images_BHW, tokenizer, *, mask_routed: bool = False) -> torch.Tensor:
    """Digit class per image: vit tokens + "this digit is", argmax of the next-token logits over
    the ten digit words."""
    lay = _layout(model, tokenizer)
    images_BHW = torch.as_tensor(images_BHW, dtype=torch.float32).cpu()
    B, dev = images_BHW.shape[0], _device(model)
    b = lay.empty(B)
    lay.fill_mmu(b, torch.arange(B), images_BHW, torch.zeros(B, dtype=torch.long), with_answer=False)
    b = b.to(dev)
    was_training = model.training
    model.eval()
    try:
        h, *_ = model._hidden(b.tokens_BS, b.modality_BS, b.valid_BS, b.patches_BSP,
                              torch.zeros_like(b.patches_BSP), torch.zeros(B, device=dev),
                              mask_routed=mask_routed)
        logits_BV = model.lm_head(model.norm_out(h[:, lay.mmu_answer_pos - 1]))
    finally:
        model.train(was_training)
    return logits_BV[:, tokenizer.digit_ids].argmax(-1).cpu()
