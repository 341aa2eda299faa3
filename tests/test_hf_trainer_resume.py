"""``resume_from_checkpoint``: a run interrupted after its checkpoint and resumed by a second
Trainer gives the store of an uninterrupted run, array by array (rows the checkpoint never saw
are dropped; none lost, none twice)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

torch.set_num_threads(1)

from _hf_trainer import ACCUM, B, RecordingTrainer, Windows, tiny, training_args  # noqa: E402

from moe_probe import open_run  # noqa: E402
from moe_probe.hf import TraceCallback  # noqa: E402

STEPS, SAVE, CRASH = 5, 2, 3


class Crash(TrainerCallback):
    """Fails the run after step CRASH closed (its rows are in the store; the last checkpoint is
    step SAVE), the way a killed job leaves rows past its checkpoint."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == CRASH:
            raise RuntimeError("simulated failure")


def _trainer(out, hf_dir, *callbacks, model=None):
    model = tiny("qwen2_moe") if model is None else model
    cb = TraceCallback(out, kinds="token_type_ids", kind_names=["odd", "even"])
    args = training_args(hf_dir, steps=STEPS, save_strategy="steps", save_steps=SAVE,
                         logging_steps=1)
    return RecordingTrainer(model=model, args=args, callbacks=[cb, *callbacks],
                            train_dataset=Windows(model.config.vocab_size, STEPS * ACCUM * B)), cb


def test_resumed_run_stores_what_an_uninterrupted_run_stores(tmp_path):
    full, _ = _trainer(tmp_path / "full", tmp_path / "hf_full")
    full.train()

    first, cb = _trainer(tmp_path / "resumed", tmp_path / "hf", Crash())
    with pytest.raises(RuntimeError, match="simulated failure"):
        first.train()
    cb.close()  # what the job's exit leaves: rows up to CRASH committed
    assert list(open_run(tmp_path / "resumed").dataset("routing")["step"].values) == [1, 2, 3]

    # transformers 5.25's Trainer._load_from_checkpoint does not convert the checkpoint's
    # per-expert weights back into the fused expert tensors ("missing keys ... experts.gate_up_proj"),
    # so the resumed model is loaded from the checkpoint by from_pretrained, which does.
    ckpt = str(tmp_path / "hf" / f"checkpoint-{SAVE}")
    model = AutoModelForCausalLM.from_pretrained(ckpt).train()
    second, _ = _trainer(tmp_path / "resumed", tmp_path / "hf", model=model)
    second.train(resume_from_checkpoint=ckpt)

    a, b = open_run(tmp_path / "full"), open_run(tmp_path / "resumed")
    assert a.groups == b.groups
    for group in a.groups:
        da, db = a.dataset(group), b.dataset(group)
        assert list(db["step"].values) == list(range(1, STEPS + 1)), group
        for var in da.data_vars:
            np.testing.assert_array_equal(db[var].values, da[var].values, err_msg=f"{group}.{var}")
    # the resumed Trainer trained the same batches as the uninterrupted one
    assert [s for s, *_ in second.seen] == [s for s, *_ in full.seen if s > SAVE]
    for (_, ka, la), (_, kb, lb) in zip([x for x in full.seen if x[0] > SAVE], second.seen):
        assert torch.equal(ka, kb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def test_resume_into_another_run_is_refused(tmp_path):
    """The run at out traced other kinds: refused in one line, its rows untouched."""
    first, _ = _trainer(tmp_path / "run", tmp_path / "hf")
    first.train()
    ckpt = str(tmp_path / "hf" / f"checkpoint-{SAVE}")
    model = AutoModelForCausalLM.from_pretrained(ckpt).train()
    other = RecordingTrainer(model=model, args=training_args(tmp_path / "hf", steps=STEPS),
                             train_dataset=Windows(model.config.vocab_size, STEPS * ACCUM * B),
                             callbacks=[TraceCallback(tmp_path / "run")])
    rows = open_run(tmp_path / "run").dataset("routing")["load"].values
    with pytest.raises(ValueError, match="holds another run .its routing labels differ") as e:
        other.train(resume_from_checkpoint=ckpt)
    assert "\n" not in str(e.value)
    np.testing.assert_array_equal(open_run(tmp_path / "run").dataset("routing")["load"].values, rows)
