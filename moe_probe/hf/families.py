"""The family table: where each Hugging Face MoE family keeps its router, experts and shared experts.

This file (with ``discover.py``) is the only place in moe_probe that knows HF module names
(ARCHITECTURE.md: "adapters are the only code that knows a model family's module names").
A family missing here still works through structural discovery (``discover.find_structural``);
the table only makes the common cases exact and cheap.

Checked against transformers 5.25 (``models/<family>/modeling_*.py``): every router listed here
but Llama 4's and DBRX's is a module whose forward returns ``(router_logits_TE, topk_weights_TK,
topk_ids_TK)``, and the experts are one module with fused 3-D parameters whose first dim is E
(``gate_up_proj``, ``down_proj`` and for gpt-oss their biases), so per-expert gradient slices are
``param[e]`` (DBRX's [E·F, D] parameters get component-level gradients only).

Paths are relative to one decoder layer (``model.layers[i]``).
"""

from __future__ import annotations

from dataclasses import dataclass

SELECTIONS = {
    "softmax_topk": "top-k of softmax(logits) (= top-k of logits)",
    "logit_topk": "top-k of logits, softmax over the k picked logits",
    "sigmoid_bias_group_topk": "DeepSeek-V3: sigmoid(logits) + e_score_correction_bias, best "
                               "topk_group of n_group groups (sum of each group's top-2), then top-k "
                               "inside them; weights from the uncorrected sigmoid scores",
    "sparsemixer": "PhiMoE sparsemixer; in eval: argmax, then argmax of the rest (top-2 of logits)",
}
"""How a family turns router logits into picks. Documentation only for table families (their
router returns the picks, which the adapter records as they are); for a structurally found
router that returns bare logits the adapter applies ``softmax_topk``."""


@dataclass(frozen=True)
class Family:
    block: str
    """Attribute of the decoder layer holding the sparse block (absent on dense layers)."""
    router: str
    """Attribute of the block: the router module returning (logits, weights, ids)."""
    experts: str = "experts"
    """Attribute of the block: the routed experts (fused 3-D parameters, first dim E)."""
    shared: tuple[str, ...] = ()
    """Always-on shared expert modules, paths relative to the decoder layer."""
    shared_gate: str | None = None
    """Qwen2-MoE's sigmoid gate scaling the shared expert (path relative to the decoder layer)."""
    selection: str = "softmax_topk"
    """Key of :data:`SELECTIONS`."""
    n_shared_key: str | None = None
    """Config attribute counting shared experts when one module fuses several (DeepSeek-V3)."""
    output: str = "ids"
    """What the router returns: ``ids`` = (logits, weights, ids); ``scores_logits`` = Llama 4's
    (dense sigmoid scores, logits), picks = top-k of logits; ``logits`` = bare logits."""


FAMILIES: dict[str, Family] = {
    "mixtral": Family("mlp", "gate"),
    "qwen2_moe": Family("mlp", "gate", shared=("mlp.shared_expert",),
                        shared_gate="mlp.shared_expert_gate"),
    "qwen3_moe": Family("mlp", "gate"),
    "olmoe": Family("mlp", "gate"),
    # Dense first `first_k_dense_replace` layers have a plain MLP at `mlp` with no `gate`.
    "deepseek_v3": Family("mlp", "gate", shared=("mlp.shared_experts",),
                          selection="sigmoid_bias_group_topk", n_shared_key="n_shared_experts"),
    "granitemoe": Family("block_sparse_moe", "router", selection="logit_topk"),
    # The shared MLP is a sibling of the sparse block in the decoder layer, not inside it.
    "granitemoeshared": Family("block_sparse_moe", "router", shared=("shared_mlp",),
                               selection="logit_topk"),
    "phimoe": Family("mlp", "router", selection="sparsemixer"),
    # GptOssMLP returns (hidden, router_scores); only the router's output is read.
    "gpt_oss": Family("mlp", "router", selection="logit_topk"),
    # Llama 4 text: experts run densely on sigmoid-scaled copies; non-picked scores are exactly 0.
    "llama4_text": Family("feed_forward", "router", shared=("feed_forward.shared_expert",),
                          selection="logit_topk", output="scores_logits"),
    # DBRX fuses its experts as 2-D [E·F, D] parameters (neither a list nor 3-D, so structure
    # alone cannot size them) and its router returns bare logits; the block holds top_k.
    "dbrx": Family("ffn", "router", output="logits"),
}
