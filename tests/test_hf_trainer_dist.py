"""``TraceCallback`` under torchrun: 2 gloo ranks of the HF Trainer give the counts of one
process with gradient accumulation 2 over the same global batches; rank 0 alone writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_watch_dist import _run

from moe_probe import open_run

SCRIPT = Path(__file__).with_name("_hf_trainer_ddp.py")


def test_two_ranks_count_like_one_process_with_accumulation(tmp_path):
    _run(str(SCRIPT), str(tmp_path / "one"))
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
         str(tmp_path / "two"))
    r1, r2 = open_run(tmp_path / "one").dataset("routing"), open_run(tmp_path / "two").dataset("routing")
    assert list(r2["step"].values) == [1, 2, 3]
    for var in ("tokens", "load"):
        np.testing.assert_array_equal(r2[var].values, r1[var].values)
    assert (r1["tokens"].values.sum(-1) == 2 * 2 * 16).all() and (r1["tokens"].values[..., 1] > 0).all()
    l1, l2 = open_run(tmp_path / "one").dataset("loss"), open_run(tmp_path / "two").dataset("loss")
    np.testing.assert_allclose(l2["value"].sel(term="total").values,
                               l1["value"].sel(term="total").values, rtol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "one.hf", "two", "two.hf"]
