"""Transformer block: attention (+ optional MoT gen tower) and the MoE FFN.

Legend: B batch, S sequence, D model dim, T valid tokens (flattened B·S positions minus padding),
H heads.

Attention mask (Transfusion style): causal over the sequence, but bidirectional inside each image
block (contiguous vit or vae tokens of one image), so every patch sees the whole image — needed
for flow matching, where all patches are denoised together.

MoT (``gen_*`` modules present): vae tokens use the gen tower's norms and q/k/v/o projections,
everything else the und tower's; attention itself is ONE global softmax over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_probe.model.moe import MoE


def attention_mask(modality_BS: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) bool, True = may attend: causal, plus both ways inside one image block."""
    B, S = modality_BS.shape
    is_img = modality_BS != 0
    starts = is_img & ~F.pad(is_img, (1, 0), value=False)[:, :-1]
    block_BS = torch.where(is_img, torch.cumsum(starts.long(), 1), torch.full_like(modality_BS, -1))
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=modality_BS.device).tril()
    same_BSS = (block_BS.unsqueeze(2) == block_BS.unsqueeze(1)) & (block_BS.unsqueeze(2) >= 0)
    return (causal_SS.unsqueeze(0) | same_BSS).unsqueeze(1)


class Attention(nn.Module):
    """Projections only; the block runs one global SDPA (shared by both MoT towers)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.wq = nn.Linear(d_model, d_model, bias=False)
        self.wk = nn.Linear(d_model, d_model, bias=False)
        self.wv = nn.Linear(d_model, d_model, bias=False)
        self.wo = nn.Linear(d_model, d_model, bias=False)

    def qkv(self, x_ND):
        return torch.cat([self.wq(x_ND), self.wk(x_ND), self.wv(x_ND)], -1)


@dataclass
class Context:
    """Per-forward index sets, computed once for all layers."""

    mask_B1SS: torch.Tensor
    valid_idx: torch.Tensor       # flattened positions of non-pad tokens (T,)
    modality_T: torch.Tensor      # their modalities
    gen_pos: torch.Tensor | None  # MoT: flattened positions of vae tokens
    und_pos: torch.Tensor | None  # MoT: all other positions (pads included, they are harmless)
    gen_T: torch.Tensor | None    # MoT: indices into the valid tokens that are vae
    und_T: torch.Tensor | None
    mask_routed: bool = False


def _per_tower(x_ND, f_und, f_gen, und_idx, gen_idx, out_dim):
    """Apply f_und to rows und_idx and f_gen to rows gen_idx (MoT); just f_und otherwise."""
    if f_gen is None:
        return f_und(x_ND)
    a, b = f_und(x_ND[und_idx]), f_gen(x_ND[gen_idx])
    y = a.new_zeros(x_ND.shape[0], out_dim)
    return y.index_copy(0, und_idx, a).index_copy(0, gen_idx, b.to(a.dtype))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: MoE, mot: bool):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.attn = Attention(d_model)
        self.ffn_norm = nn.RMSNorm(d_model, eps=1e-6)
        self.ffn = ffn
        self.mot = mot
        if mot:
            self.gen_attn_norm = nn.RMSNorm(d_model, eps=1e-6)
            self.gen_attn = Attention(d_model)
            self.gen_ffn_norm = nn.RMSNorm(d_model, eps=1e-6)

    def forward(self, x_BSD: torch.Tensor, ctx: Context):
        B, S, D = x_BSD.shape
        H = self.n_heads
        x_ND = x_BSD.reshape(B * S, D)
        g = self.mot
        qkv = _per_tower(
            x_ND, lambda x: self.attn.qkv(self.attn_norm(x)),
            (lambda x: self.gen_attn.qkv(self.gen_attn_norm(x))) if g else None,
            ctx.und_pos, ctx.gen_pos, 3 * D)
        q, k, v = qkv.view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask_B1SS)
        o_ND = o.transpose(1, 2).reshape(B * S, D)
        x_ND = x_ND + _per_tower(o_ND, self.attn.wo, self.gen_attn.wo if g else None,
                                 ctx.und_pos, ctx.gen_pos, D).to(x_ND.dtype)
        # FFN on non-pad tokens only: pads never enter routing, capacity, records or losses.
        h_TD = x_ND[ctx.valid_idx]
        h_TD = _per_tower(h_TD, self.ffn_norm, self.gen_ffn_norm if g else None, ctx.und_T, ctx.gen_T, D)
        y_TD, aux_T, z_T = self.ffn(h_TD, ctx.modality_T, mask_routed=ctx.mask_routed)
        x_ND = x_ND.index_add(0, ctx.valid_idx, y_TD.to(x_ND.dtype))
        return x_ND.view(B, S, D), aux_T, z_T
