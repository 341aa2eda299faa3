"""Held-out evaluation of a run: small, deterministic proxies of the paper's benchmarks.

- ``text_loss``: next-token loss on held-out pydoc text (proxy for MMLU-style language ability).
- ``digit_acc``: recognition accuracy of held-out *test* digits through the MMU path
  (``model.classify_images``; proxy for OCRBench).
- ``flow_loss``: flow-matching loss on held-out digits (the paper's generation loss, Fig. 5b).
- ``gen_acc``: share of generated digits (``model.sample_images``, ``gen_per_class`` per class)
  that a scikit-learn classifier fit on the real *training* digits reads as the prompted class
  (GenEval-style proxy; chance = 0.1).

Generation metrics are NaN in a stage that trains no generation (mix T2I = 0): an untrained
generator's numbers are noise, not a baseline. Every metric is computed with its own seeded
generators inside ``torch.random.fork_rng`` so evaluating never changes the training RNG
stream (a run with more evals trains exactly like one with fewer).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from moe_probe.data import MultimodalData
from moe_probe.train.config import RunConfig

METRICS: tuple[str, ...] = ("text_loss", "digit_acc", "flow_loss", "gen_acc")
"""Columns of the store's ``eval`` group written by the trainer (same for every run)."""

_EVAL_SEED = 1_000_003
"""Offset of the evaluation generators from the run seed (independent of training draws)."""


_SCORERS: dict[tuple[int, int, int], object] = {}


def digit_scorer(data: MultimodalData):
    """SVC fit on the real training digits of ``data``'s split (cached per seed and split sizes).

    An RBF SVC reads held-out real 8×8 digits at ~0.99, so a low ``gen_acc`` is the
    generator's fault, not the scorer's.
    """
    from sklearn.svm import SVC

    key = (data.seed, data.cfg.n_val_digits, data.cfg.n_test_digits)
    if key not in _SCORERS:
        idx = data.digit_split["train"]
        x = data.images[idx].reshape(len(idx), -1).numpy()
        y = data.digit_labels[idx].numpy()
        _SCORERS[key] = SVC(C=10.0, gamma="scale").fit(x, y)
    return _SCORERS[key]


class Evaluator:
    """``evaluator(model) -> dict[str, float]`` with the keys of :data:`METRICS`."""

    metric_names = METRICS

    def __init__(self, cfg: RunConfig, data: MultimodalData, tokenizer):
        self.cfg, self.data, self.tokenizer = cfg, data, tokenizer
        self.tc = cfg.train
        self.seed = cfg.train.seed
        self.trains_gen = data.cfg.mix[0] > 0
        # Single-kind views on the same fixed splits (splits depend on the seed only).
        self.text_data = MultimodalData(replace(data.cfg, mix=(0.0, 1.0, 0.0)), self.seed, tokenizer)
        self.flow_data = MultimodalData(replace(data.cfg, mix=(1.0, 0.0, 0.0)), self.seed, tokenizer)

    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(), torch.no_grad():
                torch.manual_seed(self.seed + _EVAL_SEED)
                out = {
                    "text_loss": self._mean_loss(model, self.text_data, "lm"),
                    "digit_acc": self._digit_acc(model),
                    "flow_loss": self._mean_loss(model, self.flow_data, "gen")
                    if self.trains_gen else math.nan,
                    "gen_acc": self._gen_acc(model)
                    if self.trains_gen and self.tc.gen_per_class else math.nan,
                }
        finally:
            model.train(was_training)
        return out

    def _mean_loss(self, model, data: MultimodalData, term: str) -> float:
        g = torch.Generator().manual_seed(self.seed + _EVAL_SEED)
        vals = [float(model(data.batch("val", self.tc.batch_size, g)).losses[term])
                for _ in range(max(1, self.tc.eval_batches))]
        return float(np.mean(vals))

    def _digit_acc(self, model) -> float:
        idx = self.data.digit_split["test"][: max(1, self.tc.eval_images)]
        images, labels = self.data.images[idx], self.data.digit_labels[idx]
        preds = torch.cat([model.classify_images(images[i: i + 256], self.tokenizer)
                           for i in range(0, len(idx), 256)])
        return float((preds.cpu() == labels).float().mean())

    def _gen_acc(self, model) -> float:
        labels = torch.arange(10).repeat_interleave(self.tc.gen_per_class)
        images = model.sample_images(labels, self.tokenizer, self.tc.sample_steps)
        x = images.detach().cpu().float().clamp(-1, 1).reshape(len(labels), -1).numpy()
        scorer = digit_scorer(self.data)
        return float((scorer.predict(x) == labels.numpy()).mean())
