"""HF adapter: per-layer per-expert counts equal the model's OWN router decisions.

The reference side never touches moe_probe.hf: it runs the model with
``output_router_logits=True`` and recomputes each family's selection from those logits with the
rule written out below (DeepSeek-V3: sigmoid + e_score_correction_bias, group-limited top-k).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from moe_probe.hf.capture import RouterCapture  # noqa: E402
from moe_probe.hf.discover import find_moe_layers  # noqa: E402
from moe_probe.hf.loading import load_model  # noqa: E402
from moe_probe.trace.routing import RoutingCounter  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "granitemoe",
            "granitemoeshared", "phimoe", "gpt_oss", "llama4_text"]


def _softmax_topk(logits, k, _model, _li):
    return torch.softmax(logits.float(), -1).topk(k, -1).indices


def _logit_topk(logits, k, _model, _li):
    return logits.float().topk(k, -1).indices


def _deepseek_v3(logits, k, model, li):
    """Bias-corrected, group-limited selection, re-derived from the config and the bias buffer."""
    cfg = model.config
    bias = model.model.layers[li].mlp.gate.e_score_correction_bias.float()
    s = torch.sigmoid(logits.float()) + bias  # T, E
    T, E = s.shape
    per = E // cfg.n_group
    grouped = s.view(T, cfg.n_group, per).sort(-1, descending=True).values
    group_score = grouped[..., :2].sum(-1)  # T, G: sum of each group's two best
    keep_groups = group_score.argsort(-1, descending=True)[:, : cfg.topk_group]
    allowed = torch.zeros(T, cfg.n_group, dtype=torch.bool)
    allowed[torch.arange(T)[:, None], keep_groups] = True
    s = s.masked_fill(~allowed.repeat_interleave(per, dim=1), float("-inf"))
    return s.argsort(-1, descending=True)[:, :k]


RULES = {"mixtral": _softmax_topk, "qwen2_moe": _softmax_topk, "qwen3_moe": _softmax_topk,
         "olmoe": _softmax_topk, "deepseek_v3": _deepseek_v3, "granitemoe": _logit_topk,
         "granitemoeshared": _logit_topk, "gpt_oss": _logit_topk, "llama4_text": _logit_topk,
         # PhiMoE sparsemixer in eval: argmax, then argmax with the first pick masked = top-2.
         "phimoe": _logit_topk}


def _model(family):
    model, _, _ = load_model(str(FIX / f"{family}.json"), seed=0)
    if family == "deepseek_v3":
        # The bias starts at zero; make it large enough to change picks so the test can tell.
        g = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.02)
    return model


def _reference_counts(model, family, ids_BS):
    cfg = model.config
    with torch.no_grad():
        out = model(input_ids=ids_BS, output_router_logits=True)
    moe_idx = [i for i, layer in enumerate(model.model.layers)
               if i >= getattr(cfg, "first_k_dense_replace", 0)]
    assert len(out.router_logits) == len(moe_idx)
    counts = []
    for li, logits in zip(moe_idx, out.router_logits):
        E = logits.shape[-1]
        picks = RULES[family](logits.reshape(-1, E), cfg.num_experts_per_tok, model, li)
        counts.append(np.bincount(picks.reshape(-1).numpy(), minlength=E))
    return [str(i) for i in moe_idx], np.stack(counts)


@pytest.mark.parametrize("use_table", [True, False], ids=["table", "structural"])
@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_model_router(family, use_table):
    model = _model(family)
    if family == "llama4_text" and not use_table:
        # Its router returns (dense scores, logits): without the table the adapter refuses to guess.
        with pytest.raises(ValueError, match="cannot read"):
            find_moe_layers(model, use_table=False)
        return
    how, layers = find_moe_layers(model, use_table=use_table)
    assert how == (f"table:{family}" if use_table else "structural")
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(2))
    names, ref = _reference_counts(model, family, ids)
    assert [layer.name for layer in layers] == names
    assert ref.sum() == len(names) * ids.numel() * model.config.num_experts_per_tok
    # Spread picks: a degenerate router (all ties) would make the comparison vacuous.
    assert ((ref > 0).sum(1) > model.config.num_experts_per_tok).all()

    cap = RouterCapture(model, layers)
    mod_T = torch.zeros(ids.numel(), dtype=torch.long)
    got = cap.capture(ids, mod_T)
    direct = np.stack([np.bincount(r.topk_ids_TK.reshape(-1).numpy(), minlength=layer.n_experts)
                       for r, layer in zip(got.records, layers)])
    np.testing.assert_array_equal(direct, ref)

    counter = RoutingCounter([x.name for x in layers], [_info(x) for x in layers])
    for i, r in enumerate(got.records):
        counter.add(i, r)
    row = counter.finish()
    np.testing.assert_array_equal(row["load"][:, 0, :], ref)
    assert (row["tokens"][:, 0] == ids.numel()).all()


def _info(layer):
    from moe_probe.hf.capture import layer_routing

    return layer_routing(layer)


def test_deepseek_bias_changes_selection():
    """Guard for the test above: with the bias, the corrected picks differ from plain sigmoid top-k."""
    model = _model("deepseek_v3")
    ids = torch.randint(3, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits[0]
    plain = torch.sigmoid(logits).topk(2, -1).indices.sort(-1).values
    corrected = _deepseek_v3(logits, 2, model, 1).sort(-1).values
    assert not torch.equal(plain, corrected)


def test_structural_finds_shared_experts():
    for family, n_shared, gate in [("qwen2_moe", 1, True), ("deepseek_v3", 1, False),
                                   ("granitemoeshared", 1, False), ("mixtral", 0, False)]:
        model = _model(family)
        _, layers = find_moe_layers(model, use_table=False)
        assert all(x.n_shared == n_shared for x in layers), family
        assert all((x.shared_gate is not None) == gate for x in layers), family


def test_dense_model_is_rejected():
    model, _, _ = load_model(str(FIX / "llama_dense.json"))
    with pytest.raises(ValueError, match="no MoE layer"):
        find_moe_layers(model)


def test_fixture_configs_are_small():
    for p in FIX.glob("*.json"):
        assert p.stat().st_size < 4096
        assert "model_type" in json.loads(p.read_text())
