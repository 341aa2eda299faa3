import pytest
import torch

from moe_probe.data import DataConfig, MultimodalData, images_to_patches, patches_to_images
from moe_probe.data.batch import KIND_LM, KIND_MMU, KIND_T2I, LM_MMU, LM_NONE, LM_TEXT
from moe_probe.modalities import TEXT, VAE, VIT

CFG = DataConfig(vocab_words=500)


@pytest.fixture(scope="module")
def data():
    return MultimodalData(CFG, seed=0)


def test_patches_match_explicit_loop_and_invert():
    img = torch.randn(3, 8, 8)
    p = images_to_patches(img, 2)
    assert p.shape == (3, 16, 4)
    for b in range(3):
        for n in range(16):
            r, c = divmod(n, 4)
            expect = torch.stack([img[b, 2 * r + i, 2 * c + j] for i in range(2) for j in range(2)])
            assert torch.equal(p[b, n], expect)
    assert torch.equal(patches_to_images(p, 2, 8), img)
    assert images_to_patches(img, 4).shape == (3, 4, 16)


def test_layout_modalities_targets_and_images(data):
    g = torch.Generator().manual_seed(1)
    b = data.batch("train", 64, g)
    tok = data.tokenizer
    digit_ids = torch.tensor(tok.digit_ids)
    assert set(b.kind_B.tolist()) == {KIND_LM, KIND_MMU, KIND_T2I}
    for i in range(len(b)):
        kind, mod, toks = int(b.kind_B[i]), b.modality_BS[i], b.tokens_BS[i]
        img_pos = (toks == tok.img).nonzero().flatten()
        if kind == KIND_LM:
            assert (mod == TEXT).all() and len(img_pos) == 0 and b.labels_B[i] == -1
            has = b.lm_kind_BS[i] == LM_TEXT
            assert torch.equal(b.lm_targets_BS[i][:-1][has[:-1]], toks[1:][has[:-1]])
            assert b.text_label_B[i] >= 0
            continue
        assert len(img_pos) == 16 and (img_pos.diff() == 1).all()
        want = VIT if kind == KIND_MMU else VAE
        assert (mod[img_pos] == want).all()
        assert (mod[(toks != tok.img)] == TEXT).all()
        label = int(b.labels_B[i])
        # the image is one of the dataset images of that label
        imgs = patches_to_images(b.patches_BSP[i, img_pos].unsqueeze(0), 2, 8)[0]
        match = (data.images == imgs).flatten(1).all(1).nonzero().flatten()
        assert len(match) >= 1 and int(data.digit_labels[match[0]]) == label
        text = tok.decode(toks[b.valid_BS[i]])
        if kind == KIND_MMU:
            assert text.endswith(f"this digit is {tok.words[digit_ids[label]]} <eos>")
            loss_pos = (b.lm_kind_BS[i] == LM_MMU).nonzero().flatten()
            assert len(loss_pos) == 1 and b.lm_targets_BS[i, loss_pos[0]] == digit_ids[label]
            assert toks[loss_pos[0]] == tok.token_id("is")
            assert b.flow_t_B[i] == 0
        else:
            assert text.startswith(f"<bos> draw a {tok.words[digit_ids[label]]} <img>")
            assert (b.lm_kind_BS[i] == LM_NONE).all()
            assert 0 < b.flow_t_B[i] < 1
            assert b.noise_BSP[i, img_pos].abs().sum() > 0
            assert b.noise_BSP[i][mod != VAE].abs().sum() == 0
        # padding: text modality, not valid, no loss
        pads = toks == tok.pad
        assert (~b.valid_BS[i][pads]).all() and (mod[pads] == TEXT).all()
        assert (b.lm_kind_BS[i][pads] == LM_NONE).all()


def test_mix_ratio():
    d = MultimodalData(DataConfig(vocab_words=100, mix=(6, 2, 2)), seed=0)
    g = torch.Generator().manual_seed(0)
    kinds = torch.cat([d.batch("train", 500, g).kind_B for _ in range(8)])
    frac = torch.bincount(kinds, minlength=3).double() / len(kinds)
    # LM, MMU, T2I ≈ 0.2, 0.2, 0.6 (binomial std ≈ 0.006 over 4000 draws)
    assert torch.allclose(frac, torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64), atol=0.03)
    d2 = MultimodalData(DataConfig(vocab_words=100, mix=(0, 1, 0)), seed=0)
    assert (d2.batch("train", 50, g).kind_B == KIND_LM).all()
    with pytest.raises(ValueError):
        DataConfig(mix=(1, 2))


def test_generator_determinism(data):
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = data.batch("train", 16, g1), data.batch("train", 16, g2)
    assert torch.equal(a.tokens_BS, b.tokens_BS) and torch.equal(a.noise_BSP, b.noise_BSP)
    state = g1.get_state()
    c = data.batch("train", 16, g1)
    g1.set_state(state)
    assert torch.equal(c.patches_BSP, data.batch("train", 16, g1).patches_BSP)


def test_fixed_disjoint_splits_per_seed(data):
    again = MultimodalData(CFG, seed=0)
    other = MultimodalData(CFG, seed=1)
    s = data.digit_split
    for k in s:
        assert torch.equal(s[k], again.digit_split[k])
    assert not torch.equal(s["val"], other.digit_split["val"])
    all_idx = torch.cat([s["train"], s["val"], s["test"]])
    assert len(all_idx) == 1797 and len(all_idx.unique()) == 1797
    assert (len(s["val"]), len(s["test"])) == (CFG.n_val_digits, CFG.n_test_digits)
    assert torch.equal(data.text_split["val"], again.text_split["val"])
    train_rows = {tuple(r) for r in data.text_split["train"].tolist()}
    assert not any(tuple(r) in train_rows for r in data.text_split["val"].tolist())
    # a val batch only holds val digits
    b = data.batch("val", 64, torch.Generator().manual_seed(0))
    val_imgs = data.images[s["val"]].flatten(1)
    for i in (b.kind_B != KIND_LM).nonzero().flatten():
        img_pos = b.modality_BS[i] != TEXT
        img = patches_to_images(b.patches_BSP[i, img_pos].unsqueeze(0), 2, 8).flatten()
        assert (val_imgs == img).all(1).any()


def test_probe_batch_fixed_and_labelled(data):
    p, q = data.probe_batch(), data.probe_batch()
    assert torch.equal(p.tokens_BS, q.tokens_BS) and torch.equal(p.noise_BSP, q.noise_BSP)
    q.noise_BSP.add_(1.0)  # callers' in-place edits never reach the cached probe batch
    assert torch.equal(data.probe_batch().noise_BSP, p.noise_BSP)
    n = CFG.probe_per_class
    for kind in (KIND_MMU, KIND_T2I):
        labels = p.labels_B[p.kind_B == kind]
        assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), n))
    tl = p.text_label_B[p.kind_B == KIND_LM]
    assert torch.equal(torch.bincount(tl), torch.full((CFG.n_text_classes,), n))
    assert (p.text_label_B[p.kind_B != KIND_LM] == -1).all()


def test_logit_normal_t():
    d = MultimodalData(DataConfig(vocab_words=100, t_mean=0.0, t_std=1.0), seed=0)
    t = d.sample_t(20000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median() - 0.5) < 0.02
    z = torch.logit(t)
    assert abs(z.std() - 1.0) < 0.03
    u = MultimodalData(DataConfig(vocab_words=100, t_sampling="uniform"), seed=0)
    assert abs(u.sample_t(20000, torch.Generator().manual_seed(0)).std() - (1 / 12) ** 0.5) < 0.01
