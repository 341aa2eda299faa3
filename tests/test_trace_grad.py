"""Gradient-conflict tracer vs per-task torch.autograd.grad computed directly, on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moe_probe.modalities import GRAD_COMPONENTS
from moe_probe.trace import grad as grad_mod
from moe_probe.trace.grad import GradConflictTracer, plain_backward


class TwoTaskNet(nn.Module):
    """Two layers; `und` and `gen` losses share attn/shared/norm, `experts` is und-only in layer 0
    and gen-only in layer 1 (so one task's gradient there is exactly zero)."""

    def __init__(self, d=6):
        super().__init__()
        self.emb = nn.Linear(d, d)
        self.attn = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.shared = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))

    def moe_layers(self):
        return [("0", None), ("1", None)]

    def param_components(self):
        out = {}
        for name, _ in self.named_parameters():
            head = name.split(".")[0]
            if head not in ("emb", "attn", "shared", "experts", "norm"):
                continue
            out[name] = ("io", "norm") if head == "emb" else (name.split(".")[1], head)
        return out

    def task_losses(self, x_und, x_gen):
        hu, hg = self.emb(x_und), self.emb(x_gen)
        for i in range(2):
            hu = self.norm[i](hu + torch.tanh(self.attn[i](hu)) + self.shared[i](hu))
            hg = self.norm[i](hg + torch.tanh(self.attn[i](hg)) + 0.5 * self.shared[i](hg))
            if i == 0:
                hu = hu + self.experts[i](hu)
            else:
                hg = hg + self.experts[i](hg)
        return {"und": hu.square().mean(), "gen": (hg - 1).square().mean()}


def _cells(model):
    comps = model.param_components()
    return {n: comps[n] for n, _ in model.named_parameters()}


def _reference(model, micro):
    """cos / norms per (layer, component) from autograd.grad of each task, summed over micro-batches."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    und = [torch.zeros_like(p) for p in params]
    gen = [torch.zeros_like(p) for p in params]
    for xu, xg in micro:
        tl = model.task_losses(xu, xg)
        for acc, key in ((und, "und"), (gen, "gen")):
            gs = torch.autograd.grad(tl[key], params, allow_unused=True)
            for a, g in zip(acc, gs):
                if g is not None:
                    a += g
    cells = _cells(model)
    ref = {}
    for layer in ("0", "1", "all"):
        for comp in GRAD_COMPONENTS:
            sel = [i for i, n in enumerate(names)
                   if cells[n][1] == comp and (layer == "all" or cells[n][0] == layer)]
            if not sel:
                ref[layer, comp] = (np.nan, np.nan, np.nan)
                continue
            u = torch.cat([und[i].flatten() for i in sel]).double()
            g = torch.cat([gen[i].flatten() for i in sel]).double()
            nu, ng = u.norm().item(), g.norm().item()
            cos = (u @ g).item() / (nu * ng) if nu > 0 and ng > 0 else np.nan
            ref[layer, comp] = (cos, nu, ng)
    return ref


def _micro(seed, n=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(7, 6, generator=g)) for _ in range(n)]


@pytest.mark.parametrize("n_micro", [1, 2])
@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("piece", [None, 5])
def test_cosines_match_autograd_per_task_over_micro_batches(monkeypatch, n_micro, last, piece):
    """Every path of the fused pass: one or two micro-batches, the totals kept or only their sums
    (``last``), each parameter one piece or several (5 elements: uneven pieces of 36 and 6)."""
    if piece is not None:
        monkeypatch.setitem(grad_mod._PIECE, "cpu", piece)
    torch.manual_seed(0)
    model = TwoTaskNet()
    micro = _micro(1, n=n_micro)
    ref = _reference(model, micro)
    tracer = GradConflictTracer(model)
    model.zero_grad(set_to_none=True)
    for i, (xu, xg) in enumerate(micro):
        tracer.backward(model.task_losses(xu, xg), last=last and i == len(micro) - 1)
    if last:
        with pytest.raises(ValueError, match="last micro-batch"):
            tracer.backward(model.task_losses(*micro[0]))
    row = tracer.finish()
    layers = ["0", "1", "all"]
    for li, layer in enumerate(layers):
        for ci, comp in enumerate(GRAD_COMPONENTS):
            cos, nu, ng = ref[layer, comp]
            np.testing.assert_allclose(row["cosine"][li, ci], cos, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{layer}/{comp}")
            np.testing.assert_allclose(row["norm_und"][li, ci], nu, rtol=1e-5, err_msg=f"{layer}/{comp}")
            np.testing.assert_allclose(row["norm_gen"][li, ci], ng, rtol=1e-5, err_msg=f"{layer}/{comp}")
    C = list(GRAD_COMPONENTS)
    # layer 0 experts: gen gradient exactly zero -> NaN cosine, norm 0; absent components NaN
    assert np.isnan(row["cosine"][0, C.index("experts")]) and row["norm_gen"][0, C.index("experts")] == 0
    assert np.isnan(row["norm_und"][0, C.index("router")])
    # io params appear only in `all`: all/norm has more gradient than the sum of the layer norms
    assert row["norm_und"][2, C.index("norm")] ** 2 > (row["norm_und"][0, C.index("norm")] ** 2
                                                        + row["norm_und"][1, C.index("norm")] ** 2) + 1e-12
    # the cosines are not all trivially ±1 (the two tasks really differ)
    finite = row["cosine"][np.isfinite(row["cosine"])]
    assert np.any(np.abs(finite) < 0.999)


def test_grad_equals_plain_backward_and_prior_grad_is_kept():
    torch.manual_seed(0)
    model = TwoTaskNet()
    micro = _micro(2, n=3)
    prior = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def run(traced):
        for n, p in model.named_parameters():
            p.grad = prior[n].clone()
        tracer = GradConflictTracer(model)
        for i, (xu, xg) in enumerate(micro):
            tl = model.task_losses(xu, xg)
            tracer.backward(tl, last=i == len(micro) - 1) if traced else plain_backward(tl)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, traced = run(False), run(True)
    for n in plain:  # bit-identical: the traced step's second pass IS the untraced backward
        assert torch.equal(traced[n], plain[n]), n


def test_a_task_missing_from_the_first_micro_batch_counts_as_zero_there(monkeypatch):
    """First micro-batch und only, second both (the last): gen's total is the second's alone."""
    monkeypatch.setitem(grad_mod._PIECE, "cpu", 5)
    torch.manual_seed(0)
    model = TwoTaskNet()
    micro = _micro(4, n=2)
    tracer = GradConflictTracer(model)
    first = model.task_losses(*micro[0])
    tracer.backward({"und": first["und"], "gen": torch.zeros(())})
    tracer.backward(model.task_losses(*micro[1]), last=True)
    row = tracer.finish()
    params = [p for _, p in model.named_parameters()]

    def flat_grad(loss):
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if x is None else x).flatten()
                          for x, p in zip(gs, params)]).double()

    u = flat_grad(model.task_losses(*micro[0])["und"]) + flat_grad(model.task_losses(*micro[1])["und"])
    g = flat_grad(model.task_losses(*micro[1])["gen"])
    C, all_row = list(GRAD_COMPONENTS), 2
    # layer `all` summed over components: the whole model's norms
    np.testing.assert_allclose(np.sqrt(np.nansum(row["norm_und"][all_row] ** 2)), u.norm().item(), rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(np.nansum(row["norm_gen"][all_row] ** 2)), g.norm().item(), rtol=1e-5)
    assert np.isfinite(row["cosine"][all_row, C.index("attn")])


PATTERNS = {"both,both": ("ug", "ug"), "und,both": ("u", "ug"), "gen,both": ("g", "ug"),
            "both,und": ("ug", "u"), "both,gen": ("ug", "g"), "gen,und": ("g", "u"),
            "und,und,both": ("u", "u", "ug")}


class Transposed(TwoTaskNet):
    """A float64 copy whose `shared` weights are transposed views (non-contiguous gradients)."""

    def __init__(self):
        super().__init__()
        self.double()
        for lin in self.shared:
            lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())
        assert not self.shared[0].weight.is_contiguous()


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("model_cls", [TwoTaskNet, Transposed], ids=["float32", "float64-strided"])
def test_tasks_missing_from_some_micro_batches(monkeypatch, pattern, last, model_cls):
    """A micro-batch may carry one task only (alternating task batches): each task's total is the
    sum over the micro-batches that have it, whatever the order (5-element pieces: every path of
    the fused pass, with uneven pieces), for float32 and for float64 non-contiguous parameters."""
    monkeypatch.setitem(grad_mod._PIECE, "cpu", 5)
    torch.manual_seed(0)
    model = model_cls()
    dtype = next(model.parameters()).dtype
    tasks = PATTERNS[pattern]
    micro = [(xu.to(dtype), xg.to(dtype)) for xu, xg in _micro(5, n=len(tasks))]
    params = [p for _, p in model.named_parameters()]
    names = [n for n, _ in model.named_parameters()]
    tracer = GradConflictTracer(model)
    for i, ((xu, xg), has) in enumerate(zip(micro, tasks)):
        tl = model.task_losses(xu, xg)
        tracer.backward({t: (tl[t] if t[0] in has else torch.zeros((), dtype=dtype))
                         for t in ("und", "gen")}, last=last and i == len(tasks) - 1)
    row = tracer.finish()

    def total(task):
        acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for (xu, xg), has in zip(micro, tasks):
            if task[0] in has:
                gs = torch.autograd.grad(model.task_losses(xu, xg)[task], params, allow_unused=True)
                for a, x in zip(acc, gs):
                    if x is not None:
                        a += x.double()
        return acc

    und, gen = total("und"), total("gen")
    cells = _cells(model)
    for li, layer in enumerate(("0", "1", "all")):
        for ci, comp in enumerate(GRAD_COMPONENTS):
            sel = [i for i, n in enumerate(names)
                   if cells[n][1] == comp and (layer == "all" or cells[n][0] == layer)]
            if not sel:
                continue
            u = torch.cat([und[i].flatten() for i in sel])
            g = torch.cat([gen[i].flatten() for i in sel])
            nu, ng = u.norm().item(), g.norm().item()
            np.testing.assert_allclose(row["norm_und"][li, ci], nu, rtol=1e-5, err_msg=f"{layer}/{comp}")
            np.testing.assert_allclose(row["norm_gen"][li, ci], ng, rtol=1e-5, err_msg=f"{layer}/{comp}")
            if nu > 0 and ng > 0:
                np.testing.assert_allclose(row["cosine"][li, ci], (u @ g).item() / (nu * ng),
                                           rtol=1e-5, atol=1e-6, err_msg=f"{layer}/{comp}")
            else:
                assert np.isnan(row["cosine"][li, ci]), f"{layer}/{comp}"
    assert np.isfinite(row["cosine"]).any()


def test_missing_gen_loss_gives_nan_cosine():
    model = TwoTaskNet()
    tracer = GradConflictTracer(model)
    xu, xg = _micro(3, n=1)[0]
    tl = model.task_losses(xu, xg)
    tracer.backward({"und": tl["und"], "gen": torch.zeros(())})  # und_only: gen has no graph
    row = tracer.finish()
    assert np.isnan(row["cosine"]).all()
    assert np.nanmax(row["norm_und"]) > 0 and np.nanmax(row["norm_gen"]) == 0


def test_parameter_missing_from_components_is_an_error():
    model = TwoTaskNet()
    model.extra = nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="extra"):
        GradConflictTracer(model)
