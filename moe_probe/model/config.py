"""Model configuration (frozen, keyword-only)."""

from __future__ import annotations

from dataclasses import dataclass

ARCHS: tuple[str, ...] = ("moe", "mot", "symbiotic")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str = "moe"
    """``moe`` (one routed pool), ``mot`` (und/gen towers: attention, norms, MoE FFN untied;
    global attention), ``symbiotic`` (one pool split per layer into und/gen groups)."""
    d_model: int = 64
    """D: residual width."""
    n_layers: int = 2
    """L: transformer blocks (every block has an MoE FFN)."""
    n_heads: int = 4
    """Attention heads (d_model must be divisible)."""
    n_experts: int = 8
    """Routed experts per layer; for ``mot`` per tower (the layer exposes 2·n_experts)."""
    n_shared: int = 1
    """Always-on shared experts per layer (per tower for ``mot``); 0 = none."""
    d_expert: int = 64
    """F: hidden width of one (routed or shared) SwiGLU expert."""
    top_k: int = 2
    """K: routed experts per token (inside its group)."""
    capacity_factor: float | None = None
    """C: cap_e = ceil(C · assignments into e's group / experts in the group); None = dropless."""
    renorm_topk: bool = True
    """Gate weights = top-k probabilities renormalised to sum 1 (Mixtral); False = raw probs."""
    aux_weight: float = 0.01
    """λ_aux for the Switch balance loss (computed per expert group, summed over groups)."""
    z_weight: float = 0.001
    """Weight of the ST-MoE router z-loss."""
    ntp_weight: float = 1.0
    """λ_ntp on the text losses (lm + mmu)."""
    img_weight: float = 1.0
    """λ_img on the flow-matching loss."""
    bias_balance: bool = False
    """DeepSeek-V3 loss-free balancing: a per-expert bias added to scores for selection only."""
    bias_gamma: float = 0.001
    """γ: bias step per ``update_balance_bias`` call."""
    und_fraction: float = 0.75
    """symbiotic: fraction of each layer's experts in the und group when ``groups`` is None
    (then the first round(fraction·E) ids are und)."""
    groups: tuple[tuple[int, ...], ...] | None = None
    """symbiotic: per-layer und expert ids (the rest are gen); see ``choose_groups``."""
    max_seq_len: int = 24
    """Learned absolute positions cover this many positions."""
    patch_dim: int = 4
    """P: pixels per image patch (patch_size²), the ViT input and VAE latent width."""
    n_image_tokens: int = 16
    """Patches per image; each gets a learned 2-D patch-position embedding."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix (output projections scaled by 1/sqrt(2L))."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}: expected one of {', '.join(ARCHS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k {self.top_k} must be in [1, n_experts={self.n_experts}]")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {self.capacity_factor}")
        if self.groups is not None:
            object.__setattr__(self, "groups", tuple(tuple(int(i) for i in g) for g in self.groups))
        if self.arch == "symbiotic":
            self.layer_groups()  # validates

    def layer_groups(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """symbiotic: per layer (und ids, gen ids), validated."""
        E = self.n_experts
        if self.groups is None:
            n_und = round(self.und_fraction * E)
            und_per_layer = [tuple(range(n_und))] * self.n_layers
        else:
            if len(self.groups) != self.n_layers:
                raise ValueError(f"groups has {len(self.groups)} layers, model has {self.n_layers}")
            und_per_layer = [tuple(sorted(g)) for g in self.groups]
        out = []
        for layer, und in enumerate(und_per_layer):
            if len(set(und)) != len(und) or any(not 0 <= i < E for i in und):
                raise ValueError(f"layer {layer}: und ids {list(und)} must be distinct and in [0, {E})")
            gen = tuple(i for i in range(E) if i not in und)
            for name, ids in (("und", und), ("gen", gen)):
                if not ids:
                    raise ValueError(f"layer {layer}: the {name} group is empty "
                                     f"(und_fraction/groups leave no {name} expert of {E})")
                if self.top_k > len(ids):
                    raise ValueError(f"layer {layer}: top_k {self.top_k} is larger than the {name} "
                                     f"group ({len(ids)} experts)")
            out.append((und, gen))
        return out
