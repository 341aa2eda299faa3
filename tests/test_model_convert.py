"""Stage-2 conversion and the evaluation helpers."""

import pytest
import torch

from moe_probe.model.params import n_params

from moe_probe.data import DataConfig, MultimodalData
from moe_probe.data.batch import KIND_MMU
from moe_probe.model import ModelConfig, MultimodalMoE, choose_groups, convert, und_expert_counts
from moe_probe.modalities import VAE

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_experts=8, n_shared=1, d_expert=16, top_k=2)


@pytest.fixture(scope="module")
def data():
    return MultimodalData(DataConfig(vocab_words=200), seed=0)


@pytest.fixture(scope="module")
def batch(data):
    return data.batch("train", 12, torch.Generator().manual_seed(0))


@pytest.fixture()
def stage1(data):
    torch.manual_seed(0)
    m = MultimodalMoE(ModelConfig(arch="moe", bias_balance=True, **TINY), data.tokenizer.vocab_size)
    with torch.no_grad():  # non-trivial biases so slicing them is checked
        for _, ffn in m.moe_layers():
            ffn.groups["all"].router.bias_E.copy_(torch.arange(8.0) * 1e-3)
    return m


def test_choose_groups():
    counts = torch.tensor([[5, 1, 9, 0, 3, 3, 7, 2], [0, 0, 0, 0, 1, 1, 1, 1]])
    g = choose_groups(counts, 0.5)
    assert g == ((0, 2, 4, 6), (4, 5, 6, 7))
    assert choose_groups(counts, 0.75)[0] == (0, 2, 4, 5, 6, 7)  # tie 3/3 and 2: lower id first
    with pytest.raises(ValueError, match="empty"):
        choose_groups(counts, 1.0)
    with pytest.raises(ValueError, match="empty"):
        choose_groups(counts, 0.01)


def test_moe_unchanged_and_bad_inputs(stage1):
    assert convert(stage1, "moe") is stage1
    with pytest.raises(ValueError, match="groups"):
        convert(stage1, "symbiotic")
    with pytest.raises(ValueError, match="top_k"):
        convert(stage1, "symbiotic", groups=((0,), (0, 1, 2)))
    with pytest.raises(ValueError, match="empty"):
        convert(stage1, "symbiotic", groups=(tuple(range(8)), (0, 1)))
    with pytest.raises(ValueError, match="arch"):
        convert(stage1, "dense")
    mot = convert(stage1, "mot")
    with pytest.raises(ValueError, match="stage-1"):
        convert(mot, "symbiotic", groups=((0, 1), (0, 1)))


def test_mot_copy_identical_towers_and_outputs(stage1, batch):
    ref = stage1(batch)
    mot = convert(stage1, "mot")
    assert mot.cfg.arch == "mot"
    out = mot(batch)
    # right after the copy each token computes exactly what the stage-1 model computed
    assert torch.allclose(out.lm_logits_BSV, ref.lm_logits_BSV, atol=1e-5)
    assert torch.allclose(out.velocity_BSP, ref.velocity_BSP, atol=1e-5)
    for k in ("lm", "mmu", "gen"):
        assert torch.allclose(out.losses[k], ref.losses[k], atol=1e-5)
    sd = mot.state_dict()
    for i in range(TINY["n_layers"]):
        p = f"layers.{i}."
        for a, b in (("attn.wq.weight", "gen_attn.wq.weight"), ("attn_norm.weight", "gen_attn_norm.weight"),
                     ("ffn_norm.weight", "gen_ffn_norm.weight"),
                     ("ffn.groups.und.router.weight", "ffn.groups.gen.router.weight"),
                     ("ffn.groups.und.router.bias_E", "ffn.groups.gen.router.bias_E"),
                     ("ffn.groups.und.experts.w2_EDF", "ffn.groups.gen.experts.w2_EDF"),
                     ("ffn.groups.und.shared.w1_FD", "ffn.groups.gen.shared.w1_FD")):
            assert torch.equal(sd[p + a], sd[p + b])
    # the copy is independent: training the gen tower leaves the und tower alone
    with torch.no_grad():
        mot.layers[0].gen_attn.wq.weight.add_(1.0)
    assert not torch.equal(mot.layers[0].attn.wq.weight, mot.layers[0].gen_attn.wq.weight)
    assert torch.equal(stage1.layers[0].attn.wq.weight, mot.layers[0].attn.wq.weight)


def test_symbiotic_slices(stage1, data, batch):
    counts = und_expert_counts(stage1, [batch])
    # independent count from records
    manual = torch.zeros(2, 8, dtype=torch.long)
    for i, (_, ffn) in enumerate(stage1.moe_layers()):
        ffn.hook_router.register_forward_hook(lambda m, a, o, i=i: manual[i].add_(
            torch.bincount(a[0].topk_ids_TK[a[0].modality_T != VAE].flatten(), minlength=8)))
    with torch.no_grad():
        stage1(batch)
    assert torch.equal(counts, manual)
    groups = choose_groups(counts, 0.75)
    sym = convert(stage1, "symbiotic", groups=groups)
    assert n_params(sym) == n_params(stage1)
    src = stage1.state_dict()
    for i in range(2):
        und = list(groups[i])
        gen = [e for e in range(8) if e not in und]
        f = sym.moe_layers()[i][1]
        assert f.routing_info().groups == {"und": tuple(und), "gen": tuple(gen)}
        w = src[f"layers.{i}.ffn.groups.all.router.weight"]
        assert torch.equal(f.groups["und"].router.weight, w[und])
        assert torch.equal(f.groups["gen"].router.weight, w[gen])
        assert torch.equal(f.groups["gen"].router.bias_E, src[f"layers.{i}.ffn.groups.all.router.bias_E"][gen])
        assert torch.equal(f.groups["gen"].experts.w3_EFD, src[f"layers.{i}.ffn.groups.all.experts.w3_EFD"][gen])
    # layer 0 sees identical inputs: each token's logits are the stage-1 logits on its group's
    # columns (exactly the column slice) and -inf elsewhere
    recs = []
    stage1.moe_layers()[0][1].hook_router.register_forward_hook(lambda m, a, o: recs.append(a[0]))
    sym.moe_layers()[0][1].hook_router.register_forward_hook(lambda m, a, o: recs.append(a[0]))
    with torch.no_grad():
        stage1(batch), sym(batch)
    full, sliced = recs[-2].logits_TE, recs[-1].logits_TE
    is_gen = recs[-1].modality_T == VAE
    und = list(groups[0])
    gen = [e for e in range(8) if e not in und]
    assert torch.allclose(sliced[~is_gen][:, und], full[~is_gen][:, und], atol=1e-6)
    assert torch.allclose(sliced[is_gen][:, gen], full[is_gen][:, gen], atol=1e-6)
    assert torch.isinf(sliced[~is_gen][:, gen]).all() and torch.isinf(sliced[is_gen][:, und]).all()


def test_sample_and_classify(stage1, data):
    tok = data.tokenizer
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    imgs = stage1.sample_images(torch.tensor([3, 7]), tok, 3, generator=g1)
    assert imgs.shape == (2, 8, 8) and torch.isfinite(imgs).all()
    assert torch.equal(imgs, stage1.sample_images([3, 7], tok, 3, generator=g2))
    # Euler by hand: with one step from t=1, x0 = x1 - v(x1, t=1)
    g3 = torch.Generator().manual_seed(0)
    one = stage1.sample_images([3, 7], tok, 1, generator=g3)
    b = data.layout.empty(2)
    x1 = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    data.layout.fill_t2i(b, torch.arange(2), torch.zeros(2, 8, 8), torch.tensor([3, 7]), x1, torch.ones(2))
    v = stage1(b).velocity_BSP[b.modality_BS == VAE].view(2, 16, 4)
    from moe_probe.data import patches_to_images
    assert torch.allclose(one, patches_to_images(x1 - v, 2, 8), atol=1e-5)
    # classification = argmax over digit words of the forward logits at "is"
    p = data.probe_batch()
    mmu = p.select((p.kind_B == KIND_MMU).nonzero().flatten())
    images = data.images[data.digit_split["val"]][torch.cat(
        [(data.digit_labels[data.digit_split["val"]] == c).nonzero().flatten()[:4] for c in range(10)])]
    pred = stage1.classify_images(images, tok)
    logits = stage1(mmu).lm_logits_BSV[:, data.layout.mmu_answer_pos - 1][:, tok.digit_ids]
    assert torch.equal(pred, logits.argmax(-1))


def test_other_patch_size_end_to_end():
    d = MultimodalData(DataConfig(vocab_words=100, patch_size=4, seq_len=12), seed=0)
    b = d.batch("train", 8, torch.Generator().manual_seed(0))
    assert b.patches_BSP.shape == (8, 12, 16)
    assert ((b.modality_BS != 0).sum(1)[b.kind_B != 0] == 4).all()
    torch.manual_seed(0)
    m = MultimodalMoE(ModelConfig(**{**TINY, "arch": "mot"}, max_seq_len=12, patch_dim=16, n_image_tokens=4),
                      d.tokenizer.vocab_size)
    out = m(b)
    out.losses["total"].backward()
    assert m.sample_images([1, 2], d.tokenizer, 2).shape == (2, 8, 8)
    assert m.classify_images(d.images[:3], d.tokenizer).shape == (3,)
    with pytest.raises(ValueError, match="seq_len"):
        MultimodalData(DataConfig(vocab_words=100, patch_size=2, seq_len=12), seed=0)
    with pytest.raises(ValueError, match="patch_size"):
        MultimodalData(DataConfig(vocab_words=100, patch_size=3), seed=0)
    long = MultimodalData(DataConfig(vocab_words=100, seq_len=30), seed=0).batch("train", 2, torch.Generator())
    with pytest.raises(ValueError, match="max_seq_len"):
        m(long)
