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

# Probes (sklearn fits at eval) are not what is compared here and cost seconds per launch.
# Loss-free balancing on: its per-rank expert loads must be summed over ranks too.
ARGS = ["--recipe", "tiny-base", "--quiet", "--set", "data.mix=6,2,2", "--set", "trace.grad_every=1",
        "--set", "trace.probe_every=0", "--set", "model.bias_balance=true"]
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
def fresh(tmp_path_factory):
    """2 steps on 2 ranks and on 1 process with micro_batches=2 (the same global batch)."""
    root = tmp_path_factory.mktemp("dist")
    r2, r1 = root / "r2", root / "r1"
    out = {"root": root, "r2": r2, "r1": r1}
    out["launch"] = _ok(torchrun(*ARGS, "--steps", "2", "--out", str(r2)))
    _ok(single(*ARGS, "--steps", "2", "--out", str(r1), "--set", "train.micro_batches=2"))
    return out


@pytest.fixture(scope="module")
def resumed(fresh):
    """Both runs resumed to 4 steps (the 2-rank one on 2 ranks again)."""
    fresh["resume_launch"] = _ok(torchrun(*ARGS, "--steps", "4", "--out", str(fresh["r2"]),
                                          "--resume"))
    _ok(single(*ARGS, "--steps", "4", "--out", str(fresh["r1"]), "--set", "train.micro_batches=2",
               "--resume"))
    return fresh


def test_store_is_written_once_by_rank_0(fresh):
    assert sorted(p.parent.name for p in fresh["root"].rglob("traces.zarr")) == ["r1", "r2"]
    assert fresh["launch"].stdout.count("run: ") == 1  # only rank 0 reports
    a, b = open_run(fresh["r2"]), open_run(fresh["r1"])
    assert a.groups == b.groups
    for g in a.groups:
        steps = a.dataset(g)["step"].values
        assert len(np.unique(steps)) == len(steps), f"duplicate rows in {g}: {steps}"
        np.testing.assert_array_equal(steps, b.dataset(g)["step"].values)
    assert a.committed_steps("routing") == a.committed_steps("loss") == 2
    assert a.committed_steps("eval") == 2  # start and end, once each


def _same_counts(a, b):
    for var in ("tokens", "load", "kept"):
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)


def test_routing_counts_equal_single_process_exactly(fresh):
    a, b = open_run(fresh["r2"]).dataset("routing"), open_run(fresh["r1"]).dataset("routing")
    _same_counts(a, b)
    # Global counts: the global batch's tokens (8 samples × 24 positions at most), not a
    # rank's half of them.
    per_layer = a["tokens"].values.sum(-1)
    assert per_layer.max() <= 8 * 24 and per_layer.min() > 8 * 24 // 2


def test_derived_routing_and_losses_match(fresh):
    a, b = open_run(fresh["r2"]), open_run(fresh["r1"])
    for var in ("capacity_rate", "entropy", "maxvio", "dead_frac", "confidence", "router_z"):
        np.testing.assert_allclose(a.dataset("routing")[var].values,
                                   b.dataset("routing")[var].values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.dataset("loss")["value"].values, b.dataset("loss")["value"].values,
                               rtol=1e-6)
    np.testing.assert_allclose(a.dataset("eval")["value"].values, b.dataset("eval")["value"].values,
                               rtol=1e-5, atol=1e-6)


def _same_grads(a, b):
    cos_a, cos_b = a["cosine"].values, b["cosine"].values
    np.testing.assert_array_equal(np.isnan(cos_a), np.isnan(cos_b))
    assert np.isfinite(cos_a).sum() > 10  # two live tasks: real cosines, not all NaN
    np.testing.assert_allclose(cos_a, cos_b, atol=1e-5)
    for var in ("norm_und", "norm_gen"):
        np.testing.assert_allclose(a[var].values, b[var].values, rtol=1e-5, atol=1e-9)


def test_gradient_cosines_and_norms_match(fresh):
    a, b = open_run(fresh["r2"]).dataset("grad"), open_run(fresh["r1"]).dataset("grad")
    assert a.sizes["step"] == 2
    _same_grads(a, b)


def _same_params(r2, r1, step):
    pa = torch.load(r2 / "checkpoint.pt", weights_only=True)
    pb = torch.load(r1 / "checkpoint.pt", weights_only=True)
    assert pa["step"] == pb["step"] == step
    assert pa["extra"]["world_size"] == 2
    for k, v in pb["model"].items():
        torch.testing.assert_close(pa["model"][k], v, rtol=1e-5, atol=1e-7, msg=k)
    biases = [v for k, v in pa["model"].items() if k.endswith("bias_E")]
    assert biases and any(b.abs().sum() > 0 for b in biases)  # the bias steps did happen


def test_parameters_after_training_match(fresh):
    _same_params(fresh["r2"], fresh["r1"], 2)


def test_resume_with_the_same_world_size_continues(resumed):
    a, b = open_run(resumed["r2"]), open_run(resumed["r1"])
    assert a.committed_steps("routing") == a.committed_steps("grad") == 4
    np.testing.assert_array_equal(a.dataset("routing")["step"].values, np.arange(4))
    _same_counts(a.dataset("routing"), b.dataset("routing"))
    _same_grads(a.dataset("grad"), b.dataset("grad"))
    _same_params(resumed["r2"], resumed["r1"], 4)


def test_resume_with_another_world_size_is_an_error(fresh):
    proc = single(*ARGS, "--steps", "6", "--out", str(fresh["r2"]), "--resume")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "trained on 2 process(es)" in err[0], proc.stderr
    # and the other way round, under torchrun: every rank refuses, nothing hangs
    before = open_run(fresh["r1"]).committed_steps("routing")
    proc = torchrun(*ARGS, "--steps", "6", "--out", str(fresh["r1"]), "--resume")
    assert proc.returncode != 0
    assert "trained on 1 process(es)" in proc.stderr
    assert open_run(fresh["r1"]).committed_steps("routing") == before  # untouched


def test_global_batch_must_split_over_ranks(tmp_path):
    proc = torchrun(*ARGS, "--steps", "1", "--out", str(tmp_path / "r"),
                    "--set", "train.batch_size=6", "--set", "train.micro_batches=2")
    assert proc.returncode != 0
    assert "train.batch_size (6) must be divisible by the number of processes" in proc.stderr
    assert not (tmp_path / "r").exists()
