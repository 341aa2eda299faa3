"""MultimodalMoE: a decoder over mixed text / ViT / VAE sequences with an MoE FFN per layer.

Legend: B batch, S sequence, D model dim, V vocab, P patch dim, T valid (non-pad) tokens,
L layers, E experts.

Inputs: text ids -> token embedding; vit patches -> ``vit_in``; vae tokens: x_t =
(1−t)·x0 + t·noise -> ``vae_in`` + timestep embedding. Learned absolute positions, plus a learned
patch-position embedding on image tokens. Heads: LM head on text (und final norm); velocity head
on vae tokens (own final norm, part of ``gen_io``).
Losses (``forward``): lm / mmu cross-entropy means; gen = MSE of the velocity (noise − x0); aux =
Switch balance loss (per group, summed over groups, mean over layers); z = router z-loss (mean
over tokens, mean over layers). The regularisers are split by token (text+vit -> und, vae -> gen),
and ``total`` is defined as und + gen, so the two task losses sum to it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_probe.data.batch import LM_MMU, LM_TEXT, Batch
from moe_probe.model.block import Block, Context, attention_mask
from moe_probe.model.config import ModelConfig
from moe_probe.model.moe import MoE
from moe_probe.modalities import TEXT, VAE, VIT
from moe_probe.model.params import param_components, param_groups


@dataclass
class ModelOutput:
    losses: dict[str, torch.Tensor]
    """Scalars lm, mmu, gen, aux, z (unweighted) and total (weighted, = und + gen)."""
    task_losses: dict[str, torch.Tensor]
    """und (λ_ntp·(lm+mmu) + und share of the regularisers) and gen (λ_img·gen + gen share)."""
    lm_logits_BSV: torch.Tensor
    velocity_BSP: torch.Tensor
    """Velocity prediction (meaningful at vae positions only)."""


def timestep_features(t_B: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t_B.device) / half)
    ang = 1000.0 * t_B.float().unsqueeze(1) * freqs
    return torch.cat([ang.sin(), ang.cos()], -1)


def _ffn(cfg: ModelConfig, layer: int) -> MoE:
    E = cfg.n_experts
    common = dict(d_model=cfg.d_model, d_expert=cfg.d_expert, top_k=cfg.top_k, n_shared=cfg.n_shared,
                  capacity_factor=cfg.capacity_factor, renorm_topk=cfg.renorm_topk,
                  bias_balance=cfg.bias_balance)
    split = {"text": "und", "vit": "und", "vae": "gen"}
    if cfg.arch == "moe":
        return MoE(groups={"all": tuple(range(E))},
                   modality_group={m: "all" for m in split}, **common)
    if cfg.arch == "symbiotic":
        und, gen = cfg.layer_groups()[layer]
        return MoE(groups={"und": und, "gen": gen}, modality_group=split, **common)
    return MoE(groups={"und": tuple(range(E)), "gen": tuple(range(E, 2 * E))},
               modality_group=split, shared_per_group=True, **common)


class MultimodalMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        D = cfg.d_model
        self.tok_emb = nn.Embedding(vocab_size, D)
        self.pos_emb = nn.Parameter(torch.empty(cfg.max_seq_len, D))
        self.patch_pos_emb = nn.Parameter(torch.empty(cfg.n_image_tokens, D))
        self.vit_in = nn.Linear(cfg.patch_dim, D)
        self.vae_in = nn.Linear(cfg.patch_dim, D)
        self.t_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.layers = nn.ModuleList(
            Block(D, cfg.n_heads, _ffn(cfg, i), cfg.arch == "mot") for i in range(cfg.n_layers))
        self.norm_out = nn.RMSNorm(D, eps=1e-6)
        self.lm_head = nn.Linear(D, vocab_size, bias=False)
        self.vae_norm_out = nn.RMSNorm(D, eps=1e-6)
        self.vae_out = nn.Linear(D, cfg.patch_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "norm_out" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("wo.weight", "w2_EDF", "w2_DF")):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, std, generator=generator)

    # ---- forward -------------------------------------------------------------------------------
    def _context(self, modality_BS, valid_BS, mask_routed):
        valid_idx = valid_BS.flatten().nonzero().flatten()
        mod_flat = modality_BS.flatten()
        modality_T = mod_flat[valid_idx]
        gen_pos = und_pos = gen_T = und_T = None
        if self.cfg.arch == "mot":
            is_gen = mod_flat == VAE
            gen_pos, und_pos = is_gen.nonzero().flatten(), (~is_gen).nonzero().flatten()
            gen_T, und_T = (modality_T == VAE).nonzero().flatten(), (modality_T != VAE).nonzero().flatten()
        return Context(attention_mask(modality_BS), valid_idx, modality_T, gen_pos, und_pos,
                       gen_T, und_T, mask_routed)

    def _hidden(self, tokens_BS, modality_BS, valid_BS, vit_BSP, vae_x_BSP, t_B, *, mask_routed=False):
        """Final hidden states plus per-layer token shares of aux and z (lists of (T,))."""
        B, S = tokens_BS.shape
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len {self.cfg.max_seq_len}")
        mod = modality_BS.unsqueeze(-1)
        temb_BD = self.t_embed(timestep_features(t_B, self.cfg.d_model))
        x = torch.where(mod == TEXT, self.tok_emb(tokens_BS),
                        torch.where(mod == VIT, self.vit_in(vit_BSP),
                                    self.vae_in(vae_x_BSP) + temb_BD.unsqueeze(1)))
        is_img = modality_BS != TEXT
        patch_idx = (torch.cumsum(is_img.long(), 1) - 1).clamp(min=0) % self.cfg.n_image_tokens
        x = x + self.pos_emb[:S] + is_img.unsqueeze(-1) * self.patch_pos_emb[patch_idx]
        ctx = self._context(modality_BS, valid_BS, mask_routed)
        aux, z = [], []
        for layer in self.layers:
            x, aux_T, z_T = layer(x, ctx)
            aux.append(aux_T)
            z.append(z_T)
        return x, aux, z, ctx

    def forward(self, batch: Batch, *, mask_routed: bool = False) -> ModelOutput:
        cfg = self.cfg
        b = batch
        t = b.flow_t_B.view(-1, 1, 1)
        x0, x1 = b.patches_BSP, b.noise_BSP
        vae_x = (1 - t) * x0 + t * x1
        valid = b.valid_BS if b.valid_BS is not None else b.tokens_BS != 0
        h, aux, z, ctx = self._hidden(b.tokens_BS, b.modality_BS, valid, b.patches_BSP, vae_x,
                                      b.flow_t_B, mask_routed=mask_routed)
        logits = self.lm_head(self.norm_out(h))
        vel = self.vae_out(self.vae_norm_out(h))
        zero = logits.new_zeros(())
        losses = {}
        for name, kind in (("lm", LM_TEXT), ("mmu", LM_MMU)):
            sel = b.lm_kind_BS == kind
            losses[name] = F.cross_entropy(logits[sel].float(), b.lm_targets_BS[sel]) if sel.any() else zero
        is_vae = b.modality_BS == VAE
        losses["gen"] = (F.mse_loss(vel[is_vae].float(), (x1 - x0)[is_vae].float())
                         if is_vae.any() else zero)
        gen_T = ctx.modality_T == VAE
        L = len(aux)
        aux_all, z_all = torch.stack(aux), torch.stack(z)  # (L, T)
        aux_gen = aux_all[:, gen_T].sum() / L
        aux_und = aux_all[:, ~gen_T].sum() / L
        z_gen = z_all[:, gen_T].sum() / L
        z_und = z_all[:, ~gen_T].sum() / L
        losses["aux"] = aux_und + aux_gen
        losses["z"] = z_und + z_gen
        und = cfg.ntp_weight * (losses["lm"] + losses["mmu"]) + cfg.aux_weight * aux_und + cfg.z_weight * z_und
        gen = cfg.img_weight * losses["gen"] + cfg.aux_weight * aux_gen + cfg.z_weight * z_gen
        losses["total"] = und + gen
        return ModelOutput(losses=losses, task_losses={"und": und, "gen": gen},
                           lm_logits_BSV=logits, velocity_BSP=vel)

    # ---- hook points, parameter tags, training controls ----------------------------------------
    def moe_layers(self) -> list[tuple[str, MoE]]:
        return [(str(i), layer.ffn) for i, layer in enumerate(self.layers)]

    def param_components(self) -> dict[str, tuple[str, str]]:
        return param_components(self)

    def param_groups(self) -> dict[str, list[str]]:
        return param_groups(self)

    def set_shield(self, scale: float) -> None:
        """Scale of the gradient from vae tokens into shared-expert weights (0 shielded, 1 off).
        MoT has no expert shared by both tasks (each tower has its own), so it has no effect there."""
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"shield scale must be in [0, 1], got {scale}")
        for _, ffn in self.moe_layers():
            ffn.shield_scale = float(scale)

    def update_balance_bias(self, counts=None) -> None:
        """DeepSeek-V3 bias step; call after the optimizer step. ``counts``: per-layer expert
        loads (L, E) (layer-global ids); None = the loads of the training forwards since the last
        call (accumulated by the model itself). No-op unless ``cfg.bias_balance``."""
        if not self.cfg.bias_balance:
            return
        for i, (_, ffn) in enumerate(self.moe_layers()):
            c = None if counts is None else torch.as_tensor(counts[i])
            ffn.update_balance_bias(self.cfg.bias_gamma, c)

    # ---- evaluation helpers ----------------------------------------------------------------------
    def sample_images(self, labels_B, tokenizer, n_steps: int = 20, *, generator=None):
        from moe_probe.model.generate import sample_images
        return sample_images(self, labels_B, tokenizer, n_steps, generator=generator)

    def classify_images(self, images_BHW, tokenizer):
        from moe_probe.model.generate import classify_images
        return classify_images(self, images_BHW, tokenizer)
