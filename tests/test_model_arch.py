"""Whole model: parameter counts, task-loss split, records and hooks, masks, tags, shielding."""

import pytest
import torch

from moe_probe.model.params import n_params

from moe_probe.data import DataConfig, MultimodalData
from moe_probe.model import ModelConfig, MultimodalMoE
from moe_probe.model.block import attention_mask
from moe_probe.modalities import GRAD_COMPONENTS, MODALITIES, VAE

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_experts=8, n_shared=1, d_expert=16, top_k=2)


@pytest.fixture(scope="module")
def data():
    return MultimodalData(DataConfig(vocab_words=200), seed=0)


@pytest.fixture(scope="module")
def batch(data):
    return data.batch("train", 12, torch.Generator().manual_seed(0))


def build(data, seed=0, **kw):
    torch.manual_seed(seed)
    return MultimodalMoE(ModelConfig(**{**TINY, **kw}), data.tokenizer.vocab_size)


def test_parameter_counts(data):
    moe = build(data, arch="moe")
    for groups in (None, ((0, 1, 2, 3, 4, 5), (7, 6, 5, 4, 3, 2)), ((0,), (7,))):
        sym = build(data, arch="symbiotic", groups=groups, top_k=1)
        assert n_params(sym) == n_params(moe)
    mot = build(data, arch="mot")
    # the gen tower duplicates each layer's attention, norms, router, experts, shared experts
    per_layer = sum(p.numel() for layer in moe.layers for p in layer.parameters())
    assert n_params(mot) == n_params(moe) + per_layer


@pytest.mark.parametrize("arch", ["moe", "mot", "symbiotic"])
@pytest.mark.parametrize("cap", [None, 1.0])
def test_forward_backward_and_exact_task_split(data, batch, arch, cap):
    m = build(data, arch=arch, capacity_factor=cap, aux_weight=0.3, z_weight=0.1, img_weight=2.0)
    out = m(batch)
    L = out.losses
    assert torch.equal(out.task_losses["und"] + out.task_losses["gen"], L["total"])
    c = m.cfg
    weighted = (c.ntp_weight * (L["lm"] + L["mmu"]) + c.img_weight * L["gen"]
                + c.aux_weight * L["aux"] + c.z_weight * L["z"])
    assert torch.allclose(L["total"], weighted, rtol=1e-6)
    assert all(torch.isfinite(v) for v in L.values())
    L["total"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []


def test_losses_match_records_and_independent_ce(data, batch):
    m = build(data, arch="symbiotic", capacity_factor=1.0)
    recs = {}
    for name, ffn in m.moe_layers():
        ffn.hook_router.register_forward_hook(lambda mod, a, o, name=name: recs.setdefault(name, []).append(a[0]))
    out = m(batch)
    assert all(len(v) == 1 for v in recs.values()) and len(recs) == TINY["n_layers"]
    valid = batch.valid_BS
    aux_und = aux_gen = z_und = z_gen = 0.0
    for (name, ffn) in m.moe_layers():
        r = recs[name][0]
        assert len(r.modality_T) == int(valid.sum())  # pads excluded
        assert torch.equal(r.modality_T, batch.modality_BS[valid])
        lse2 = torch.logsumexp(r.logits_TE, -1).square() / len(r.modality_T)
        is_gen = r.modality_T == VAE
        groups = ffn.routing_info().groups
        assert torch.isin(r.topk_ids_TK[is_gen], torch.tensor(groups["gen"])).all()
        assert torch.isin(r.topk_ids_TK[~is_gen], torch.tensor(groups["und"])).all()
        assert r.kept_TK is not None and r.kept_TK.shape == r.topk_ids_TK.shape
        z_und, z_gen = z_und + lse2[~is_gen].sum(), z_gen + lse2[is_gen].sum()
        for g, ids in ffn.routing_info().groups.items():
            sel = is_gen if g == "gen" else ~is_gen
            probs = r.logits_TE[sel][:, list(ids)].softmax(-1)
            f = torch.stack([(r.topk_ids_TK[sel] == e).sum() for e in ids]).float() / (2 * sel.sum())
            part = len(ids) * (f * probs.mean(0)).sum()
            if g == "gen":
                aux_gen += part
            else:
                aux_und += part
    L = len(recs)
    assert torch.allclose(out.losses["aux"], (aux_und + aux_gen) / L, atol=1e-6)
    assert torch.allclose(out.losses["z"], (z_und + z_gen) / L, atol=1e-6)
    c = m.cfg
    und_expect = out.losses["lm"] + out.losses["mmu"] + c.aux_weight * aux_und / L + c.z_weight * z_und / L
    assert torch.allclose(out.task_losses["und"], und_expect, atol=1e-6)
    # CE on LM positions, independently
    logits = out.lm_logits_BSV
    sel = batch.lm_kind_BS == 1
    lm = torch.nn.functional.cross_entropy(logits[sel], batch.lm_targets_BS[sel])
    assert torch.allclose(out.losses["lm"], lm)
    vae = batch.modality_BS == VAE
    gen = ((out.velocity_BSP[vae] - (batch.noise_BSP - batch.patches_BSP)[vae]) ** 2).mean()
    assert torch.allclose(out.losses["gen"], gen)


def test_routing_info_and_shared_hook(data, batch):
    m = build(data, arch="mot")
    for name, ffn in m.moe_layers():
        info = ffn.routing_info()
        assert info.n_experts == 16 and info.groups == {"und": tuple(range(8)), "gen": tuple(range(8, 16))}
        assert info.modality_group == {"text": "und", "vit": "und", "vae": "gen"}
    sym = build(data, arch="symbiotic", groups=((1, 3, 5, 7, 0, 2), (0, 1, 2, 3, 4, 5)))
    info = sym.moe_layers()[0][1].routing_info()
    assert info.groups == {"und": (0, 1, 2, 3, 5, 7), "gen": (4, 6)}
    moe = build(data, arch="moe")
    info = moe.moe_layers()[1][1].routing_info()
    assert info.groups == {"all": tuple(range(8))} and set(info.modality_group) == set(MODALITIES)
    shared = []
    moe.moe_layers()[0][1].hook_shared.register_forward_hook(lambda mod, a, o: shared.append(a[0]))
    moe(batch)
    assert shared[0].shape == (int(batch.valid_BS.sum()), TINY["d_model"])


def test_mask_routed_equals_zeroed_routed_experts(data, batch):
    m = build(data, arch="symbiotic")
    masked = m(batch, mask_routed=True)
    with torch.no_grad():
        for _, ffn in m.moe_layers():
            for g in ffn.groups.values():
                g.experts.w2_EDF.zero_()
    zeroed = m(batch)
    assert torch.allclose(masked.lm_logits_BSV, zeroed.lm_logits_BSV, atol=1e-6)
    assert torch.allclose(masked.velocity_BSP, zeroed.velocity_BSP, atol=1e-6)


def test_attention_mask_causal_plus_image_blocks():
    mod = torch.tensor([[0, 1, 1, 1, 0, 0, 2, 2, 0]])
    m = attention_mask(mod)[0, 0]
    expect = torch.ones(9, 9).tril().bool()
    expect[1:4, 1:4] = True
    expect[6:8, 6:8] = True
    assert torch.equal(m, expect)


def test_attention_behaviour(data, batch):
    m = build(data, arch="moe")
    i = int((batch.kind_B == 2).nonzero()[0])
    b = batch.select([i])
    out = m(b).velocity_BSP
    pos = (b.modality_BS[0] == VAE).nonzero().flatten()
    b2 = b.select([0])
    b2.noise_BSP[0, pos[-1]] += 1.0  # last patch changes -> first patch sees it (bidirectional)
    out2 = m(b2).velocity_BSP
    assert not torch.allclose(out2[0, pos[0]], out[0, pos[0]])
    assert torch.allclose(out2[0, : pos[0]], out[0, : pos[0]])  # text before the image: causal


def test_param_components_and_groups_cover_each_parameter_once(data):
    for arch in ("moe", "mot", "symbiotic"):
        m = build(data, arch=arch)
        names = [n for n, _ in m.named_parameters()]
        comps = m.param_components()
        assert sorted(comps) == sorted(names)
        assert {c for _, c in comps.values()} <= set(GRAD_COMPONENTS)
        layers = {layer for layer, _ in comps.values()}
        assert layers == {"io"} | {str(i) for i in range(TINY["n_layers"])}
        groups = m.param_groups()
        flat = [n for v in groups.values() for n in v]
        assert sorted(flat) == sorted(names)
        assert groups["gen_io"] and groups["backbone"] and groups["shared"]
        cs = {c for _, c in comps.values()}
        if arch == "moe":
            assert "experts" in cs and "und_experts" not in cs and not groups["gen_experts"]
        else:
            assert {"und_experts", "gen_experts"} <= cs and "experts" not in cs
            assert groups["gen_router"] and groups["gen_experts"] and groups["und_experts"]
        assert all("vae" in n or "t_embed" in n for n in groups["gen_io"])


def test_model_shielding_one_layer(data, batch):
    m = build(data, arch="symbiotic", n_layers=1)
    ffn = m.moe_layers()[0][1]

    def grads(scale):
        m.zero_grad()
        m.set_shield(scale)
        out = m(batch)
        out.losses["gen"].backward()
        return ([p.grad.clone() for p in ffn.shared.parameters()],
                ffn.groups["gen"].experts.w1_EFD.grad.clone())

    free, gen_free = grads(1.0)
    shielded, gen_sh = grads(0.0)
    released, _ = grads(0.1)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in shielded)
    assert gen_sh.abs().sum() > 0 and torch.allclose(gen_sh, gen_free)
    assert all(torch.allclose(r, 0.1 * f, atol=1e-8) for r, f in zip(released, free))
    with pytest.raises(ValueError):
        m.set_shield(2.0)


def test_balance_bias_from_own_counts(data, batch):
    m = build(data, arch="moe", bias_balance=True)
    counts = torch.zeros(TINY["n_layers"], 8)
    for i, (_, ffn) in enumerate(m.moe_layers()):
        ffn.hook_router.register_forward_hook(
            lambda mod, a, o, i=i: counts[i].add_(torch.bincount(a[0].topk_ids_TK.flatten(), minlength=8)))
    m.train()
    m(batch)
    with torch.no_grad():
        m(batch)  # no-grad forwards (eval, probes) are not counted
    m.update_balance_bias()
    for i, (_, ffn) in enumerate(m.moe_layers()):
        want = 0.001 * torch.sign(counts[i].mean() - counts[i])
        assert torch.allclose(ffn.groups["all"].router.bias_E, want)
    assert "layers.0.ffn.groups.all.router.bias_E" in m.state_dict()


def test_config_validation():
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(arch="symbiotic", n_experts=8, top_k=3, und_fraction=0.8)
    with pytest.raises(ValueError, match="empty"):
        ModelConfig(arch="symbiotic", n_experts=8, und_fraction=1.0)
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="dense")
    with pytest.raises(ValueError, match="layers"):
        ModelConfig(arch="symbiotic", n_layers=2, groups=((0, 1, 2),))


def test_bf16_autocast_matches_fp32(data, batch):
    m = build(data, arch="symbiotic", capacity_factor=2.0)
    ref = m(batch).losses
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch)
    out.losses["total"].backward()
    for k in ("lm", "mmu", "gen", "aux", "z"):
        assert torch.allclose(out.losses[k].float(), ref[k], rtol=0.05, atol=0.05), k


@pytest.mark.parametrize("arch", ["moe", "mot", "symbiotic"])
def test_overfits_one_batch(data, batch, arch):
    m = build(data, arch=arch, capacity_factor=1.25)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = m(batch)
        opt.zero_grad()
        out.losses["total"].backward()
        opt.step()
        first = first if first is not None else {k: float(v.detach()) for k, v in out.losses.items()}
    with torch.no_grad():
        last = m(batch).losses
    assert float(last["lm"]) < 0.7 * first["lm"]
    assert float(last["mmu"]) < 0.7 * first["mmu"]
    assert float(last["gen"]) < 0.9 * first["gen"]
