"""Trainer internals on the real tiny model: LR groups, schedules, shielding in the loop."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moe_probe.run import store_path
from moe_probe.data import MultimodalData
from moe_probe.model import MultimodalMoE
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.layout import store_layout
from moe_probe.trace.session import TraceSession
from moe_probe.train import recipes
from moe_probe.train.config import TrainConfig
from moe_probe.train.trainer import build_optimizer, fit, lr_factor, shield_scale, tag_lr


def _model(arch: str, seed: int = 0):
    cfg = recipes.recipe(f"tiny-{arch}", seed=seed)
    data = MultimodalData(cfg.data, seed)
    torch.manual_seed(seed)
    return cfg, data, MultimodalMoE(cfg.model, data.tokenizer.vocab_size)


@pytest.mark.parametrize("arch", ["moe", "mot", "symbiotic"])
def test_param_groups_cover_every_parameter_once_with_the_right_lr(arch):
    cfg, _, model = _model(arch)
    tc = replace(cfg.train, differential_lr=True, lr_base=1e-4, lr_new=1e-2, lr_backbone=5e-4)
    opt = build_optimizer(model, tc)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_tag = {g["tag"]: g for g in opt.param_groups}
    want = {"gen_experts": 1e-2, "gen_router": 1e-2, "gen_io": 1e-2, "gen_backbone": 1e-2,
            "und_experts": 1e-4, "und_router": 1e-4, "shared": 1e-4, "backbone": 5e-4}
    for tag, group in by_tag.items():
        assert group["lr"] == want[tag], tag
    names = {id(p): n for n, p in model.named_parameters()}
    gen_io = {names[id(p)] for p in by_tag["gen_io"]["params"]}
    assert any(n.startswith("vae_in.") for n in gen_io) and any(n.startswith("t_embed.") for n in gen_io)
    if arch == "symbiotic":
        gen_router = [names[id(p)] for p in by_tag["gen_router"]["params"]]
        assert gen_router and all(".groups.gen.router." in n for n in gen_router)
        assert all(".groups.und." in names[id(p)] for p in by_tag["und_experts"]["params"])
    if arch == "mot":  # the gen tower's attention and norms are new in stage 2: the new-parts LR
        gen_tower = {names[id(p)] for p in by_tag["gen_backbone"]["params"]}
        assert gen_tower and all(".gen_attn" in n or ".gen_" in n for n in gen_tower)
        assert not any(".gen_" in names[id(p)] for p in by_tag["backbone"]["params"])
    else:
        assert "gen_backbone" not in by_tag
    if arch == "moe":  # a plain MoE has no generation experts: its experts are what the base knows
        assert "gen_experts" not in by_tag and "gen_router" not in by_tag
    # Switched off: one LR (the high one) everywhere.
    opt = build_optimizer(model, replace(tc, differential_lr=False))
    assert {g["lr"] for g in opt.param_groups} == {1e-2}


def test_backbone_lr_defaults_to_lr_base():
    tc = replace(recipes.recipe("tiny-symbiotic").train, lr_backbone=None)
    assert tag_lr("backbone", tc) == tc.lr_base and tag_lr("gen_io", tc) == tc.lr_new
    assert TrainConfig().lr_backbone is None


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    tc = replace(recipes.recipe("tiny-symbiotic").train, steps=100, warmup=10, min_lr_ratio=0.1)
    f = [lr_factor(s, tc) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)
    const = replace(tc, min_lr_ratio=1.0)
    assert all(lr_factor(s, const) == 1.0 for s in range(10, 100))


def test_shield_schedule():
    tc = replace(recipes.recipe("tiny-symbiotic").train, shield_steps=3, shield_release=0.1)
    assert [shield_scale(s, tc) for s in range(5)] == [0.0, 0.0, 0.0, 0.1, 0.1]
    assert all(shield_scale(s, replace(tc, shielding=False)) == 1.0 for s in range(5))


def test_fit_applies_lr_and_shielding_at_the_right_steps(tmp_path):
    """Run the real loop (real store + session) and record what each training forward saw."""
    cfg, data, model = _model("symbiotic")
    tc = replace(cfg.train, steps=5, warmup=2, shield_steps=3, shield_release=0.25, micro_batches=2,
                 eval_every=0, checkpoint_every=0)
    cfg = replace(cfg, train=tc)
    opt = build_optimizer(model, tc)
    seen = []  # (shield scale of layer 0, lr of the gen_router group) per training forward
    gen_router = next(g for g in opt.param_groups if g["tag"] == "gen_router")
    ffn = model.moe_layers()[0][1]
    h = ffn.register_forward_pre_hook(
        lambda m, _a: seen.append((m.shield_scale, gen_router["lr"])) if m.training else None)
    attrs, coords = store_layout(model, eval_metrics=["x"])
    writer = StoreWriter.create(store_path(tmp_path), attrs={"run": {"name": "t"}, **attrs}, coords=coords)
    session = TraceSession(model, cfg.trace, writer, data.probe_batch)
    try:
        fit(cfg, tmp_path, model=model, data=data, tokenizer=data.tokenizer, session=session,
            evaluator=lambda m: {"x": 0.0}, optimizer=opt, quiet=True)
    finally:
        session.close()
        h.remove()
    # Two micro-batches per step; the grad tracer (grad_every=2) adds no training forward.
    assert len(seen) == 2 * tc.steps
    per_step = seen[::2]
    assert [s for s, _ in per_step] == [0.0, 0.0, 0.0, 0.25, 0.25]
    assert [lr for _, lr in per_step] == pytest.approx([tc.lr_new * lr_factor(s, tc) for s in range(5)])
    assert seen[0::2] == seen[1::2]  # micro-batches of one step share the settings
    store = __import__("moe_probe").open_run(tmp_path)
    assert store.committed_steps("loss") == 5
    assert (tmp_path / "checkpoint.pt").is_file()  # always at the end
    assert math.isfinite(float(store.dataset("loss")["value"].sel(term="total")[-1]))
