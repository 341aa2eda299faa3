"""Hook points: the only thing the model exposes to tracers (TransformerLens style).

A :class:`HookPoint` is an identity module. The model calls it with a value at a named
place (its module path is the hook name, e.g. ``layers.3.ffn.hook_router``); tracers
register forward hooks on it and read the value. The model knows nothing of tracers.

Legend: T tokens (= B·S, flattened), E experts of the layer (all groups), K top-k, D model dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class HookPoint(nn.Module):
    """Identity; tracers attach ``register_forward_hook`` here and always remove it."""

    def forward(self, x):
        return x


@dataclass
class RouterRecord:
    """What one router call decided, for every token that entered the layer.

    Passed (as the single argument) to a layer's ``hook_router`` once per forward.
    Ids are layer-global expert indices in ``[0, E)`` even when a token routes inside a
    group (symbiotic, mot): group membership comes from :class:`LayerRouting`.
    """

    logits_TE: torch.Tensor
    """Router logits over all E experts of the layer, ``-inf`` outside the token's group."""
    topk_ids_TK: torch.Tensor
    """Top-k picks (int64), before capacity drops."""
    topk_weights_TK: torch.Tensor
    """Gate weights of the picks (as used to mix expert outputs)."""
    kept_TK: torch.Tensor | None
    """True where the pick was processed; ``None`` for a dropless layer (kept is then nominal)."""
    modality_T: torch.Tensor
    """Modality id of each token (int64, index into ``MODALITIES``)."""


@dataclass(frozen=True, kw_only=True)
class LayerRouting:
    """Static routing layout of one MoE layer; tracers size their counters from it."""

    n_experts: int
    """E: routed experts of the layer, all groups together (mot: und tower then gen tower)."""
    top_k: int
    """K: picks per token inside its group."""
    capacity_factor: float | None
    """C for token dropping; ``None`` = dropless (then the tracer's nominal C applies)."""
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Group name -> expert ids. A plain MoE has one group, ``{"all": (0..E-1)}``."""
    modality_group: dict[str, str] = field(default_factory=dict)
    """Modality name -> the group its tokens route into."""
    n_shared: int = 0
    """Always-on shared experts (not counted in E)."""
