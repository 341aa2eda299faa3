"""Every MoE family of the installed transformers, built tiny from its config with random weights
(no downloads), is tried by structural discovery alone (``use_table=False``).

For each family the per-expert counts the adapter records equal top-k of the model's OWN router
logits (``output_router_logits=True``) on the same forward. Where the router adds a
selection-correction bias, the test sets it to random values first and the reference adds it to
the family's score (written out below), so a reader that ignored the bias would fail. Families
the adapter cannot read by structure are refused with one line naming what was found; families
that cannot be built tiny offline are skipped with the reason.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")

from moe_probe.hf.capture import RouterCapture  # noqa: E402
from moe_probe.hf.discover import find_moe_layers  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=256,
            max_position_embeddings=256, num_experts=8, num_local_experts=8, n_routed_experts=8,
            moe_num_experts=8, num_experts_per_tok=2, moe_k=2, top_k=2, moe_top_k=2,
            shared_intermediate_size=32, shared_expert_intermediate_size=32, first_k_dense_replace=0,
            n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, tie_word_embeddings=False, pad_token_id=0,
            bos_token_id=1, eos_token_id=2)
"""Applied to each key the family's config has. One expert group (n_group=1), so group-limited
selection reduces to top-k and the reference stays a plain top-k."""

MLA = {"num_key_value_heads": 4}  # multi-head latent attention: as many kv heads as heads
SPECS: dict[str, dict] = {
    "afmoe": {}, "aria_text": {}, "axk1": MLA, "axk2": MLA,
    "bailing_hybrid": {**MLA, "layer_types": ["linear_attention", "full_attention"],
                       "linear_num_heads": 4, "linear_head_dim": 8, "num_experts_per_token": 2,
                       "num_expert_group": 1},
    "beam": {"mlp_layer_types": ["dense", "sparse"]}, "cohere2_moe": {},
    "deepseek_v2": MLA, "deepseek_v3": MLA, "deepseek_v32": MLA,
    # Hash-routed layers ("hash_moe") pick by a token-id table: tested on their own below.
    "deepseek_v4": {**MLA, "mlp_layer_types": ["moe", "moe"]},
    "dots1": {"n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "dots3_note_text": MLA, "ergo": {}, "ernie4_5_moe": {}, "exaone_moe": {}, "flex_olmo": {},
    "flint": {"mlp_only_layers": [0]}, "gemma4_text": {"enable_moe_block": True, "top_k_experts": 2},
    "glm4_moe": {}, "glm4_moe_lite": MLA, "glm_moe_dsa": MLA, "gpt_oss": {}, "granitemoe": {},
    "granitemoe_swa": {}, "granitemoeshared": {},
    "granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
                         "mamba_chunk_size": 16, "layer_types": ["linear_attention", "full_attention"]},
    "hunyuan_v1_moe": {"moe_topk": 2}, "hy_v3": {}, "hy_v4": {}, "inkling_text": {},
    "inkling2_text": {}, "inkling2_loop_text": {},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0}, "jetmoe": {},
    "kimi_linear": {**MLA, "layer_types": ["linear_attention", "full_attention"],
                    "mlp_layer_types": ["sparse", "sparse"], "num_experts_per_token": 2,
                    "linear_num_heads": 4, "linear_head_dim": 8},
    "kolibri1": {}, "laguna": {"num_attention_heads_per_layer": [4, 4]}, "lara_mini": {},
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["full_attention", "full_attention"]},
    "mellum": {}, "mimo_v2_flash": {}, "minicpm5_moe": {}, "minimax": {}, "minimax_m2": {},
    "minimax_m3_vl_text": {}, "mixtral": {},
    "nemotron_h": {"layers_block_type": ["full_attention", "moe"], "mamba_num_heads": 4,
                   "mamba_head_dim": 16, "moe_shared_expert_intermediate_size": 32,
                   "ssm_state_size": 16, "n_groups": 1},
    "olmoe": {}, "param2moe": {}, "phimoe": {}, "qwen2_moe": {}, "qwen3_5_moe_text": {},
    "qwen3_moe": {}, "qwen3_next": {}, "sarvam_mla": MLA, "sarvam_moe": {}, "solar_open": {},
}
"""Families read by structure: tiny overrides on top of ``TINY``."""

SCORE = {"ernie4_5_moe": lambda z: torch.softmax(z, -1), "kolibri1": lambda z: z,
         "deepseek_v4": lambda z: torch.nn.functional.softplus(z).sqrt()}
"""Score the correction bias is added to, where not sigmoid (read from each router's forward)."""
BIAS_NAMES = ("e_score_correction_bias", "expert_bias")

ROUTER_LOGITS = {"jetmoe": slice(1, None, 2)}
"""Which ``router_logits`` entries are the MoE layers' (JetMoE also routes attention heads:
its entries alternate attention router, MLP router)."""

REFUSED = {
    "llama4_text": r"router model\.layers\.0\.feed_forward\.router returns a 2-tuple of \[4, 8\], \[4, 8\]",
    "dbrx": r"no MoE layer: .*layer 0 holds norm_attn_norm \(DbrxNormAttentionNorm\), ffn \(DbrxFFN\)",
    "doge": r"no MoE layer: .*mlp \(DogeCDMoE\)",
    "zaya": r"layer 0: found a 3-D expert parameter mlp\.experts\.gate_up_proj \[8, 32, 32\] but no \[8, 32\]",
    "longcat_flash": r"layer 0: found a 3-D expert parameter mlp\.experts\.gate_up_proj \[8, 64, 32\] but no \[8, 32\]",
}
"""Structures the adapter refuses (one line) rather than guesses: Llama 4's router returns (dense
scores, logits); DBRX's experts are 2-D [E·F, D] parameters; Doge's cross-domain MoE retrieves
experts from embedding tables; ZAYA routes with an MLP over E + 1 classes (a skip expert) and
LongCat-Flash over E + zero-compute experts. Llama 4 and DBRX are read through the family table
(tests/test_hf_capture.py, below)."""
REFUSED_SPECS = {
    "dbrx": {"d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 256,
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}},
    "doge": {"is_moe": True, "num_experts": 16}, "zaya": {"num_experts_per_tok": 1},
    "longcat_flash": {**MLA, "num_layers": 2, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32,
                      "moe_topk": 2, "zero_expert_num": 2, "qk_head_dim": 16},
}

SKIPPED = {
    "kolibri1_1": "its validators reject every 2-layer config tried (NVFP4 K/V rounding needs "
                  "head_dim % 16 == 0, indexed-attention heads and K/V sharing tied to the layer plan)",
    "qwen4_exp_text": "its n-gram embedding setup fails on a tiny config (None // None in __init__)",
    "qwen4_exp": "multimodal wrapper of qwen4_exp_text (skipped above)",
    **{wrapper: f"multimodal wrapper of {wrapper}_text, whose decoder is tested"
       for wrapper in ("dots3_note", "gemma4", "llama4", "qwen3_5_moe")},
}
"""Causal-LM MoE families that cannot be built tiny offline."""
NOT_CAUSAL_LM = "no causal-LM class (multimodal wrapper, encoder-decoder, vision or speech model)"


def _config(model_type: str, extra: dict):
    from transformers import AutoConfig

    d = AutoConfig.for_model(model_type).to_dict()
    n0 = d.get("num_hidden_layers")
    d.update({k: v for k, v in TINY.items() if k in d})
    n = d.get("num_hidden_layers", 2)
    for k, v in list(d.items()):
        # Per-layer lists: keep the first layer and the last ones (dense-first and
        # attention-last layouts stay valid); per-layer overrides go.
        if isinstance(v, list) and n0 and len(v) == n0 > n and k not in TINY:
            d[k] = [v[0]] + v[len(v) - n + 1:]
        elif k == "per_layer_config":
            d[k] = {}
    d.update(extra)
    d.pop("model_type", None)
    return AutoConfig.for_model(model_type, **d)


def _build(model_type: str, extra: dict):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(model_type, extra)).eval()
    with torch.no_grad():  # some families zero-init their router (AFMoE), a checkpoint would not
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model


def _ids():
    return torch.randint(3, 256, (3, 24), generator=torch.Generator().manual_seed(2))


def _counts(picks_TK: torch.Tensor, E: int) -> np.ndarray:
    return np.bincount(picks_TK.reshape(-1).numpy(), minlength=E)


@pytest.mark.parametrize("model_type", sorted(SPECS))
def test_structural_counts_equal_own_router_topk(model_type):
    model = _build(model_type, SPECS[model_type])
    how, layers = find_moe_layers(model, use_table=False)
    assert how == "structural"
    ids = _ids()
    score = SCORE.get(model_type, torch.sigmoid)

    def own_router_logits():
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True).router_logits
        return list(out)[ROUTER_LOGITS.get(model_type, slice(None))]

    # Random correction biases on the scale of the scores' spread: large enough to change
    # picks, small enough not to send every token to the same experts.
    router_logits = own_router_logits()
    assert len(router_logits) == len(layers)
    g = torch.Generator().manual_seed(5)
    biases = []
    for layer, logits in zip(layers, router_logits):
        block = model.get_submodule(layer.experts.rpartition(".")[0])
        found = [t for n, t in [*block.named_buffers(), *block.named_parameters()]
                 if n.rpartition(".")[2] in BIAS_NAMES]
        if found:
            spread = score(logits.reshape(-1, layer.n_experts).float()).std(0).mean()
            with torch.no_grad():
                found[0].copy_(torch.randn(found[0].shape, generator=g) * spread)
        biases.append(found[0] if found else None)
    router_logits = own_router_logits()

    got = RouterCapture(model, layers).capture(ids, torch.zeros(ids.numel(), dtype=torch.long))
    for layer, logits, bias, rec in zip(layers, router_logits, biases, got.records):
        z_TE = logits.reshape(-1, layer.n_experts).float()
        s_TE = z_TE if bias is None else score(z_TE) + bias
        want = _counts(s_TE.topk(layer.top_k, -1).indices, layer.n_experts)
        assert want.sum() == ids.numel() * layer.top_k
        assert (want > 0).sum() > layer.top_k, "degenerate router: the comparison would be vacuous"
        np.testing.assert_array_equal(_counts(rec.topk_ids_TK, layer.n_experts), want)
        if bias is not None:  # the bias mattered: plain top-k of the logits picks otherwise
            assert not np.array_equal(_counts(z_TE.topk(layer.top_k, -1).indices, layer.n_experts), want)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_unreadable_structure_is_refused_naming_what_was_found(model_type):
    model = _build(model_type, REFUSED_SPECS.get(model_type, {}))
    with pytest.raises(ValueError, match=REFUSED[model_type]) as e:
        find_moe_layers(model, use_table=False)
    assert "\n" not in str(e.value)


def test_hash_routed_layer_records_the_models_own_picks():
    """DeepSeek-V4's hash layers pick experts by token id (``tid2eid``), not by logits: the
    adapter records what the router returned, so counts follow the table."""
    model = _build("deepseek_v4", {**MLA, "mlp_layer_types": ["hash_moe", "moe"]})
    _, layers = find_moe_layers(model, use_table=False)
    gate = model.get_submodule(layers[0].router)
    table = torch.randint(0, 8, gate.tid2eid.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gate.tid2eid.copy_(table)
    ids = _ids()
    got = RouterCapture(model, layers).capture(ids, torch.zeros(ids.numel(), dtype=torch.long))
    np.testing.assert_array_equal(_counts(got.records[0].topk_ids_TK, 8),
                                  _counts(table[ids.reshape(-1)], 8))


def _moe_model_types() -> dict[str, bool]:
    """Model types of the installed transformers whose config has an expert count: -> whether
    an AutoModelForCausalLM class exists."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    keys = re.compile(r"\b(num_experts|num_local_experts|n_routed_experts|moe_num_experts)\b")
    out = {}
    for path in root.glob("*/configuration_*.py"):
        if not keys.search(path.read_text()):
            continue
        module = __import__(f"transformers.models.{path.parent.name}", fromlist=["_"])
        for model_type, cls in CONFIG_MAPPING_NAMES.items():
            if hasattr(module, cls):
                out[model_type] = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return out


def test_every_installed_moe_family_is_tried():
    """A transformers upgrade that brings a new MoE family fails here until the family is
    added to SPECS (read by structure), REFUSED or SKIPPED."""
    found = _moe_model_types()
    assert {"mixtral", "qwen2_moe", "deepseek_v3", "jetmoe"} <= set(found)
    untried = sorted(mt for mt, causal in found.items()
                     if causal and mt not in SPECS and mt not in REFUSED and mt not in SKIPPED)
    assert not untried, f"MoE families neither tested nor skipped with a reason: {untried}"


def test_dbrx_through_the_family_table():
    """DBRX (refused by structure above) is read through its table entry: bare router logits,
    picks = top-k, equal to top-k of the model's own router logits."""
    from moe_probe.hf.loading import load_model

    model, _, _ = load_model(str(Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "dbrx.json"))
    how, layers = find_moe_layers(model)
    assert how == "table:dbrx" and [x.router for x in layers] == [f"transformer.blocks.{i}.ffn.router"
                                                                   for i in range(2)]
    ids = _ids()
    with torch.no_grad():
        router_logits = model(input_ids=ids, output_router_logits=True).router_logits
    got = RouterCapture(model, layers).capture(ids, torch.zeros(ids.numel(), dtype=torch.long))
    for layer, logits, rec in zip(layers, router_logits, got.records):
        want = _counts(logits.topk(layer.top_k, -1).indices, layer.n_experts)
        assert (want > 0).sum() > layer.top_k
        np.testing.assert_array_equal(_counts(rec.topk_ids_TK, layer.n_experts), want)
