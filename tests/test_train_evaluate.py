"""Evaluation: the generation scorer is trustworthy, evaluation is deterministic and leaves
the training RNG untouched."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from moe_probe.data import MultimodalData
from moe_probe.model import MultimodalMoE
from moe_probe.train import recipes
from moe_probe.train.evaluate import METRICS, Evaluator, digit_scorer


def test_scorer_reads_real_held_out_digits():
    data = MultimodalData(recipes.recipe("tiny-symbiotic").data, 0)
    idx = data.digit_split["test"]
    x = data.images[idx].reshape(len(idx), -1).numpy()
    acc = (digit_scorer(data).predict(x) == data.digit_labels[idx].numpy()).mean()
    assert acc >= 0.95, acc  # so gen_acc measures the generator, not the scorer
    assert digit_scorer(data) is digit_scorer(data)  # fit once per seed and split


def test_evaluator_is_deterministic_and_keeps_the_training_rng():
    cfg = recipes.recipe("tiny-symbiotic")
    data = MultimodalData(cfg.data, 0)
    torch.manual_seed(0)
    model = MultimodalMoE(cfg.model, data.tokenizer.vocab_size)
    ev = Evaluator(cfg, data, data.tokenizer)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = ev(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training  # mode restored
    assert ev(model) == first
    assert set(first) == set(METRICS)
    assert 0.0 <= first["digit_acc"] <= 1.0 and 0.0 <= first["gen_acc"] <= 1.0
    assert first["text_loss"] > 0 and first["flow_loss"] > 0
    # A stage without generation data reports no generation metrics (NaN, not noise).
    und = replace(cfg, data=replace(cfg.data, mix=(0.0, 1.0, 1.0)))
    out = Evaluator(und, MultimodalData(und.data, 0), data.tokenizer)(model)
    assert math.isnan(out["gen_acc"]) and math.isnan(out["flow_loss"])
    assert out["digit_acc"] == first["digit_acc"]
