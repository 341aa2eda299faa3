"""moe_probe.model — the multimodal MoE / MoT / Symbiotic-MoE decoder (INTERNAL_API §2).

Deviations from / additions to docs/INTERNAL_API.md §2 (read these, trainer/tracer helpers):
- Router weights of grouped layers (symbiotic, mot) are stored per group
  (``layers.{i}.ffn.groups.{und,gen}.router.weight`` = the row slice W[ids] of the one router),
  so und and gen router rows can get different learning rates; logits outside a token's group are
  −inf in ``RouterRecord``, exactly the column slice, zero extra parameters. Same for experts
  (``groups.{g}.experts.w1_EFD``...). A plain ``moe`` layer has one group named ``all``.
- ``Batch`` has two extra fields: ``valid_BS`` (False at padding; pads never enter routing,
  records, capacity or losses) and ``text_label_B`` (text-probe class of LM samples, −1 otherwise).
- ``update_balance_bias(counts=None)``: with no argument it uses the expert loads the model
  accumulated itself during training forwards since the last call.
- ``sample_images(labels_B, tokenizer, n_steps, *, generator=None)``, ``classify_images(images,
  tokenizer)``. ``choose_groups`` returns a tuple of per-layer und-id tuples (ModelConfig.groups).
- ``und_expert_counts(model, batches)`` (convert.py) counts text+vit routing per layer/expert,
  the input of ``choose_groups``.
- MoT: ``n_experts``/``n_shared`` are per tower; ``LayerRouting.n_shared`` is per token.
  ``set_shield`` has no effect on MoT (no shared expert is common to both tasks).
- ``ModelOutput`` also carries ``lm_logits_BSV`` and ``velocity_BSP``. ``losses['aux']`` is the
  Switch loss summed over a layer's groups and averaged over layers; ``losses['z']`` likewise
  averaged over layers; ``losses['total']`` is defined as und + gen (bit-exact).
- ``param_groups()`` always returns all seven tags (possibly empty lists). A plain ``moe``'s
  routed experts/router are tagged ``und_experts``/``und_router``; a MoT gen tower's shared experts
  ``gen_experts``; both towers' attention and norms ``backbone``.
"""

from moe_probe.model.config import ARCHS, ModelConfig
from moe_probe.model.convert import choose_groups, convert, und_expert_counts
from moe_probe.model.moe import MoE, Experts, Router, SharedExperts
from moe_probe.model.transformer import ModelOutput, MultimodalMoE

__all__ = ["ARCHS", "Experts", "MoE", "ModelConfig", "ModelOutput", "MultimodalMoE", "Router",
           "SharedExperts", "choose_groups", "convert", "und_expert_counts"]
