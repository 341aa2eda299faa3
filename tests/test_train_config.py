"""Config overrides, validation and (de)serialisation of RunConfig (no training)."""

from __future__ import annotations

import pytest

from moe_probe.train import recipes
from moe_probe.overrides import apply_overrides
from moe_probe.train.config import run_config_from_json, to_json, validate


def test_overrides_coerce_to_field_types():
    cfg = recipes.recipe("tiny-symbiotic")
    out = apply_overrides(cfg, [
        "model.top_k=1", "train.lr_new=3e-4", "base.steps=10", "model.capacity_factor=none",
        "trace.probe_every=none", "data.mix=1,2,3", "train.shielding=false",
        "model.groups=[[0,1,2,3,4,5],[1,2,3,4,5,6]]", "train.lr_backbone=1e-5",
    ])
    validate(out)
    assert out.model.top_k == 1 and isinstance(out.model.top_k, int)
    assert out.train.lr_new == 3e-4 and out.base.steps == 10
    assert out.model.capacity_factor is None and out.trace.probe_every is None
    assert out.data.mix == (1.0, 2.0, 3.0) and out.train.shielding is False
    assert out.model.groups == ((0, 1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 6))
    assert out.train.lr_backbone == 1e-5
    # Untouched sections stay identical; the original is not mutated (frozen dataclasses).
    assert out.trace.grad_every == cfg.trace.grad_every and cfg.model.top_k == 2


@pytest.mark.parametrize("item, words", [
    ("model.topk=2", ["model.topk", "model.top_k"]),
    ("train.lr_nwe=1", ["train.lr_nwe", "train.lr_new"]),
    ("foo=1", ["foo", "known"]),
    ("train.steps=abc", ["train.steps", "integer"]),
    ("train.differential_lr=maybe", ["train.differential_lr", "true/false"]),
    ("model.top_k.x=1", ["model.top_k", "no sub-keys"]),
    ("train.steps=-3", ["train.steps", ">= 0"]),
    ("model.top_k=9", ["top_k 9"]),
    ("model.top_k=3", ["top_k 3", "gen group"]),          # 8 experts · 3/4 -> 6 und / 2 gen
    ("model.und_fraction=0.99", ["gen group is empty"]),
    ("data.mix=1,2", ["mix", "3 values"]),
    ("model.n_heads=5", ["divisible"]),
    ("train.micro_batches=3", ["divisible"]),
    ("noequals", ["KEY=VALUE"]),
])
def test_bad_overrides_are_one_line_value_errors(item, words):
    cfg = recipes.recipe("tiny-symbiotic")
    with pytest.raises(ValueError) as e:
        validate(apply_overrides(cfg, [item]))
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_stage1_recipe_has_no_base_section():
    cfg = recipes.recipe("tiny-base")
    assert cfg.train.stage == 1 and cfg.base is None and cfg.model.arch == "moe"
    with pytest.raises(ValueError, match="not used by this recipe"):
        apply_overrides(cfg, ["base.steps=3"])


def test_json_round_trip_of_every_recipe():
    for name in recipes.names():
        cfg = validate(recipes.recipe(name, seed=3))
        assert cfg.recipe == name and cfg.train.seed == 3
        assert run_config_from_json(to_json(cfg)) == cfg


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        recipes.recipe("symbiotc")
    assert "tiny-symbiotic" in str(e.value) and "und_only" in str(e.value)


def test_recipes_differ_only_where_documented():
    sym, moe, mot, und = (recipes.recipe(n) for n in ("symbiotic", "moe", "mot", "und_only"))
    # One base for all stage-2 recipes: same model sizes, base trainer and base mix.
    for other in (moe, mot, und):
        assert other.base == sym.base and other.base_mix == sym.base_mix
        assert other.model.d_model == sym.model.d_model and other.model.n_experts == sym.model.n_experts
    assert sym.train.differential_lr and sym.train.shielding
    assert not moe.train.differential_lr and not moe.train.shielding
    assert und.data.mix[0] == 0 and sym.data.mix[0] > 0
    # Token dropping by default (capacity rate is about dropped assignments).
    assert all(c.model.capacity_factor is not None for c in (sym, moe, mot, und))
