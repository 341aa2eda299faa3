"""``TraceTrainerMixin``: gradient conflict between two task losses under the HF Trainer, the
update bit-identical to an untraced step's; and ``TraceCallback`` under TRL's ``SFTTrainer``."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import torch
from transformers import Trainer

torch.set_num_threads(1)

from _hf_trainer import ACCUM, B, Windows, tiny, training_args  # noqa: E402

from moe_probe import open_run  # noqa: E402
from moe_probe.hf import TraceCallback, TraceTrainerMixin  # noqa: E402
from moe_probe.hf.callback import split_lm_loss  # noqa: E402
from moe_probe.trace.grad import GradConflictTracer  # noqa: E402

STEPS = 4


class TaskWindows(Windows):
    """Windows with a per-sample task: even windows "prose", odd ones "code"."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "task": torch.tensor(i % 2)}


class TaskTrainer(TraceTrainerMixin, Trainer):
    pass


def _train(tmp_path, name, callbacks):
    model = tiny("mixtral")
    model.config.output_router_logits = True  # the balance loss joins the first task
    trainer = TaskTrainer(model=model, args=training_args(tmp_path / f"{name}.hf", steps=STEPS),
                          train_dataset=TaskWindows(model.config.vocab_size, STEPS * ACCUM * B),
                          callbacks=callbacks)
    trainer.train()
    return model


def test_task_split_sums_to_the_models_loss():
    model = tiny("olmoe")
    ids = Windows(model.config.vocab_size, 4).ids_NS
    out = model(input_ids=ids, labels=ids)
    first, second = split_lm_loss(out.logits, ids, torch.tensor([0, 1, 1, 0]))
    torch.testing.assert_close(first + second, out.loss)
    assert first > 0 and second > 0


def test_gradient_conflict_at_sampled_steps_and_bit_identical_update(tmp_path, monkeypatch):
    lasts = []  # the `last` flag the mixin hands the tracer (the Trainer's sync_gradients)
    backward = GradConflictTracer.backward

    def recorded(self, losses, *, last=False):
        lasts.append(last)
        return backward(self, losses, last=last)

    monkeypatch.setattr(GradConflictTracer, "backward", recorded)
    traced = _train(tmp_path, "traced", [TraceCallback(tmp_path / "traced", grad_every=2,
                                                       tasks=("prose", "code"))])
    assert lasts == ([False] * (ACCUM - 1) + [True]) * 2  # steps 2 and 4: the last micro-batch
    counted = _train(tmp_path, "counted", [TraceCallback(tmp_path / "counted")])
    plain = _train(tmp_path, "plain", [])
    for (name, a), b, c in zip(traced.named_parameters(), counted.parameters(), plain.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), name
    assert not torch.equal(traced.lm_head.weight, tiny("mixtral").lm_head.weight)  # it trained
    run = open_run(tmp_path / "traced")
    g = run.dataset("grad")
    assert list(g["step"].values) == [2, 4]
    cos = g["cosine"].sel(layer="all").values
    assert np.isfinite(cos).any() and (np.abs(cos[np.isfinite(cos)]) <= 1).all()
    assert (g["norm_und"].sel(layer="all").values[np.isfinite(cos)] > 0).all()
    assert list(run.dataset("routing")["step"].values) == [1, 2, 3, 4]
    assert "grad" not in open_run(tmp_path / "counted").groups


def test_grad_every_without_the_mixin_is_refused(tmp_path):
    model = tiny("mixtral")
    trainer = Trainer(model=model, args=training_args(tmp_path / "hf", steps=1),
                      train_dataset=TaskWindows(model.config.vocab_size, ACCUM * B),
                      callbacks=[TraceCallback(tmp_path / "run", grad_every=1, tasks=("a", "b"))])
    with pytest.raises(ValueError, match="TraceTrainerMixin") as e:
        trainer.train()
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def _word_tokenizer(lines, size):
    """A word-level tokenizer of the bundled text, built locally (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = collections.Counter(w for line in lines for w in re.findall(r"\w+|[^\w\s]", line))
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for w, _ in words.most_common(size - len(vocab)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   bos_token="[BOS]", unk_token="[UNK]")


def test_trl_sft_trainer_counts_the_routers_own_picks(tmp_path):
    """TRL's SFTTrainer (a Trainer subclass; its fused LM head returns no router logits): every
    step's counts equal the picks Mixtral's routers return (``router_indices``), recorded on the
    training forwards, over the padded batches TRL builds, with TRL's default activation
    checkpointing (a forward recomputed in backward is not counted again)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from pydoc_data.topics import topics

    lines = [ln for k in sorted(topics)[:40] for ln in topics[k].split("\n") if len(ln.split()) > 3]
    model = tiny("mixtral")
    model.config.output_router_logits = True  # TRL adds the balance loss
    step_of = {"now": 1}
    picks = collections.defaultdict(lambda: np.zeros((2, 4), dtype=np.int64))

    def record(li):
        def hook(module, args, out):
            # TRL checkpoints activations by default: the gate runs again inside backward
            # (same picks); the training forward is the one outside backward.
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() < 0:
                picks[step_of["now"]][li] += np.bincount(out[2].reshape(-1).numpy(), minlength=4)
        return hook

    for li, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(record(li))

    class Steps(TraceCallback):  # the step the next forwards belong to, as the Trainer counts
        def on_step_begin(self, args, state, control, **kw):
            step_of["now"] = state.global_step + 1
            super().on_step_begin(args, state, control, **kw)

    args = trl.SFTConfig(output_dir=str(tmp_path / "hf"), max_length=16, per_device_train_batch_size=B,
                         gradient_accumulation_steps=ACCUM, max_steps=3, learning_rate=1e-3, seed=0,
                         report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                         disable_tqdm=True, dataloader_num_workers=0)
    assert args.gradient_checkpointing
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": lines[:24]}),
                             processing_class=_word_tokenizer(lines, model.config.vocab_size),
                             callbacks=[Steps(tmp_path / "run")])
    trainer.train()
    r = open_run(tmp_path / "run").dataset("routing")
    assert list(r["step"].values) == [1, 2, 3] and sorted(picks) == [1, 2, 3]
    np.testing.assert_array_equal(r["load"].values[:, :, 0], np.stack([picks[s] for s in (1, 2, 3)]))
    assert (r["load"].values > 0).all()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_array_equal(open_run(tmp_path / "run").dataset("loss")["value"]
                                  .sel(term="total").values, logged)
