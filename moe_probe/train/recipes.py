"""Named training recipes: ``recipe(name, seed) -> RunConfig``.

Stage 1 (``base``): an understanding model — standard MoE with a shared expert, trained on
LM + MMU only. Stage 2 continues from that base (cached, see :mod:`moe_probe.train.stages`):

- ``symbiotic``: routed experts split per layer by the base's own routing (und_fraction 3/4),
  sliced routers, shared experts see every token; differential LR + early gradient shielding.
- ``moe``: the same base trained jointly as one pool (the collapse-prone baseline).
- ``mot``: Mixture-of-Transformers; the gen tower starts as a copy of the und tower.
- ``und_only``: the paper's Only-LM-MMU control — same trainer as the baselines, no
  generation data (forgetting that is not cross-task conflict shows up here too).

The baselines train at one LR (``differential_lr=False``: everything at ``lr_new``), as the
paper's main table compares against plain joint training; ``--set train.differential_lr=true``
gives them the progressive recipe. Every training recipe drops tokens past a capacity factor
(the paper's capacity rate counts dropped assignments); ``--set model.capacity_factor=none``
makes a run dropless. ``tiny-<name>`` is the same recipe at test size (seconds on one core).
"""

from __future__ import annotations

from dataclasses import replace

from moe_probe.data import DataConfig
from moe_probe.model.config import ModelConfig
from moe_probe.trace.config import TraceConfig
from moe_probe.train.config import RunConfig, TrainConfig

STAGE1_MIX = (0.0, 1.0, 1.0)
"""T2I : LM : MMU of the base: understanding only."""
JOINT_MIX = (6.0, 2.0, 2.0)
"""Stage-2 mix (paper: T2I 3 + T2I-long 3 : LM 2 : MMU 2)."""
UND_ONLY_MIX = (0.0, 2.0, 2.0)
"""The Only-LM-MMU control: the joint mix without its generation samples."""


def _data(*, seq_len: int, vocab_words: int) -> DataConfig:
    return DataConfig(seq_len=seq_len, patch_size=2, vocab_words=vocab_words, mix=JOINT_MIX)


def _model(data: DataConfig, **kw) -> ModelConfig:
    n_side = 8 // data.patch_size  # sklearn digits are 8×8
    return ModelConfig(max_seq_len=data.seq_len, patch_dim=data.patch_size ** 2,
                       n_image_tokens=n_side * n_side, **kw)


def _demo(arch: str, seed: int) -> RunConfig:
    data = _data(seq_len=24, vocab_words=1000)
    model = _model(data, arch=arch, d_model=64, n_layers=3, n_heads=4, n_experts=16, n_shared=1,
                   d_expert=64, top_k=2, capacity_factor=1.25)
    base = TrainConfig(stage=1, steps=400, batch_size=32, lr_base=2e-3, lr_new=2e-3, warmup=20,
                       shielding=False, differential_lr=False, eval_every=100,
                       checkpoint_every=200, gen_per_class=0, seed=seed)
    # Attention/backbone LR is not published; at this scale it must learn to carry the prompt
    # to the vae tokens, so it trains at the new LR (at lr_base gen_acc stays near chance).
    train = TrainConfig(stage=2, steps=300, batch_size=32, lr_base=2e-4, lr_new=2e-3,
                        lr_backbone=2e-3, warmup=20, shield_steps=50, shield_release=0.1,
                        eval_every=50, checkpoint_every=100, gen_per_class=10, seed=seed)
    # Token-level routing at steps 0, 150, 300, ids only: gates (float16) barely compress, and
    # at this size they alone would be a third of the store (README, "Cost").
    return RunConfig(recipe="", model=model, data=data, train=train,
                     trace=TraceConfig(grad_every=10, token_every=150, token_gates=False),
                     base=base, base_mix=STAGE1_MIX)


def _tiny(arch: str, seed: int) -> RunConfig:
    data = replace(_data(seq_len=24, vocab_words=200), n_val_digits=100, n_test_digits=100,
                   probe_per_class=2)
    model = _model(data, arch=arch, d_model=32, n_layers=2, n_heads=2, n_experts=8, n_shared=1,
                   d_expert=32, top_k=2, capacity_factor=1.25)
    common = dict(batch_size=8, warmup=2, eval_every=4, checkpoint_every=4, eval_batches=1,
                  eval_images=40, sample_steps=2, group_batches=2, seed=seed)
    base = TrainConfig(stage=1, steps=6, lr_base=3e-3, lr_new=3e-3, shielding=False,
                       differential_lr=False, gen_per_class=0, **common)
    train = TrainConfig(stage=2, steps=6, lr_base=3e-4, lr_new=3e-3, lr_backbone=3e-3,
                        shield_steps=3, gen_per_class=1, **common)
    return RunConfig(recipe="", model=model, data=data, train=train,
                     # Probes (sklearn fits) dominate a tiny run's time: fewer, shorter ones.
                     trace=TraceConfig(grad_every=2, probe_every=100, probe_max_iter=100),
                     base=base, base_mix=STAGE1_MIX)


def _stage1(cfg: RunConfig) -> RunConfig:
    """The base recipe as a run of its own (``moe-probe train --recipe base``)."""
    return replace(cfg, model=replace(cfg.model, arch="moe"),
                   data=replace(cfg.data, mix=cfg.base_mix), train=cfg.base, base=None,
                   base_mix=None)


def _baseline(cfg: RunConfig) -> RunConfig:
    return replace(cfg, train=replace(cfg.train, differential_lr=False, shielding=False))


def _und_only(cfg: RunConfig) -> RunConfig:
    cfg = _baseline(cfg)
    return replace(cfg, data=replace(cfg.data, mix=UND_ONLY_MIX),
                   train=replace(cfg.train, gen_per_class=0))


_RECIPES = {
    "base": lambda size, seed: _stage1(size("moe", seed)),
    "moe": lambda size, seed: _baseline(size("moe", seed)),
    "mot": lambda size, seed: _baseline(size("mot", seed)),
    "symbiotic": lambda size, seed: size("symbiotic", seed),
    "und_only": lambda size, seed: _und_only(size("moe", seed)),
}


def names() -> list[str]:
    return [*_RECIPES, *(f"tiny-{n}" for n in _RECIPES)]


def recipe(name: str, seed: int = 0) -> RunConfig:
    """The named recipe at ``seed``; unknown names raise ValueError listing the known ones."""
    tiny = name.startswith("tiny-")
    key = name[len("tiny-"):] if tiny else name
    if key not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(names())}")
    cfg = _RECIPES[key](_tiny if tiny else _demo, seed)
    return replace(cfg, recipe=name)
