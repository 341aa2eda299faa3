"""TraceSession on the real model and a real store: rows, update equality, hook hygiene."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moe_probe.run import store_path
from moe_probe import open_run
from moe_probe.data import DataConfig, MultimodalData
from moe_probe.modalities import GRAD_COMPONENTS, LOSS_TERMS
from moe_probe.model import ModelConfig, MultimodalMoE
from moe_probe.model.hooks import hooks, layer_hooks
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.config import TraceConfig
from moe_probe.trace.grad import GradConflictTracer, grad_layers
from moe_probe.trace.layout import store_layout
from moe_probe.trace.routing import counter_for
from moe_probe.trace.session import TraceSession

EVAL = ["text_loss", "digit_acc"]


@pytest.fixture(scope="module")
def data():
    return MultimodalData(DataConfig(), 0)


def _model(data, arch="symbiotic", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, d_model=32, n_heads=2, d_expert=32, **kw)
    return MultimodalMoE(cfg, data.tokenizer.vocab_size)


def _hooks(model):
    return sum(len(f.hook_router._forward_hooks) + len(f.hook_shared._forward_hooks)
               for _, f in model.moe_layers())


def _batches(data, n, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return [data.batch("train", size, g) for _ in range(n)]


def _writer(tmp_path, model):
    attrs, coords = store_layout(model, eval_metrics=EVAL)
    return StoreWriter.create(store_path(tmp_path), attrs={"run": {"name": "t"}, **attrs}, coords=coords)


def test_session_writes_every_group_and_leaves_no_hooks(tmp_path, data):
    model = _model(data)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    batches = _batches(data, 6)
    cfg = TraceConfig(grad_every=2, routing_every=1, probe_every=None)
    with TraceSession(model, cfg, _writer(tmp_path, model), data.probe_batch) as s:
        s.on_eval(0, {"text_loss": 7.0, "digit_acc": 0.1}, model)
        for step in range(3):
            s.begin_step(step)
            assert _hooks(model) == len(model.moe_layers())
            for b in batches[2 * step: 2 * step + 2]:
                out = model(b)
                s.backward({k: v / 2 for k, v in out.task_losses.items()}, step)
            s.end_step(step, {k: float(v) for k, v in out.losses.items()})
            assert _hooks(model) == 0
            opt.step()
            opt.zero_grad(set_to_none=True)
        s.on_eval(3, {"text_loss": 6.5}, model)
        assert _hooks(model) == 0
    run = open_run(tmp_path)
    assert run.committed_steps("routing") == 3 and run.committed_steps("loss") == 3
    assert list(run.dataset("grad")["step"].values) == [0, 2]
    assert list(run.dataset("eval")["step"].values) == [0, 3]
    ev = run.dataset("eval")["value"].values
    assert ev[1, 0] == pytest.approx(6.5) and np.isnan(ev[1, 1])  # a missing metric is NaN
    loss = run.dataset("loss")["value"]
    assert list(loss["term"].values) == list(LOSS_TERMS)
    # routing: each step counts 2 micro-batches of valid tokens, per modality
    tok = run.dataset("routing")["tokens"].values
    valid = [int(b.valid_BS.sum()) for b in batches]
    assert tok[0].sum(-1).tolist() == [valid[0] + valid[1]] * 2
    cr = run.dataset("routing")["capacity_rate"].values
    assert np.all((cr > 0) & (cr <= 1))
    snap = run.dataset("snapshot")
    sat = snap["saturation"].values
    assert np.isnan(sat[0]).all() and np.all((sat[1] > 0) & (sat[1] <= 1))
    co = snap["coactivation"].values[1]
    assert np.allclose(np.diagonal(co, axis1=1, axis2=2)[~np.isnan(np.diagonal(co, axis1=1, axis2=2))], 1)
    probe = run.dataset("probe")
    acc = probe["accuracy"].values
    assert acc.shape == (2, 2, 3) and np.isfinite(acc).all() and np.all((acc >= 0) & (acc <= 1))
    np.testing.assert_allclose(probe["selectivity"].values, acc - probe["control_accuracy"].values,
                               atol=1e-6)
    iso = probe["isolated"].values
    assert np.isfinite(iso).all()


def test_hooks_removed_when_a_step_raises(tmp_path, data):
    model = _model(data)
    with pytest.raises(RuntimeError, match="boom"):
        with TraceSession(model, TraceConfig(), _writer(tmp_path, model), data.probe_batch) as s:
            s.begin_step(0)
            assert _hooks(model) > 0
            raise RuntimeError("boom")
    assert _hooks(model) == 0


@pytest.mark.parametrize("arch", ["symbiotic", "moe"])
def test_traced_step_updates_like_an_untraced_step(tmp_path, data, arch):
    base = _model(data, arch=arch)
    base.set_shield(0.1)  # shielding on: the traced gradients must include its scaling
    batches = _batches(data, 2, seed=3)
    params_after = []
    for name, cfg in (("plain", TraceConfig(enabled=False)), ("traced", TraceConfig(grad_every=1))):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with TraceSession(model, cfg, _writer(tmp_path / name, model), data.probe_batch) as s:
            s.begin_step(0)
            for b in batches:  # two micro-batches, as the trainer scales them
                s.backward({k: v / 2 for k, v in model(b).task_losses.items()}, 0)
            s.end_step(0, {})
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        params_after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert open_run(tmp_path / "traced").committed_steps("grad") == 1
    for n, p in params_after[0].items():
        torch.testing.assert_close(params_after[1][n], p, rtol=0, atol=1e-6, msg=n)


def test_grad_row_matches_autograd_on_real_model(data):
    model = _model(data)
    model.set_shield(0.0)
    b = _batches(data, 1, seed=4, size=12)[0]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    tl = model(b).task_losses
    ref = {k: torch.autograd.grad(tl[k], params, retain_graph=True, allow_unused=True) for k in ("und", "gen")}
    tracer = GradConflictTracer(model)
    tracer.backward(model(b).task_losses)
    row = tracer.finish()
    comps = model.param_components()
    layers = grad_layers(model)
    for li, layer in enumerate(layers):
        for ci, comp in enumerate(GRAD_COMPONENTS):
            sel = [i for i, n in enumerate(names) if comps[n][1] == comp and (layer == "all" or comps[n][0] == layer)]
            if not sel:
                assert np.isnan(row["norm_und"][li, ci])
                continue
            flat = {k: torch.cat([(ref[k][i] if ref[k][i] is not None else torch.zeros_like(params[i])).flatten()
                                  for i in sel]).double() for k in ref}
            nu, ng = flat["und"].norm().item(), flat["gen"].norm().item()
            np.testing.assert_allclose(row["norm_und"][li, ci], nu, rtol=1e-4, atol=1e-9)
            np.testing.assert_allclose(row["norm_gen"][li, ci], ng, rtol=1e-4, atol=1e-9)
            if nu > 0 and ng > 0:
                np.testing.assert_allclose(row["cosine"][li, ci], (flat["und"] @ flat["gen"]).item() / (nu * ng),
                                           atol=1e-5)
            else:
                assert np.isnan(row["cosine"][li, ci])
    # full shielding: vae tokens send no gradient into the shared experts of the last layer,
    # whose output reaches the gen loss only through vae tokens themselves
    last = layers.index(str(len(model.moe_layers()) - 1))
    assert row["norm_gen"][last, list(GRAD_COMPONENTS).index("shared")] == 0


def test_capacity_layer_kept_matches_records(data):
    model = _model(data, arch="moe", capacity_factor=1.0)
    seen = []
    for _, f in model.moe_layers():
        f.hook_router.register_forward_hook(lambda _m, a, _o: seen.append(a[0]))
    counter = counter_for(model)
    b = _batches(data, 1, seed=5, size=16)[0]
    with hooks(model, layer_hooks(model, "hook_router", counter.add)):
        model(b)
    row = counter.finish()
    for li, r in enumerate(seen):
        assert r.kept_TK is not None
        for m in range(3):
            sel = r.modality_T == m
            assert row["kept"][li, m] == pytest.approx(float(r.kept_TK[sel].sum()))
            assert row["tokens"][li, m] == int(sel.sum())
        assert row["kept"][li].sum() < row["load"][li].sum()  # C=1 drops something here


def _steps(model, session, batches, steps):
    for step in steps:
        session.begin_step(step)
        out = model(batches[step % len(batches)])
        session.backward(out.task_losses, step)
        session.end_step(step, {k: float(v.detach()) for k, v in out.losses.items()})
        model.zero_grad(set_to_none=True)


def test_rates_disabled_tracing_and_final_probe(tmp_path, data):
    model = _model(data)
    batches = _batches(data, 2)
    cfg = TraceConfig(routing_every=2, grad_every=3, probe_every=100, snapshot=False)
    with TraceSession(model, cfg, _writer(tmp_path / "a", model), data.probe_batch) as s:
        _steps(model, s, batches, range(5))
        s.on_eval(2, {}, model)             # first eval: probes (none done yet)
        s.on_eval(4, {}, model)             # 2 < probe_every steps later: no probe
        s.on_eval(5, {}, model, final=True)  # the end: probes regardless
    run = open_run(tmp_path / "a")
    assert list(run.dataset("routing")["step"].values) == [0, 2, 4]
    assert list(run.dataset("grad")["step"].values) == [0, 3]
    assert list(run.dataset("probe")["step"].values) == [2, 5]
    assert run.committed_steps("snapshot") == 0

    off = TraceConfig(enabled=False)
    with TraceSession(model, off, _writer(tmp_path / "b", model), data.probe_batch) as s:
        _steps(model, s, batches, range(2))
        assert _hooks(model) == 0
        s.on_eval(2, {"text_loss": 1.0}, model)
    run = open_run(tmp_path / "b")
    assert run.committed_steps("loss") == 2 and run.committed_steps("eval") == 1
    assert all(run.committed_steps(g) == 0 for g in ("routing", "grad", "probe", "snapshot"))


def test_layout_without_shared_experts_has_no_probe_group(tmp_path, data):
    model = _model(data, arch="moe", n_shared=0)
    attrs, coords = store_layout(model, eval_metrics=EVAL)
    assert "probe" not in coords and attrs["model"]["shared_experts"] == 0
    assert coords["grad"]["layer"] == ["0", "1", "all"]
    with TraceSession(model, TraceConfig(), _writer(tmp_path, model), data.probe_batch) as s:
        _steps(model, s, _batches(data, 1), range(1))
        s.on_eval(1, {"text_loss": 2.0, "digit_acc": 0.5}, model)
    run = open_run(tmp_path)
    assert "probe" not in run.groups and run.committed_steps("snapshot") == 1
    assert run.attrs["model"]["experts"] == 8


def test_abandoned_step_does_not_leak_into_the_next_row(tmp_path, data):
    model = _model(data)
    b = _batches(data, 1)[0]
    with TraceSession(model, TraceConfig(grad_every=1), _writer(tmp_path, model), data.probe_batch) as s:
        s.begin_step(0)
        model(b)  # counted, then the step is abandoned (no backward, no end_step)
        _steps(model, s, [b], [0])
    tok = open_run(tmp_path).dataset("routing")["tokens"].values
    assert tok[0].sum(-1).tolist() == [int(b.valid_BS.sum())] * 2
