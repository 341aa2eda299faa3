"""A stage-2 run under torchrun: the stage-1 base is trained distributed too (rank 0 holds the
base lock and decides, every rank trains), then converted and trained; the reference is one
process with micro_batches=2 in both stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from moe_probe import open_run

ARGS = ["--recipe", "tiny-symbiotic", "--quiet", "--steps", "2", "--set", "base.steps=2",
        "--set", "trace.probe_every=0"]


def _run(cmd, cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_PROBE_CACHE": str(cache),
           "MOE_PROBE_DIST_TIMEOUT": "120"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_symbiotic_with_a_distributed_base_matches_one_process(tmp_path):
    cache = tmp_path / "cache"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "moe_probe", "train", *ARGS]
    _run([*torchrun, "--out", str(tmp_path / "r2")], cache)
    _run([sys.executable, "-m", "moe_probe", "train", *ARGS, "--out", str(tmp_path / "r1"),
          "--set", "train.micro_batches=2", "--set", "base.micro_batches=2"], cache)
    # two bases: one trained on 2 ranks, one by the single process (different cache keys)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    groups = [json.loads((tmp_path / r / "groups.json").read_text()) for r in ("r2", "r1")]
    assert groups[0] == groups[1]
    a, b = open_run(tmp_path / "r2").dataset("routing"), open_run(tmp_path / "r1").dataset("routing")
    for var in ("tokens", "load", "kept"):
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
    pa = torch.load(tmp_path / "r2" / "checkpoint.pt", weights_only=True)["model"]
    pb = torch.load(tmp_path / "r1" / "checkpoint.pt", weights_only=True)["model"]
    for k, v in pb.items():
        torch.testing.assert_close(pa[k], v, rtol=1e-5, atol=1e-7, msg=k)

    # A second 2-rank run reuses the distributed base (rank 0's decision, broadcast).
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*/checkpoint.pt")}
    _run([*torchrun, "--out", str(tmp_path / "again"), "--steps", "1"], cache)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/checkpoint.pt")} == stamps
    base = [json.loads((tmp_path / r / "run.json").read_text())["base"]["key"] for r in ("r2", "again")]
    assert base[0] == base[1]
