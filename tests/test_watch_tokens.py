"""Token-level routing of a watched Hugging Face run (`moe_probe.watch(..., probe=...)`): the rows
hold the model's own router top-k on the probe batch at the sampled steps, with the batch's labels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

import moe_probe  # noqa: E402
from moe_probe.hf.loading import load_model  # noqa: E402

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hf"


def test_watched_hf_run_records_the_models_own_picks_on_the_probe(tmp_path):
    model, _, _ = load_model(str(FIX / "mixtral.json"), seed=0)
    model.train()
    V, k = model.config.vocab_size, model.config.num_experts_per_tok
    g = torch.Generator().manual_seed(0)
    probe_ids = torch.randint(3, V, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 7:] = 0  # padding: left out of the group
    probe = {"input_ids": probe_ids, "attention_mask": mask, "topic": torch.tensor([1, 0, 1])}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    with moe_probe.watch(model, tmp_path / "run", probe=probe, probe_every=2, probe_labels="topic",
                         label_names=["code", "prose"],
                         decode=lambda ids: "".join(f"w{int(i)}" for i in ids)) as w:
        for step in range(3):
            ids = torch.randint(3, V, (2, 12), generator=g)
            out = model(input_ids=ids, labels=ids)
            w.backward(out.loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            w.step(step, losses=out.loss.item())
    run = moe_probe.open_run(tmp_path / "run")
    ds = run.dataset("token_routing")
    assert list(ds.step.values) == [0, 2]
    keep = mask.reshape(-1).bool().numpy()
    np.testing.assert_array_equal(ds.token_id.values[0], probe_ids.reshape(-1).numpy()[keep])
    np.testing.assert_array_equal(ds.label.values[0], np.repeat([1, 0, 1], 10)[keep])
    assert run.attrs["token_routing"]["labels"] == {"label": ["code", "prose"]}
    assert run.attrs["token_routing"]["vocab"][str(int(probe_ids[0, 0]))] == f"w{int(probe_ids[0, 0])}"
    assert (ds.kind.values == 0).all()
    # the last row (closing step 2, after its update) is the router's own top-k of the weights
    # the loop ended with; the first row (before two updates at a high LR) differs from it
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_ids, attention_mask=mask,
                       output_router_logits=True).router_logits
    for li, lg in enumerate(logits):
        want = torch.softmax(lg.float(), -1).topk(k, -1)
        np.testing.assert_array_equal(ds.topk_ids.values[-1, li], want.indices.numpy()[keep])
        np.testing.assert_allclose(ds.topk_gates.values[-1, li].astype(np.float32),
                                   (want.values / want.values.sum(-1, keepdim=True)).numpy()[keep],
                                   rtol=2e-3, atol=1e-3)
    assert not np.array_equal(ds.topk_ids.values[0], ds.topk_ids.values[-1])


@pytest.mark.parametrize("kw, needle", [
    (dict(probe={"input_ids": torch.ones(1, 4, dtype=torch.long)}), "probe_every=0"),
    (dict(probe={"input_ids": torch.ones(1, 4, dtype=torch.long)}, probe_every=1,
          probe_labels="topic"), "no 'topic' in the probe inputs"),
    (dict(probe={"input_ids": torch.ones(2, 4, dtype=torch.long)}, probe_every=1,
          probe_labels=torch.tensor([0, 3]), label_names=["a", "b"]), "probe labels: label 3"),
])
def test_bad_probe_settings_are_one_line(tmp_path, kw, needle):
    model, _, _ = load_model(str(FIX / "mixtral.json"), seed=0)
    with pytest.raises(ValueError, match=needle) as e:
        moe_probe.watch(model, tmp_path / "run", **kw)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()
