"""``moe_probe.hf.TraceCallback`` under the real HF ``Trainer``: counts equal the model's own
router decisions for every step, layer and kind with gradient accumulation 2; bad input is one
line with nothing written.

The reference reads ``output_router_logits`` of the very forwards that train (a Trainer subclass
records them, tests/_hf_trainer.py) and re-derives each family's picks with test_hf_capture's
rules (DeepSeek-V3: sigmoid + the randomised correction bias, group-limited top-k with the
fixture's n_group=4, topk_group=2 — its own selection, re-derived).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from _hf_trainer import (ACCUM, B, S, RecordingTrainer, Windows, reference_load, tiny,  # noqa: E402
                         training_args)
from test_hf_capture import RULES  # noqa: E402

from moe_probe import open_run  # noqa: E402
from moe_probe.hf import TraceCallback  # noqa: E402

STEPS = 3


def _train(tmp_path, family, steps=STEPS, **cb):
    model = tiny(family)
    cb = TraceCallback(tmp_path / "run", kinds="token_type_ids", kind_names=["odd", "even"], **cb)
    trainer = RecordingTrainer(model=model, args=training_args(tmp_path / "hf", steps=steps),
                               train_dataset=Windows(model.config.vocab_size, steps * ACCUM * B),
                               callbacks=[cb])
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_counts_per_step_layer_and_kind_equal_the_models_router_logits(tmp_path, family):
    model, trainer = _train(tmp_path, family)
    k = model.config.num_experts_per_tok
    run = open_run(tmp_path / "run")
    r = run.dataset("routing")
    layers = [int(x) for x in r["layer"].values]
    if family == "deepseek_v3":
        assert layers == [1, 2]  # first_k_dense_replace=1: layer 0 is dense

    def select(logits_TE, li):
        return RULES[family](logits_TE, k, model, layers[li])

    ref = reference_load(trainer.seen, select, STEPS)
    assert list(r["step"].values) == [1, 2, 3]  # HF's global steps
    assert sorted({s for s, *_ in trainer.seen}) == [1, 2, 3] and len(trainer.seen) == STEPS * ACCUM
    assert list(r["modality"].values) == ["odd", "even"]
    np.testing.assert_array_equal(r["load"].values, ref)
    np.testing.assert_array_equal(r["tokens"].values * k, ref.sum(-1))
    assert (r["tokens"].values.sum(-1) == ACCUM * B * S).all()
    # spread picks in both kinds: a degenerate router would make the comparison vacuous
    assert ((ref.sum(2) > 0).sum(-1) > k).all() and (ref[:, :, 1].sum(-1) > 0).all()
    loss = run.dataset("loss")
    assert list(loss["step"].values) == [1, 2, 3]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_array_equal(loss["value"].sel(term="total").values, logged)
    if family == "deepseek_v3":  # the bias matters: plain sigmoid top-k would pick otherwise
        _, _, logits = trainer.seen[0]
        plain = torch.sigmoid(logits[0]).topk(k, -1).indices.sort(-1).values
        assert not torch.equal(plain, select(logits[0], 0).sort(-1).values)


def test_sampled_steps_and_no_hooks_left(tmp_path):
    model = tiny("mixtral")
    with torch.no_grad():  # transformers installs its own (lasting) output-capturing hooks here
        model(input_ids=torch.ones(1, 2, dtype=torch.long), output_router_logits=True)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    cb = TraceCallback(tmp_path / "run", every=2)
    trainer = RecordingTrainer(model=model, args=training_args(tmp_path / "hf", steps=4),
                               train_dataset=Windows(model.config.vocab_size, 4 * ACCUM * B),
                               callbacks=[cb])
    trainer.train()
    r = open_run(tmp_path / "run").dataset("routing")
    assert list(r["step"].values) == [2, 4] and list(r["modality"].values) == ["text"]
    assert (r["tokens"].values.sum(-1) == ACCUM * B * S).all()
    assert cb.watch is None
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks


def _only_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_out_holding_another_run_is_refused_and_left_alone(tmp_path):
    _train(tmp_path, "olmoe", steps=1)
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(ValueError, match="already holds a run") as e:
        _train(tmp_path, "olmoe", steps=1)
    _only_line(e)
    after = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))
    assert after == before


def test_model_without_moe_layer_is_refused(tmp_path):
    model = tiny("llama_dense")
    trainer = RecordingTrainer(model=model, args=training_args(tmp_path / "hf", steps=1),
                               train_dataset=Windows(model.config.vocab_size, ACCUM * B),
                               callbacks=[TraceCallback(tmp_path / "run")])
    with pytest.raises(ValueError, match="has no MoE layer") as e:
        trainer.train()
    _only_line(e)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(grad_every=2), "grad_every needs two tasks"),
    (dict(kinds=3), "kinds must be a callable"),
    (dict(every=-1), "every must be"),
])
def test_bad_settings_refused_at_construction(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        TraceCallback(tmp_path / "run", **kw)
    _only_line(e)


def test_kinds_column_the_trainer_would_drop_is_refused(tmp_path):
    model = tiny("mixtral")
    args = training_args(tmp_path / "hf", steps=1, remove_unused_columns=True)
    trainer = RecordingTrainer(model=model, args=args,
                               train_dataset=Windows(model.config.vocab_size, ACCUM * B),
                               callbacks=[TraceCallback(tmp_path / "run", kinds="token_type_ids",
                                                        kind_names=["odd", "even"])])
    with pytest.raises(ValueError, match="remove_unused_columns=False") as e:
        trainer.train()
    _only_line(e)
    assert not (tmp_path / "run").exists()


def _online_run(tmp_path, plant: bool):
    """40 steps, online findings every 5 ("stop" on any critical one). ``plant``: every router
    sends its tokens to experts 0 and 1 only, so experts 2 and 3 of each layer really get
    nothing (the model's own routing, not a made-up row): at the nominal C = 1 each of the two
    experts keeps half its picks, a capacity rate of 0.5 — a critical collapse."""
    model = tiny("mixtral")
    if plant:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p[2:] = 0.0
                    p[:2] *= 50.0
    cb = TraceCallback(tmp_path / "run", on_finding="stop", fail_on="any", diagnose_every=5)
    trainer = RecordingTrainer(
        model=model, args=training_args(tmp_path / "hf", steps=40, save_strategy="steps",
                                        save_steps=1000),
        train_dataset=Windows(model.config.vocab_size, 40 * ACCUM * B), callbacks=[cb])
    trainer.train()
    return cb, trainer


def test_an_online_finding_stops_the_trainer_with_store_and_checkpoint_agreeing(tmp_path):
    cb, trainer = _online_run(tmp_path, plant=True)
    stop = trainer.state.global_step
    assert cb.stopped is not None and cb.stopped.step == stop < 40
    f = cb.stopped.finding
    assert f.kind == "routing_collapse" and f.severity == "critical" and f.onset_step <= stop
    assert [p.name for p in (tmp_path / "hf").iterdir()] == [f"checkpoint-{stop}"]
    assert int(open_run(tmp_path / "run").dataset("routing")["step"].values[-1]) == stop
    # Offline diagnosis of the store reports the same finding.
    from moe_probe.diagnose.rundata import load_run
    from moe_probe.diagnose.runner import diagnose_run

    offline = [g for g in diagnose_run(load_run(tmp_path / "run")).findings if g.kind == f.kind]
    assert offline and offline[0].onset_step == f.onset_step


def test_a_healthy_trainer_run_is_not_stopped(tmp_path):
    cb, trainer = _online_run(tmp_path, plant=False)
    assert cb.stopped is None and trainer.state.global_step == 40
