"""``moe_probe.watch`` around plain PyTorch loops: counts equal the model's own router decisions,
the traced update equals the untraced one bit for bit, bad input is one line, hooks always go.

The reference side never touches moe_probe's capture code: it reads ``output_router_logits`` of
the very forward that trains (Mixtral: picks = top-k of softmax(logits)).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

import moe_probe  # noqa: E402
from moe_probe import open_run  # noqa: E402
from moe_probe.hf.loading import encode, load_model  # noqa: E402
from moe_probe.model.hooks import hooks, layer_hooks  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"
B, S, ACCUM, STEPS = 2, 16, 2, 3


def _mixtral(seed=0):
    model, _, _ = load_model(str(FIX / "mixtral.json"), seed=seed)
    with torch.no_grad():  # transformers installs its own (lasting) output-capturing hooks here
        model(input_ids=torch.ones(1, 2, dtype=torch.long), output_router_logits=True)
    return model.train()


def _windows(V, n, seed=0):
    """``n`` (B, S) micro-batches of the bundled text (Python's pydoc topics), word-hashed ids."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics)[:40])
    ids = torch.tensor(encode(text, None, V)[: n * B * S]).view(n, B, S)
    return list(ids[torch.randperm(n, generator=torch.Generator().manual_seed(seed))])


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _code_mask(ids_BS):
    """The second kind: tokens with an even id (a token-type mask the loop could have)."""
    return ids_BS % 2 == 0


@pytest.mark.parametrize("checkpointing", [None, False, True],
                         ids=["plain", "grad-checkpointing", "reentrant-checkpointing"])
def test_hf_counts_per_step_layer_and_kind_equal_the_models_router_logits(tmp_path, checkpointing):
    """Activation checkpointing recomputes each layer's forward in backward: counted once. The
    reentrant kind also runs each layer's first forward under no_grad, inside a forward that
    builds a graph: counted (decided at the model's forward, not per router call)."""
    model = _mixtral()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    k, E, L = model.config.num_experts_per_tok, model.config.num_local_experts, 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    micro = _windows(model.config.vocab_size, STEPS * ACCUM)
    ref = np.zeros((STEPS, L, 2, E), dtype=np.int64)
    before = _n_hooks(model)
    with moe_probe.watch(model, tmp_path / "run", kind_names=["text", "code"],
                         kinds=lambda input_ids, **_: _code_mask(input_ids)) as w:
        assert _n_hooks(model) > before
        for step in range(STEPS):
            for i in range(ACCUM):
                ids = micro[step * ACCUM + i]
                out = model(input_ids=ids, labels=ids, output_router_logits=True)
                kind_T = _code_mask(ids).reshape(-1).long()
                for li, logits in enumerate(out.router_logits):
                    picks_TK = torch.softmax(logits.detach().float(), -1).topk(k, -1).indices
                    for kind in (0, 1):
                        ref[step, li, kind] += np.bincount(picks_TK[kind_T == kind].reshape(-1).numpy(),
                                                           minlength=E)
                w.backward(out.loss / ACCUM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.eval()  # an evaluation forward between steps is not counted
            with torch.no_grad():
                model(input_ids=micro[0])
            model.train()
            with torch.no_grad():  # nor a train-mode one for metrics or generation (as TRL's)
                model(input_ids=micro[0])
            w.step(step, losses={"total": out.loss.item(), "aux": out.aux_loss.item()})
    assert _n_hooks(model) == before
    run = open_run(tmp_path / "run")
    r = run.dataset("routing")
    assert list(r["step"].values) == list(range(STEPS))
    assert list(r["modality"].values) == ["text", "code"]
    np.testing.assert_array_equal(r["load"].values, ref)
    # every token once per layer, in its kind; picks spread (a degenerate router proves nothing)
    np.testing.assert_array_equal(r["tokens"].values * k, ref.sum(-1))
    assert (r["tokens"].values.sum(-1) == ACCUM * B * S).all()
    assert ((ref.sum(2) > 0).sum(-1) == E).all() and (ref[:, :, 1].sum(-1) > 0).all()
    assert np.all(r["capacity_rate"].values > 0) and np.all(r["capacity_rate"].values <= 1)
    loss = run.dataset("loss")
    assert np.isfinite(loss["value"].sel(term="total").values).all()
    assert np.isnan(loss["value"].sel(term="lm").values).all()
    assert run.attrs["run"]["recipe"] == "watch" and run.attrs["modalities"] == ["text", "code"]
    assert run.attrs["model"]["nominal_capacity"] == 1.0 and "grad" not in run.groups


def test_labels_per_forward_sampled_steps_and_uncounted_tokens(tmp_path):
    """``w.kinds`` per forward with per-sample labels and -1 (padding), ``every=2``."""
    model = _mixtral()
    micro = _windows(model.config.vocab_size, 4)
    with moe_probe.watch(model, tmp_path / "run", kind_names=["a", "b"], every=2) as w:
        for step in range(4):
            labels = torch.tensor([[1] * (S - 4) + [-1] * 4, [0] * S])  # 4 pad positions: not counted
            w.kinds(labels if step % 2 == 0 else torch.zeros(7))  # unsampled step: nothing read
            out = model(input_ids=micro[step], labels=micro[step])
            w.backward(out.loss)
            w.step(step)
    r = open_run(tmp_path / "run").dataset("routing")
    assert list(r["step"].values) == [0, 2]
    np.testing.assert_array_equal(r["tokens"].values[:, 0], [[S, S - 4]] * 2)


def _own(data, arch="symbiotic"):
    from moe_probe.model import ModelConfig, MultimodalMoE

    torch.manual_seed(0)
    return MultimodalMoE(ModelConfig(arch=arch, d_model=32, n_heads=2, d_expert=32),
                         data.tokenizer.vocab_size)


@pytest.fixture(scope="module")
def data():
    from moe_probe.data import DataConfig, MultimodalData

    return MultimodalData(DataConfig(), 0)


@pytest.mark.parametrize("labelled", [False, True], ids=["modalities", "sample-kinds"])
def test_own_model_in_a_plain_loop(tmp_path, data, labelled):
    """moe_probe's model: its own text / vit / vae, or kinds per sample (LM, MMU, T2I) given
    through a callable on the batch; pads never count."""
    model = _own(data)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [data.batch("train", 6, g) for _ in range(2 * ACCUM)]
    L, E = len(model.moe_layers()), model.moe_layers()[0][1].routing_info().n_experts
    kw = dict(kind_names=["lm", "mmu", "t2i"], kinds=lambda batch: batch.kind_B) if labelled else {}
    M = 3
    ref = np.zeros((2, L, M, E), dtype=np.int64)
    seen = []
    with moe_probe.watch(model, tmp_path / "run", **kw) as w, \
            hooks(model, layer_hooks(model, "hook_router", lambda li, rec: seen.append((li, rec)))):
        for step in range(2):
            for b in batches[step * ACCUM:(step + 1) * ACCUM]:
                seen.clear()
                out = model(b)
                kind_T = (b.kind_B[:, None].expand_as(b.valid_BS)[b.valid_BS] if labelled
                          else b.modality_BS[b.valid_BS])
                for li, rec in seen:
                    for m in range(M):
                        ref[step, li, m] += np.bincount(rec.topk_ids_TK[kind_T == m].reshape(-1).numpy(),
                                                        minlength=E)
                w.backward(out.task_losses)
            opt.step()
            opt.zero_grad(set_to_none=True)
            w.step(step, losses={k: float(v) for k, v in out.losses.items()})
    run = open_run(tmp_path / "run")
    r = run.dataset("routing")
    assert list(r["modality"].values) == (["lm", "mmu", "t2i"] if labelled else ["text", "vit", "vae"])
    np.testing.assert_array_equal(r["load"].values, ref)
    assert (ref[:, :, :2].sum(-1) > 0).all()
    assert np.isfinite(run.dataset("loss")["value"].values).all()


def _two_task_losses(model, ids):
    """Two tasks of one batch: next-token loss on the first sample (und) and the second (gen)."""
    from moe_probe.hf.capture import lm_loss

    logits = model(input_ids=ids).logits
    return {"und": lm_loss(logits[:1], ids[:1]), "gen": lm_loss(logits[1:], ids[1:])}


def test_grad_conflict_update_is_bit_identical_to_untraced(tmp_path):
    base = _mixtral()
    micro = _windows(base.config.vocab_size, STEPS * ACCUM, seed=1)
    params = {}
    for name in ("plain", "traced"):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        w = (moe_probe.watch(model, tmp_path / name, grad_every=2, tasks=("und", "gen"))
             if name == "traced" else None)
        for step in range(STEPS):
            for i in range(ACCUM):
                losses = {k: v / ACCUM for k, v in _two_task_losses(model, micro[step * ACCUM + i]).items()}
                if w is None:
                    (losses["und"] + losses["gen"]).backward()
                else:
                    w.backward(losses)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if w is not None:
                w.step(step)
        if w is not None:
            w.close()
        params[name] = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(params["plain"], base.parameters()))
    for a, b in zip(params["plain"], params["traced"]):
        assert torch.equal(a, b)
    grad = open_run(tmp_path / "traced").dataset("grad")
    assert list(grad["step"].values) == [0, 2]
    assert list(grad["layer"].values) == ["0", "1", "all"]
    cos = grad["cosine"].sel(layer="all").values
    for comp in ("attn", "router", "experts", "norm"):
        c = grad["cosine"].sel(layer="all", component=comp).values
        assert np.isfinite(c).all() and (np.abs(c) <= 1).all(), comp
    assert np.isnan(grad["cosine"].sel(layer="0", component="und_experts").values).all()
    assert np.isfinite(cos).any()


def _one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
    dense, _, _ = load_model(str(FIX / "llama_dense.json"))
    _one_line_value_error(lambda: moe_probe.watch(dense, tmp_path / "a"), "no MoE layer")
    _one_line_value_error(lambda: moe_probe.watch(torch.nn.Linear(4, 4), tmp_path / "a"), "no MoE layer")
    model = _mixtral()
    _one_line_value_error(lambda: moe_probe.watch(model, tmp_path / "a", grad_every=2), "two tasks")
    _one_line_value_error(lambda: moe_probe.watch(model, tmp_path / "a", grad_every=2, tasks=("und",)),
                          "two tasks")
    _one_line_value_error(lambda: moe_probe.watch(model, tmp_path / "a", kinds=torch.zeros(2, S)),
                          "callable")
    assert not (tmp_path / "a").exists()

    ids = _windows(model.config.vocab_size, 1)[0]
    with moe_probe.watch(model, tmp_path / "run", kind_names=["x", "y"]) as w:
        w.kinds(torch.zeros(B, S - 1, dtype=torch.long))
        _one_line_value_error(lambda: model(input_ids=ids), r"labels of shape \(2, 15\)")
        w.kinds(torch.full((B, S), 2))
        _one_line_value_error(lambda: model(input_ids=ids), "kind id in")
        w.kinds(torch.rand(B, S))
        _one_line_value_error(lambda: model(input_ids=ids), "integer kind ids")
        out = model(input_ids=ids, labels=ids)
        _one_line_value_error(lambda: w.step(0, losses={"mystery": 1.0}), "mystery")
        _one_line_value_error(lambda: w.step(1), "step 0 is open")
    before = _files(tmp_path / "run")
    _one_line_value_error(lambda: moe_probe.watch(model, tmp_path / "run"), "already holds a run")
    assert _files(tmp_path / "run") == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    _one_line_value_error(lambda: moe_probe.watch(model, tmp_path / "other"), "not empty")
    assert _files(tmp_path / "other") == {"notes.txt": b"mine"}

    with moe_probe.watch(model, tmp_path / "g", grad_every=1, tasks=("und", "gen")) as w:
        _one_line_value_error(lambda: w.backward(out.loss), "two task")
        _one_line_value_error(lambda: w.backward({"und": out.loss, "lm": out.loss}), "expected the tasks")
    with moe_probe.watch(model, tmp_path / "last") as w:  # refused at any step, not only a grad step
        w.backward(model(input_ids=ids, labels=ids).loss, last=True)
        _one_line_value_error(lambda: w.backward(model(input_ids=ids, labels=ids).loss),
                              "last micro-batch")
        w.step(0)
        w.backward(model(input_ids=ids, labels=ids).loss, last=True)  # a new step: fine
    assert json.loads(open_run(tmp_path / "g").attrs["run"]["config"])["tasks"] == ["und", "gen"]


@pytest.mark.parametrize("kind", ["hf", "own"])
def test_hooks_removed_after_an_exception(tmp_path, data, kind):
    model = _mixtral() if kind == "hf" else _own(data)
    before = _n_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with moe_probe.watch(model, tmp_path / "run", kinds=lambda *a, **k: None,
                             grad_every=1, tasks=("und", "gen")):
            assert _n_hooks(model) > before
            raise RuntimeError("boom")
    assert _n_hooks(model) == before
    assert open_run(tmp_path / "run").committed_steps("routing") == 0


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    """The README's plain-loop quickstart, as written (run from the repository root)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Tracing your own training loop"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixtures").symlink_to(FIX.parent)
    exec(compile(code, "README.md", "exec"), {})
    r = open_run(tmp_path / "runs" / "my-ft").dataset("routing")
    assert list(r["step"].values) == list(range(10)) and list(r["modality"].values) == ["text", "code"]
    assert (r["tokens"].values.sum(-1) == 2 * 4 * 64).all()
