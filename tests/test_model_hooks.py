"""model.hooks.hooks — the one way hooks are attached — and the one capacity formula."""

import numpy as np
import pytest
import torch

from moe_probe.capacity import expert_capacity
from moe_probe.data import DataConfig, MultimodalData
from moe_probe.model import ModelConfig, MultimodalMoE
from moe_probe.model.hooks import hooks, layer_hooks
from moe_probe.model.moe import Experts

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_experts=4, n_shared=1, d_expert=16, top_k=2)


@pytest.fixture(scope="module")
def data():
    return MultimodalData(DataConfig(vocab_words=200), seed=0)


@pytest.fixture(scope="module")
def model(data):
    torch.manual_seed(0)
    return MultimodalMoE(ModelConfig(arch="moe", **TINY), data.tokenizer.vocab_size).eval()


@pytest.fixture(scope="module")
def batch(data):
    return data.batch("train", 4, torch.Generator().manual_seed(0))


def _n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_layer_hooks_are_module_paths_and_see_every_layer(model, batch):
    seen = []
    fns = layer_hooks(model, "hook_router", lambda li, rec: seen.append((li, rec.topk_ids_TK.shape)))
    assert list(fns) == ["layers.0.ffn.hook_router", "layers.1.ffn.hook_router"]
    with torch.no_grad(), hooks(model, fns) as mods:
        assert mods["layers.1.ffn.hook_router"] is model.layers[1].ffn.hook_router
        model(batch)
    T = int(batch.valid_BS.sum())
    assert seen == [(0, (T, 2)), (1, (T, 2))]


def test_hooks_removed_after_normal_exit_and_after_an_exception(model, batch):
    before = _n_hooks(model)
    fns = {**layer_hooks(model, "hook_router", lambda li, r: None),
           **layer_hooks(model, "hook_shared", lambda li, h: None)}
    with hooks(model, fns):
        assert _n_hooks(model) == before + 4
    assert _n_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), hooks(model, fns):
            assert _n_hooks(model) == before + 4
            model(batch)
            raise RuntimeError("boom")
    assert _n_hooks(model) == before
    # a hook that raises inside the forward: removed too
    with pytest.raises(ZeroDivisionError):
        with torch.no_grad(), hooks(model, {"layers.0.ffn.hook_router": lambda r: 1 / 0}):
            model(batch)
    assert _n_hooks(model) == before


def test_bad_hook_name_is_one_line_value_error_and_attaches_nothing(model):
    before = _n_hooks(model)
    fns = {"layers.0.ffn.hook_router": lambda r: None, "layers.7.ffn.hook_router": lambda r: None}
    with pytest.raises(ValueError) as e:
        with hooks(model, fns):
            pass
    msg = str(e.value)
    assert "'layers.7.ffn.hook_router'" in msg and "\n" not in msg
    assert _n_hooks(model) == before


def test_a_returned_value_replaces_the_output(model, batch):
    """Zeroing the shared experts' output through the hook == the model without them."""
    with torch.no_grad():
        plain = model(batch).losses["total"]
        with hooks(model, layer_hooks(model, "hook_shared", lambda li, h: torch.zeros_like(h))):
            zeroed = model(batch).losses["total"]
        again = model(batch).losses["total"]
    assert not torch.equal(plain, zeroed)
    assert torch.equal(plain, again)


def test_capacity_is_one_formula_for_numbers_arrays_and_tensors():
    C, A, E = [1.0, 1.25, 1.1, 0.5, 2.0], [8, 12, 10, 7, 5], [4, 5, 11, 3, 2]
    ints = [expert_capacity(c, a, e) for c, a, e in zip(C, A, E)]
    # 1.25·12/5 = 3 and 1.1·10/11 = 1 exactly: no rounding up (float gives 1.0000000000000002)
    assert ints == [2, 3, 1, 2, 5] and all(type(x) is int for x in ints)
    np.testing.assert_array_equal(expert_capacity(np.array(C), np.array(A, float), np.array(E, float)), ints)
    got = expert_capacity(torch.tensor(C, dtype=torch.float64), torch.tensor(A, dtype=torch.float64),
                          torch.tensor(E, dtype=torch.float64))
    assert torch.is_tensor(got) and got.tolist() == ints


def test_model_drops_at_the_same_capacity():
    """C=1.1, K=1, 10 tokens, 11 experts: cap = 1, so 10 picks of expert 0 keep only the first."""
    ex = Experts(11, 4, 3)
    ids = torch.zeros(10, 1, dtype=torch.long)
    _, kept, _ = ex(torch.randn(10, 4), ids, torch.ones(10, 1), 1.1)
    assert kept[:, 0].tolist() == [True] + [False] * 9
