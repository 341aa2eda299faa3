"""``moe_probe.watch`` under torchrun: 2 gloo ranks give the counts of one process with gradient
accumulation 2 over the same micro-batches; rank 0 alone writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from moe_probe import open_run

SCRIPT = Path(__file__).with_name("_watch_ddp.py")


def _run(*cmd) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_two_ranks_count_like_one_process_with_accumulation(tmp_path):
    _run(str(SCRIPT), str(tmp_path / "one"))
    _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
         str(tmp_path / "two"))
    one, two = open_run(tmp_path / "one"), open_run(tmp_path / "two")
    r1, r2 = one.dataset("routing"), two.dataset("routing")
    assert list(r2["step"].values) == [0, 1, 2]
    for var in ("tokens", "load"):
        np.testing.assert_array_equal(r2[var].values, r1[var].values)
    assert (r1["tokens"].values.sum(-1) == 2 * 2 * 16).all() and (r1["tokens"].values[..., 1] > 0).all()
    g1, g2 = one.dataset("grad"), two.dataset("grad")
    assert list(g2["step"].values) == [0, 2]
    for var in ("cosine", "norm_und", "norm_gen"):
        a, b = g1[var].values, g2[var].values
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.isfinite(a).any()
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
