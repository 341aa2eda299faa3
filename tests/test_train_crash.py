"""`moe-probe train` killed with SIGKILL at several moments, then `--resume`: the store ends equal
to an uninterrupted run's (same steps, same numbers, no duplicates). Real processes, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_probe.run import Run, open_run

ARGS = ["--recipe", "tiny-base", "--quiet", "--steps", "100",
        "--set", "train.checkpoint_every=60", "--set", "train.eval_every=20"]
"""Checkpoint at step 60 only: the store's first rows are committed (the writer lingers up to 2 s)
well before it, so there is a moment with rows but no checkpoint."""


def _train(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "moe_probe", "train", *ARGS, "--out", str(out),
                             *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _committed(run: Path, group: str) -> int:
    meta = run / "traces.zarr" / group / "zarr.json"
    try:
        return int(json.loads(meta.read_text())["attributes"].get("committed_steps", 0))
    except (OSError, ValueError):
        return 0


def _creating(run: Path) -> bool:
    return any(run.parent.glob(f".{run.name}.creating-*")) and not run.exists()


def _before_checkpoint(run: Path) -> bool:
    return _committed(run, "loss") > 0 and not Run(run).has_checkpoint()


def _mid_run(run: Path) -> bool:
    return Run(run).has_checkpoint() and _committed(run, "loss") > 60


def _kill_when(out: Path, moment) -> None:
    p = _train(out)
    try:
        while p.poll() is None:
            if moment(out):
                p.send_signal(signal.SIGKILL)
                p.wait()
                assert moment(out) or moment is _creating and not out.exists()
                return
            time.sleep(0.0005)
        pytest.fail(f"the run ended before the moment came: {p.stderr.read()[-500:]}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _store(run: Path) -> dict:
    r = open_run(run)
    out = {}
    for g in r.groups:
        ds = r.dataset(g).load()
        out[g] = {"step": ds["step"].values,
                  **{k: ds[k].values for k in ds.data_vars}}
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for g in a:
        steps = b[g]["step"]
        assert len(np.unique(steps)) == len(steps), f"{g}: duplicate steps"
        for k in a[g]:
            np.testing.assert_array_equal(a[g][k], b[g][k], err_msg=f"{g}/{k}")  # NaN == NaN


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    p = _train(ref)
    assert p.wait() == 0, p.stderr.read()
    want = _store(ref)
    assert len(want["loss"]["step"]) == 100 and list(want["eval"]["step"]) == [0, 20, 40, 60, 80, 100]
    ref_ckpt = torch.load(Run(ref).checkpoint_path, weights_only=True)

    for name, moment in (("creating", _creating), ("before_checkpoint", _before_checkpoint),
                         ("mid_run", _mid_run)):
        run = tmp_path / name
        _kill_when(run, moment)
        p = _train(run, "--resume")
        assert p.wait() == 0, f"{name}: {p.stderr.read()}"
        _assert_same(want, _store(run))
        got = torch.load(Run(run).checkpoint_path, weights_only=True)
        for k, t in ref_ckpt["model"].items():
            assert torch.equal(t, got["model"][k]), (name, k)
        assert not list(tmp_path.glob(f".{name}.creating-*")), "leftover of the killed creation"
