"""Token-level routing (`token_routing`): the stored picks are the model's own on the probe batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from moe_probe import open_run
from moe_probe.data import DataConfig, MultimodalData
from moe_probe.data.batch import images_to_patches
from moe_probe.model import ModelConfig, MultimodalMoE
from moe_probe.model.hooks import hooks, layer_hooks
from moe_probe.modalities import MODALITIES, TEXT
from moe_probe.run import store_path
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.config import TraceConfig
from moe_probe.trace.layout import store_layout
from moe_probe.trace.session import TraceSession
from moe_probe.trace.tokens import data_probe_tokens


@pytest.fixture(scope="module")
def data():
    return MultimodalData(DataConfig(probe_per_class=2, vocab_words=300), 0)


def _model(data, arch):
    torch.manual_seed(1)
    cfg = ModelConfig(arch=arch, d_model=32, n_heads=2, d_expert=32, n_layers=2, n_experts=8,
                      top_k=2, n_shared=1)
    return MultimodalMoE(cfg, data.tokenizer.vocab_size)


def _own_picks(model, batch):
    """Each layer's top-k by the router's own logits and its gates, from a separate forward."""
    logits, gates = {}, {}

    def on_router(li, rec):
        logits[li], gates[li] = rec.logits_TE.detach(), rec.topk_weights_TK.detach()

    model.eval()
    with hooks(model, layer_hooks(model, "hook_router", on_router)), torch.no_grad():
        model(batch)
    k = model.moe_layers()[0][1].routing_info().top_k
    return [logits[i].topk(k, dim=-1).indices.numpy() for i in sorted(logits)], \
        [gates[i].numpy() for i in sorted(gates)]


@pytest.mark.parametrize("arch", ["moe", "symbiotic"])
def test_stored_topk_equal_the_models_own_on_the_probe_batch(tmp_path, data, arch):
    model = _model(data, arch)
    tokens = data_probe_tokens(data)
    attrs, coords = store_layout(model, eval_metrics=["text_loss"], probe_tokens=tokens)
    writer = StoreWriter.create(store_path(tmp_path), attrs={"run": {"name": "t"}, **attrs},
                                coords=coords)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with TraceSession(model, TraceConfig(probe_every=0), writer, data.probe_batch,
                      probe_tokens=tokens) as s:
        s.on_eval(0, {"text_loss": 1.0}, model)
        model.train()  # a real update between the snapshots: the second row must follow it
        g = torch.Generator().manual_seed(0)
        model(data.batch("train", 16, g)).losses["total"].backward()
        opt.step()
        s.on_eval(5, {"text_loss": 1.0}, model)
        want_ids, want_gates = _own_picks(model, data.probe_batch())

    ds = open_run(tmp_path).dataset("token_routing")
    assert list(ds.step.values) == [0, 5]
    got = ds.topk_ids.sel(step=5).values
    assert got.dtype == np.int16 and ds.topk_gates.dtype == np.float16
    for li, ids in enumerate(want_ids):
        np.testing.assert_array_equal(got[li], ids)
        np.testing.assert_allclose(ds.topk_gates.sel(step=5).values[li].astype(np.float32),
                                   want_gates[li], rtol=1e-3, atol=1e-3)
    assert not np.array_equal(ds.topk_ids.sel(step=0).values, got)  # the update changed routing

    # token columns: against the batch and the real digits, not the code that wrote them
    batch = data.probe_batch()
    valid = batch.valid_BS.numpy()
    row = ds.sel(step=0)
    kind = row.kind.values
    np.testing.assert_array_equal(kind, batch.modality_BS.numpy()[valid])
    text = kind == TEXT
    np.testing.assert_array_equal(row.token_id.values[text], batch.tokens_BS.numpy()[valid][text])
    assert (row.token_id.values[~text] == -1).all() and (row.patch.values[text] == -1).all()
    digits = load_digits()
    pix = images_to_patches(torch.from_numpy(digits.images / 8.0 - 1.0).float(), 2).numpy()
    img, patch = row.image.values[~text], row.patch.values[~text]
    vecs = batch.patches_BSP.numpy()[valid][~text]
    vit = kind[~text] == MODALITIES.index("vit")
    np.testing.assert_allclose(vecs[vit], pix[img[vit], patch[vit]], atol=1e-6)
    label, names = row.label.values, open_run(tmp_path).attrs["token_routing"]["labels"]
    np.testing.assert_array_equal(label[~text], digits.target[img])
    lm = batch.kind_B.numpy()[np.nonzero(valid)[0]] == 0
    np.testing.assert_array_equal(label[lm], batch.text_label_B.numpy()[np.nonzero(valid)[0]][lm]
                                  + len(names["digit"]))
    vocab = open_run(tmp_path).attrs["token_routing"]["vocab"]
    some = row.token_id.values[text][:20]
    assert [vocab[str(i)] for i in some] == [data.tokenizer.decode([int(i)]) for i in some]


def test_a_run_without_the_group_still_snapshots(tmp_path, data):
    """A store laid out before token routing (no group): the session writes the rest."""
    model = _model(data, "moe")
    attrs, coords = store_layout(model, eval_metrics=["text_loss"])
    writer = StoreWriter.create(store_path(tmp_path), attrs={"run": {"name": "t"}, **attrs},
                                coords=coords)
    with TraceSession(model, TraceConfig(probe_every=0), writer, data.probe_batch,
                      probe_tokens=data_probe_tokens(data)) as s:
        s.on_eval(0, {"text_loss": 1.0}, model)
    store = open_run(tmp_path)
    assert "token_routing" not in store.groups and store.committed_steps("snapshot") == 1


def test_token_every_and_ids_only(tmp_path, data):
    """``token_every`` thins the rows (the final eval always writes one); without gates the
    optional array reads NaN and the ids are still the router's."""
    model = _model(data, "moe")
    tokens = data_probe_tokens(data)
    attrs, coords = store_layout(model, eval_metrics=["text_loss"], probe_tokens=tokens)
    writer = StoreWriter.create(store_path(tmp_path), attrs={"run": {"name": "t"}, **attrs},
                                coords=coords)
    cfg = TraceConfig(probe_every=0, token_every=100, token_gates=False)
    with TraceSession(model, cfg, writer, data.probe_batch, probe_tokens=tokens) as s:
        for step in (0, 50, 100, 150):
            s.on_eval(step, {"text_loss": 1.0}, model)
        s.on_eval(170, {"text_loss": 1.0}, model, final=True)
    store = open_run(tmp_path)
    ds = store.dataset("token_routing")
    assert list(ds.step.values) == [0, 100, 170]
    assert store.committed_steps("snapshot") == 5
    assert np.isnan(ds.topk_gates.values.astype(np.float32)).all()
    want, _ = _own_picks(model, data.probe_batch())
    np.testing.assert_array_equal(ds.topk_ids.sel(step=170).values, np.stack(want))
