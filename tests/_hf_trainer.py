"""Tiny HF MoE fine-tunes under the real ``Trainer``, shared by tests/test_hf_trainer*.py and
tests/_hf_trainer_ddp.py (run by torchrun).

Models: random-init from the fixture configs (no hub). Text: Python's bundled pydoc topics,
word-hashed into the model's vocabulary (``moe_probe.hf.loading.encode``). Each window carries a
``token_type_ids`` column (1 = a token of even id): the kinds the callback reads from the batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import Trainer, TrainingArguments  # noqa: E402

from moe_probe.hf.loading import encode, load_model  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
B, S, ACCUM = 2, 16, 2


def tiny(family: str, seed: int = 0):
    """A fixture family, random weights; DeepSeek-V3's correction bias randomised (it starts at
    zero) on the scale of the sigmoid scores' spread, so it changes picks."""
    model, _, _ = load_model(str(FIX / f"{family}.json"), seed=seed)
    if family == "deepseek_v3":
        g = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.02)
    return model.train()


class Windows(torch.utils.data.Dataset):
    """``n`` windows of S tokens: input_ids, labels (= input_ids), token_type_ids."""

    def __init__(self, vocab_size: int, n: int):
        from pydoc_data.topics import topics

        text = " ".join(topics[k] for k in sorted(topics)[:40])
        self.ids_NS = torch.tensor(encode(text, None, vocab_size)[: n * S]).view(n, S)

    def __len__(self):
        return len(self.ids_NS)

    def __getitem__(self, i):
        ids = self.ids_NS[i]
        return {"input_ids": ids, "labels": ids, "token_type_ids": (ids % 2 == 0).long()}


def training_args(out_dir, *, steps: int, accum: int = ACCUM, **kw) -> TrainingArguments:
    """Deterministic CPU settings: seeded data order, no workers, a log per step."""
    base = dict(output_dir=str(out_dir), per_device_train_batch_size=B,
                gradient_accumulation_steps=accum, max_steps=steps, learning_rate=1e-3,
                lr_scheduler_type="constant", seed=0, data_seed=0, dataloader_num_workers=0,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                remove_unused_columns=False, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


class RecordRouterLogits:
    """Mixin for a test Trainer: every training forward also returns the model's own
    ``router_logits``; kept per optimizer step (``global_step + 1``) with the token kinds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, torch.Tensor, list[torch.Tensor]]] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "output_router_logits": True}
        loss, out = super().compute_loss(model, inputs, return_outputs=True,
                                         num_items_in_batch=num_items_in_batch)
        if model.training:
            kind = inputs.get("token_type_ids")
            kind_T = (kind if kind is not None else torch.zeros_like(inputs["input_ids"])).reshape(-1)
            self.seen.append((self.state.global_step + 1, kind_T.clone(),
                              [x.detach().reshape(-1, x.shape[-1]).clone() for x in out.router_logits]))
        return (loss, out) if return_outputs else loss


class RecordingTrainer(RecordRouterLogits, Trainer):
    pass


def reference_load(seen, select, n_steps: int, n_kinds: int = 2) -> np.ndarray:
    """(steps, layers, kinds, E) picks recomputed from recorded router logits with ``select``
    (logits_TE, layer index) -> ids_TK; steps 1..n_steps."""
    L, E = len(seen[0][2]), seen[0][2][0].shape[-1]
    ref = np.zeros((n_steps, L, n_kinds, E), dtype=np.int64)
    for step, kind_T, logits in seen:
        for li, logits_TE in enumerate(logits):
            ids_TK = select(logits_TE, li)
            for kind in range(n_kinds):
                ref[step - 1, li, kind] += np.bincount(ids_TK[kind_T == kind].reshape(-1).numpy(),
                                                       minlength=E)
    return ref
