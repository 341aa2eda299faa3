"""Mixture-of-Experts FFN: router, fused SwiGLU experts, expert groups, the MoE block.

Legend: T tokens (valid tokens of the batch, flattened), D model dim, F expert hidden, E experts
(of a group, or of the layer for ``*_TE`` record tensors), K top-k, N assignments (K·T, sorted).

One :class:`MoE` serves all three archs as a set of expert groups:
- ``moe``: one group ``all`` (every modality).
- ``symbiotic``: groups ``und`` (text+vit) and ``gen`` (vae) over the same experts; each group's
  router weight is the row slice W[ids] of the one router (zero extra parameters). It is stored
  per group so the optimizer can give und and gen router rows different learning rates.
- ``mot``: the two towers' FFNs; like symbiotic, plus per-group shared experts.
Routing: softmax over the group's logits (fp32), top-k inside the group (+ balance bias for the
selection only), gates = the picked probabilities (renormalised by default).
Capacity: cap_e = ceil(C · K·T_g / E_g) (``moe_probe.capacity``). Drop order: all first choices
before any second choice, then by token position in the flattened batch (GShard priority); a
dropped pick contributes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_probe.capacity import expert_capacity
from moe_probe.model.hooks import HookPoint, LayerRouting, RouterRecord
from moe_probe.modalities import MODALITIES, VAE


class Router(nn.Module):
    """Linear D -> E; returns the full logits. ``bias_E`` steers top-k selection only."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.register_buffer("bias_E", torch.zeros(n_experts))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # fp32 (autocast off) so softmax, top-k ties and logsumexp (z-loss) stay accurate.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight.float())


def swiglu(x_ND, w1_FD, w2_DF, w3_FD):
    return F.linear(F.silu(F.linear(x_ND, w1_FD)) * F.linear(x_ND, w3_FD), w2_DF)


class Experts(nn.Module):
    """E SwiGLU experts with fused weights; runs each expert on its contiguous slice of the
    assignments sorted by expert (no per-token loops)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        E, F_, D = n_experts, d_expert, d_model
        self.w1_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.w2_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.w3_EFD = nn.Parameter(torch.empty(E, F_, D))

    @property
    def n_experts(self) -> int:
        return self.w1_EFD.shape[0]

    def forward(self, x_TD, topk_ids_TK, gates_TK, capacity_factor: float | None):
        """Returns (y_TD, kept_TK or None, counts_E before drops)."""
        T, K = topk_ids_TK.shape
        E = self.n_experts
        ids_N = topk_ids_TK.t().reshape(-1)  # pick-rank major: first choices get capacity first
        counts_E = torch.bincount(ids_N, minlength=E)
        order_N = torch.argsort(ids_N, stable=True)
        kept_TK = None
        run_E = counts_E
        if capacity_factor is not None:
            cap = expert_capacity(capacity_factor, K * T, E)
            offsets_E = torch.cumsum(counts_E, 0) - counts_E
            pos_N = torch.arange(len(ids_N), device=ids_N.device) - offsets_E[ids_N[order_N]]
            keep_N = pos_N < cap
            kept_flat = torch.zeros_like(ids_N, dtype=torch.bool)
            kept_flat[order_N[keep_N]] = True
            kept_TK = kept_flat.view(K, T).t()
            order_N = order_N[keep_N]
            run_E = counts_E.clamp(max=cap)
        tok_N = order_N % T
        gate_N = gates_TK.t().reshape(-1)[order_N]
        x_ND = torch.index_select(x_TD, 0, tok_N)
        # unbind once: indexing w[e] per expert would make backward zero-fill a full (E, F, D)
        # gradient per expert (measured: ~25% of the layer's time).
        w1, w2, w3 = self.w1_EFD.unbind(0), self.w2_EDF.unbind(0), self.w3_EFD.unbind(0)
        # split (not slicing): its backward is one concat instead of a zero-filled (N, D) per expert.
        xs = torch.split(x_ND, run_E.tolist())
        outs = [swiglu(x_nD, w1[e], w2[e], w3[e]) for e, x_nD in enumerate(xs) if x_nD.shape[0]]
        y_TD = x_TD.new_zeros(x_TD.shape)
        if outs:
            out_ND = torch.cat(outs) * gate_N.unsqueeze(1)
            y_TD = y_TD.index_add(0, tok_N, out_ND.to(y_TD.dtype))  # autocast: matmuls in low precision
        return y_TD, kept_TK, counts_E


class SharedExperts(nn.Module):
    """``n`` always-on SwiGLU experts fused into one of width n·F (sum of n experts ≡ one wide
    SwiGLU). Tokens in ``shield_T`` reach the weights' gradient scaled by ``scale``."""

    def __init__(self, n_shared: int, d_model: int, d_expert: int):
        super().__init__()
        H = n_shared * d_expert
        self.w1_FD = nn.Parameter(torch.empty(H, d_model))
        self.w2_DF = nn.Parameter(torch.empty(d_model, H))
        self.w3_FD = nn.Parameter(torch.empty(H, d_model))

    def forward(self, x_TD, shield_T=None, scale: float = 1.0):
        w = (self.w1_FD, self.w2_DF, self.w3_FD)
        if shield_T is None or scale == 1.0 or not bool(shield_T.any()):
            return swiglu(x_TD, *w)
        # Same forward value (w.detach() + s·(w − w.detach()) == w); the weight gradient from
        # shielded tokens is s × the plain one, the gradient w.r.t. their inputs is unchanged.
        w_eff = tuple(p.detach() + scale * (p - p.detach()) for p in w)
        keep_idx = (~shield_T).nonzero().flatten()
        shield_idx = shield_T.nonzero().flatten()
        y_keep = swiglu(x_TD[keep_idx], *w)
        y_TD = y_keep.new_zeros(x_TD.shape)
        y_TD = y_TD.index_copy(0, keep_idx, y_keep)
        return y_TD.index_copy(0, shield_idx, swiglu(x_TD[shield_idx], *w_eff).to(y_TD.dtype))


class ExpertGroup(nn.Module):
    """Router + experts of one group (+ shared experts for a MoT tower); ``ids`` = layer ids."""

    def __init__(self, ids: tuple[int, ...], d_model: int, d_expert: int, n_shared_own: int):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.router = Router(d_model, len(ids))
        self.experts = Experts(len(ids), d_model, d_expert)
        self.shared = SharedExperts(n_shared_own, d_model, d_expert) if n_shared_own else None
        self.register_buffer("load_E", torch.zeros(len(ids)), persistent=False)


class MoE(nn.Module):
    """The MoE FFN of one layer (see module docstring). ``hook_router``/``hook_shared`` are the
    tracer hook points; ``routing_info()`` gives the static layout."""

    def __init__(self, *, d_model: int, d_expert: int, top_k: int, n_shared: int,
                 groups: dict[str, tuple[int, ...]], modality_group: dict[str, str],
                 shared_per_group: bool = False, capacity_factor: float | None = None,
                 renorm_topk: bool = True, bias_balance: bool = False):
        super().__init__()
        self.top_k, self.n_shared, self.capacity_factor = top_k, n_shared, capacity_factor
        self.renorm_topk, self.bias_balance = renorm_topk, bias_balance
        self.shared_per_group = shared_per_group
        self.groups = nn.ModuleDict({
            name: ExpertGroup(ids, d_model, d_expert, n_shared if shared_per_group else 0)
            for name, ids in groups.items()})
        self.shared = (SharedExperts(n_shared, d_model, d_expert)
                       if n_shared and not shared_per_group else None)
        self.n_experts = sum(len(ids) for ids in groups.values())
        assert sorted(i for ids in groups.values() for i in ids) == list(range(self.n_experts))
        self.modality_group = dict(modality_group)
        names = list(self.groups)
        self.register_buffer("group_of_modality", torch.tensor(
            [names.index(modality_group[m]) for m in MODALITIES]), persistent=False)
        self.shield_scale = 1.0
        self.hook_router = HookPoint()
        self.hook_shared = HookPoint()

    def routing_info(self) -> LayerRouting:
        return LayerRouting(
            n_experts=self.n_experts, top_k=self.top_k, capacity_factor=self.capacity_factor,
            groups={n: tuple(g.ids.tolist()) for n, g in self.groups.items()},
            modality_group=dict(self.modality_group), n_shared=self.n_shared)

    def forward(self, x_TD: torch.Tensor, modality_T: torch.Tensor, *, mask_routed: bool = False):
        """Returns (y_TD, aux_T, z_T): output and each token's share of the layer's balance loss
        (Σ over a group = E_g·Σ_i f_i·P_i) and z-loss (Σ = mean over tokens of lse²)."""
        T, D = x_TD.shape
        K, E = self.top_k, self.n_experts
        dev = x_TD.device
        logits_TE = torch.full((T, E), float("-inf"), device=dev)
        topk_ids_TK = torch.zeros(T, K, dtype=torch.long, device=dev)
        gates_rec_TK = torch.zeros(T, K, device=dev)
        kept_TK = torch.ones(T, K, dtype=torch.bool, device=dev)
        aux_T = x_TD.new_zeros(T, dtype=torch.float32)
        z_T = x_TD.new_zeros(T, dtype=torch.float32)
        y_TD = x_TD.new_zeros(T, D)
        shared_TD = x_TD.new_zeros(T, D) if self.shared_per_group and self.n_shared else None
        group_T = self.group_of_modality[modality_T]
        single = len(self.groups) == 1
        for gi, group in enumerate(self.groups.values()):
            idx = None if single else (group_T == gi).nonzero().flatten()
            x_gD = x_TD if idx is None else x_TD[idx]
            Tg, Eg = x_gD.shape[0], len(group.ids)
            if Tg == 0:
                continue
            logits_gE = group.router(x_gD)
            probs_gE = logits_gE.softmax(-1)
            select_gE = probs_gE + group.router.bias_E if self.bias_balance else probs_gE
            ids_gK = select_gE.topk(K, dim=-1).indices
            gates_gK = probs_gE.gather(1, ids_gK)
            if self.renorm_topk:
                gates_gK = gates_gK / gates_gK.sum(-1, keepdim=True)
            if mask_routed:
                y_gD, kept_gK = None, None
                counts_E = torch.bincount(ids_gK.flatten(), minlength=Eg)
            else:
                y_gD, kept_gK, counts_E = group.experts(x_gD, ids_gK, gates_gK, self.capacity_factor)
            if self.bias_balance and torch.is_grad_enabled() and self.training:
                group.load_E += counts_E.to(group.load_E.dtype)
            f_E = counts_E.float() / (K * Tg)
            aux_g = probs_gE @ f_E * (Eg / Tg)
            z_g = torch.logsumexp(logits_gE, -1).square() / T
            sh_gD = None
            if group.shared is not None:
                sh_gD = group.shared(x_gD)
            if idx is None:
                aux_T, z_T = aux_g, z_g
                if y_gD is not None:
                    y_TD = y_gD
                logits_TE[:, group.ids] = logits_gE.detach()
                topk_ids_TK = group.ids[ids_gK]
                gates_rec_TK = gates_gK.detach()
                if kept_gK is not None:
                    kept_TK = kept_gK
                if sh_gD is not None:
                    shared_TD = sh_gD
            else:
                aux_T = aux_T.index_copy(0, idx, aux_g)
                z_T = z_T.index_copy(0, idx, z_g)
                if y_gD is not None:
                    y_TD = y_TD.index_copy(0, idx, y_gD.to(y_TD.dtype))
                logits_TE[idx.unsqueeze(1), group.ids.unsqueeze(0)] = logits_gE.detach()
                topk_ids_TK[idx] = group.ids[ids_gK]
                gates_rec_TK[idx] = gates_gK.detach()
                if kept_gK is not None:
                    kept_TK[idx] = kept_gK
                if sh_gD is not None:
                    shared_TD = shared_TD.index_copy(0, idx, sh_gD.to(shared_TD.dtype))
        self.hook_router(RouterRecord(
            logits_TE=logits_TE, topk_ids_TK=topk_ids_TK, topk_weights_TK=gates_rec_TK,
            kept_TK=kept_TK if (self.capacity_factor is not None and not mask_routed) else None,
            modality_T=modality_T))
        if self.shared is not None:
            shared_TD = self.shared(x_TD, modality_T == VAE, self.shield_scale)
        if shared_TD is not None:
            shared_TD = self.hook_shared(shared_TD)
            y_TD = y_TD + shared_TD.to(y_TD.dtype)
        return y_TD, aux_T, z_T

    @torch.no_grad()
    def update_balance_bias(self, gamma: float, counts_E: torch.Tensor | None = None) -> None:
        """b_i += γ·sign(mean load − load_i) inside each group (DeepSeek-V3), from the given
        layer-wide counts or the loads accumulated by training forwards since the last call."""
        for group in self.groups.values():
            load = group.load_E if counts_E is None else counts_E.to(group.load_E)[group.ids]
            if load.sum() > 0:
                group.router.bias_E += gamma * torch.sign(load.mean() - load)
            group.load_E.zero_()
