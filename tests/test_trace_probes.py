"""Snapshot metrics hand-checked; probes on constructed features; isolated digit accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_probe.data import Batch
from moe_probe.trace.config import TraceConfig
from moe_probe.trace.isolated import digit_accuracy
from moe_probe.trace.probes import (
    ProbeData, control_labels, probe_data, run_probe, split_by_sample,
)
from moe_probe.trace.snapshot import SnapshotTracer


def test_snapshot_saturation_and_coactivation_hand_worked():
    snap = SnapshotTracer(n_experts=4)
    first = torch.tensor([[0, 1], [0, 2], [1, 2]])
    row = snap.row([first, None])
    assert np.isnan(row["saturation"]).all()  # no previous snapshot
    co = row["coactivation"][0]
    # counts: e0 2, e1 2, e2 2, e3 0; pairs (0,1) 1, (0,2) 1, (1,2) 1
    np.testing.assert_allclose(co[0], [1, 0.5, 0.5, 0])
    np.testing.assert_allclose(co[1], [0.5, 1, 0.5, 0])
    assert np.isnan(co[3]).all() and np.isnan(row["coactivation"][1]).all()
    # second snapshot: token 0 keeps {0,1} (2/2), token 1 {2,3} vs {0,2} (1/2), token 2 {3,0} (0/2)
    row2 = snap.row([torch.tensor([[1, 0], [2, 3], [3, 0]]), None])
    np.testing.assert_allclose(row2["saturation"][0], (1 + 0.5 + 0) / 3)


def test_probe_separates_informative_features_from_control():
    cfg = TraceConfig(probe_C=1.0, probe_max_iter=300, probe_test_fraction=0.3)
    rng = np.random.default_rng(0)
    n, d, classes = 300, 8, 4
    y = rng.integers(0, classes, n)
    centers = rng.normal(0, 3, (classes, d))
    X = centers[y] + rng.normal(0, 0.5, (n, d))
    acc, ctl = run_probe(ProbeData(X=X, y=y, types=np.arange(n), sample=np.arange(n)), cfg, 0)
    assert acc > 0.95
    assert ctl < 0.45  # per-example random labels: held-out near chance (0.25)
    # features without the label: probe at chance too
    acc0, _ = run_probe(ProbeData(X=rng.normal(size=(n, d)), y=y, types=np.arange(n),
                                  sample=np.arange(n)), cfg, 0)
    assert acc0 < 0.45


def test_word_type_control_is_learnable_by_memorising_types():
    # Hewitt–Liang: features = word identity only; the control (a label per word) is fully
    # learnable, the real task (a label per sample, unrelated to the word) is not.
    cfg = TraceConfig(probe_C=10.0, probe_max_iter=500)
    rng = np.random.default_rng(1)
    n_samples, per, vocab = 60, 10, 12
    sample = np.repeat(np.arange(n_samples), per)
    words = rng.integers(0, vocab, len(sample))
    X = np.eye(vocab)[words]
    y = rng.integers(0, 3, n_samples)[sample]
    acc, ctl = run_probe(ProbeData(X=X, y=y, types=words, sample=sample), cfg, 2)
    assert ctl > 0.95 and acc < 0.6


def test_control_labels_and_split_are_deterministic_and_per_type():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    types = np.array([5, 5, 7, 7, 9, 5, 9, 7])
    c1, c2 = control_labels(y, types, 3), control_labels(y, types, 3)
    np.testing.assert_array_equal(c1, c2)
    for t in np.unique(types):
        assert len(set(c1[types == t])) == 1
    sample = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    label = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # samples 0, 1 of class 0; 2, 3 of class 1
    test = split_by_sample(sample, label, 0.5, 0)
    np.testing.assert_array_equal(test, split_by_sample(sample, label, 0.5, 0))
    for s in range(4):
        assert len(set(test[sample == s])) == 1  # a sample never straddles the split
    # stratified: one sample of each class held out
    assert test.sum() == 4 and test[sample < 2].sum() == 2 and test[sample >= 2].sum() == 2


def _batch(B, S, P=4):
    return Batch(
        tokens_BS=torch.zeros(B, S, dtype=torch.long), modality_BS=torch.zeros(B, S, dtype=torch.long),
        patches_BSP=torch.zeros(B, S, P), lm_targets_BS=torch.full((B, S), -100),
        lm_kind_BS=torch.zeros(B, S, dtype=torch.long), flow_t_B=torch.zeros(B),
        noise_BSP=torch.zeros(B, S, P), labels_B=torch.full((B,), -1), kind_B=torch.zeros(B, dtype=torch.long),
        valid_BS=torch.ones(B, S, dtype=torch.bool), text_label_B=torch.full((B,), -1))


def test_probe_data_pools_per_image_and_maps_valid_rows():
    b = _batch(3, 4)
    b.kind_B[:] = torch.tensor([1, 2, 0])
    b.labels_B[:] = torch.tensor([3, 5, -1])
    b.text_label_B[2] = 1
    b.modality_BS[0, 1:3] = 1  # vit
    b.modality_BS[1, 1:4] = 2  # vae
    b.tokens_BS[2] = torch.tensor([11, 12, 13, 0])
    b.valid_BS[2, 3] = False  # a pad: not a hook row
    h = torch.arange(11 * 2, dtype=torch.float32).view(11, 2)  # 11 valid rows, row-major
    d = probe_data(b, h)
    np.testing.assert_allclose(d["vit_digit"].X, [[(2 + 4) / 2, (3 + 5) / 2]])  # rows 1, 2
    np.testing.assert_array_equal(d["vit_digit"].y, [3])
    np.testing.assert_allclose(d["vae_digit"].X, [[(10 + 12 + 14) / 3, (11 + 13 + 15) / 3]])  # rows 5-7
    np.testing.assert_array_equal(d["text_topic"].types, [11, 12, 13])
    np.testing.assert_allclose(d["text_topic"].X, h[8:11].numpy())
    np.testing.assert_array_equal(d["text_topic"].y, [1, 1, 1])


def test_isolated_digit_accuracy_argmax_over_digit_words():
    b = _batch(3, 3)
    b.lm_kind_BS[:, 1] = 2
    b.labels_B[:] = torch.tensor([0, 1, 2])
    b.lm_targets_BS[:, 1] = torch.tensor([7, 8, 9])  # digit words of classes 0, 1, 2
    logits = torch.zeros(3, 3, 10)
    logits[0, 1, 7] = 1.0       # right
    logits[1, 1, 9] = 1.0       # wrong (says class 2)
    logits[2, 1, 9] = 1.0
    logits[2, 1, 3] = 5.0       # a non-digit word scores higher: ignored -> right
    assert math.isclose(digit_accuracy(logits, b), 2 / 3)


def test_capture_forward_removes_hooks_and_restores_mode_on_error():
    from torch import nn

    from moe_probe.model.hooks import HookPoint
    from moe_probe.trace.capture import capture_forward

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = nn.Module()
            self.ffn.hook_router, self.ffn.hook_shared = HookPoint(), HookPoint()

        def moe_layers(self):
            return [("0", self.ffn)]

        def forward(self, batch, *, mask_routed=False):
            assert not self.training and not torch.is_grad_enabled()
            assert len(self.ffn.hook_router._forward_hooks) == 1
            assert len(self.ffn.hook_shared._forward_hooks) == 1
            raise RuntimeError("boom")

    m = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        capture_forward(m, None)
    assert m.training
    assert not m.ffn.hook_router._forward_hooks and not m.ffn.hook_shared._forward_hooks
