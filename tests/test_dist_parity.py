"""Multi-process training: 2 gloo processes under torchrun against one process.

The reference is a single process with ``train.micro_batches=2`` and the same global batch:
it runs exactly the micro-batches the two ranks run (rank r = micro-batch r), in that order.
The recipe is the stage-1 ``tiny-base`` (no base cache involved) with generation data mixed in,
so the gradient-conflict tracer has two live tasks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moe_probe import open_run

ARGS = ["--recipe", "tiny-base", "--quiet", "--set", "data.mix=6,2,2"]
TIMEOUT = 240


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MOE_PROBE_DIST_TIMEOUT": "120"}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on a free local port, so parallel test runs cannot collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "moe_probe", "train", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def single(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moe_probe", "train", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 steps on 2 ranks and on 1 process (micro_batches=2), then both resumed to 4 steps."""
    root = tmp_path_factory.mktemp("dist")
    r2, r1 = root / "r2", root / "r1"
    out = {"root": root, "r2": r2, "r1": r1}
    out["fresh2"] = _ok(torchrun(*ARGS, "--steps", "2", "--out", str(r2)))
    _ok(single(*ARGS, "--steps", "2", "--out", str(r1), "--set", "train.micro_batches=2"))
    out["fresh_routing"] = (open_run(r2).dataset("routing"), open_run(r1).dataset("routing"))
    out["resume2"] = _ok(torchrun(*ARGS, "--steps", "4", "--out", str(r2), "--resume"))
    _ok(single(*ARGS, "--steps", "4", "--out", str(r1), "--set", "train.micro_batches=2",
               "--resume"))
    return out


def test_store_is_written_once_by_rank_0(runs):
    assert sorted(p.parent.name for p in runs["root"].rglob("traces.zarr")) == ["r1", "r2"]
    # Only rank 0 reports, once per invocation.
    assert runs["fresh2"].stdout.count("run: ") == 1
    a, b = open_run(runs["r2"]), open_run(runs["r1"])
    assert a.groups == b.groups
    for g in a.groups:
        steps = a.dataset(g)["step"].values
        assert len(np.unique(steps)) == len(steps), f"duplicate rows in {g}: {steps}"
        np.testing.assert_array_equal(steps, b.dataset(g)["step"].values)
    assert a.committed_steps("routing") == a.committed_steps("loss") == 4
    assert a.attrs["run"]["recipe"] == "tiny-base"


@pytest.mark.parametrize("var", ["tokens", "load", "kept"])
def test_routing_counts_equal_single_process_exactly(runs, var):
    two, one = runs["fresh_routing"]
    np.testing.assert_array_equal(two[var].values, one[var].values)
    a, b = open_run(runs["r2"]).dataset("routing"), open_run(runs["r1"]).dataset("routing")
    np.testing.assert_array_equal(a[var].values, b[var].values)  # also across the resume
    # Global counts: every token of the global batch (8 samples × 24 positions, padding
    # excluded) is counted once per layer, not once per rank.
    assert a["tokens"].values.sum(-1).max() <= 8 * 24
    assert a["tokens"].values.sum(-1).min() > 8 * 24 // 2


def test_derived_routing_and_losses_match(runs):
    a, b = open_run(runs["r2"]), open_run(runs["r1"])
    for var in ("capacity_rate", "entropy", "maxvio", "dead_frac", "confidence", "router_z"):
        np.testing.assert_allclose(a.dataset("routing")[var].values,
                                   b.dataset("routing")[var].values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.dataset("loss")["value"].values, b.dataset("loss")["value"].values,
                               rtol=1e-6)
    np.testing.assert_allclose(a.dataset("eval")["value"].values, b.dataset("eval")["value"].values,
                               rtol=1e-5, atol=1e-6)


def test_gradient_cosines_and_norms_match(runs):
    a, b = open_run(runs["r2"]).dataset("grad"), open_run(runs["r1"]).dataset("grad")
    assert a.sizes["step"] == 2  # grad_every=2 over 4 steps
    cos_a, cos_b = a["cosine"].values, b["cosine"].values
    np.testing.assert_array_equal(np.isnan(cos_a), np.isnan(cos_b))
    assert np.isfinite(cos_a).sum() > 10  # two live tasks: real cosines, not all NaN
    np.testing.assert_allclose(cos_a, cos_b, atol=1e-5)
    for var in ("norm_und", "norm_gen"):
        np.testing.assert_allclose(a[var].values, b[var].values, rtol=1e-5, atol=1e-9)


def test_parameters_after_training_match(runs):
    pa = torch.load(runs["r2"] / "checkpoint.pt", weights_only=True)
    pb = torch.load(runs["r1"] / "checkpoint.pt", weights_only=True)
    assert pa["step"] == pb["step"] == 4
    assert pa["extra"]["world_size"] == 2
    for k, v in pb["model"].items():
        torch.testing.assert_close(pa["model"][k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_resume_with_another_world_size_is_an_error(runs, tmp_path):
    proc = single(*ARGS, "--steps", "6", "--out", str(runs["r2"]), "--resume")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "trained on 2 process(es)" in err[0], proc.stderr
    # and the other way round, under torchrun: every rank refuses, nothing hangs
    proc = torchrun(*ARGS, "--steps", "6", "--out", str(runs["r1"]), "--resume")
    assert proc.returncode != 0
    assert "trained on 1 process(es)" in proc.stderr
    assert open_run(runs["r1"]).committed_steps("routing") == 4  # untouched


def test_global_batch_must_split_over_ranks(tmp_path):
    proc = torchrun(*ARGS, "--steps", "1", "--out", str(tmp_path / "r"),
                    "--set", "train.batch_size=6", "--set", "train.micro_batches=2")
    assert proc.returncode != 0
    assert "train.batch_size (6) must be divisible by the number of processes" in proc.stderr
    assert not (tmp_path / "r").exists()
