"""Token kinds, tasks and expert groups shared by every part (ARCHITECTURE.md, "Modalities").

Pure Python: imported by readers that must not import torch.
"""

MODALITIES: tuple[str, ...] = ("text", "vit", "vae")
"""Token kinds in index order: a token's modality id is its index here."""

TEXT, VIT, VAE = 0, 1, 2

TASKS: tuple[str, ...] = ("und", "gen")
"""`und` = text next-token + image understanding losses; `gen` = flow matching on vae tokens."""

TASK_OF_MODALITY: dict[str, str] = {"text": "und", "vit": "und", "vae": "gen"}
"""Which task's loss a modality's tokens carry (and which expert group they route into)."""

EXPERT_GROUPS: tuple[str, ...] = ("und", "gen", "shared")

LOSS_TERMS: tuple[str, ...] = ("lm", "mmu", "gen", "aux", "z", "total")
"""Columns of the store's `loss` group."""

GRAD_COMPONENTS: tuple[str, ...] = (
    "attn", "router", "shared", "experts", "und_experts", "gen_experts", "norm",
)
"""Parameter components of a layer for the gradient-conflict tracer; layer `all` = whole model.

`experts` holds the routed experts of an ungrouped layer (plain MoE); grouped layers (symbiotic,
mot) split them into `und_experts` / `gen_experts`. Embeddings and heads (layer `io`) count only
toward `all`. A component a layer lacks is NaN in the store."""

ISOLATED_METRICS: tuple[str, ...] = ("text_loss", "mmu_loss", "digit_acc")
"""Labels of the store's `probe/isolated` `metric` dim (trace/isolated.py computes them)."""
