"""A rank that dies mid-run stops the whole run promptly, and the store stays readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from moe_probe import open_run

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank_of(pid: int) -> int | None:
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _committed(run: Path) -> int:
    try:
        return open_run(run).committed_steps("routing")
    except Exception:  # noqa: BLE001 - not created yet
        return 0


@pytest.mark.parametrize("victim", [1, 0], ids=["rank1", "rank0-the-writer"])
def test_killing_one_rank_stops_the_run_and_keeps_the_store(tmp_path, victim):
    run = tmp_path / "r"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_PROBE_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "moe_probe", "train", "--recipe", "tiny-base", "--steps", "400", "--quiet",
           "--out", str(run)]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _committed(run) < 3:
            assert launcher.poll() is None, launcher.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run committed no steps in time"
            time.sleep(0.3)
        victims = [p for p in _children(launcher.pid) if _rank_of(p) == victim]
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = launcher.communicate(timeout=90)  # bounded: a hang fails the test
        waited = time.monotonic() - t0
    finally:
        if launcher.poll() is None:  # only the session this test started
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0
    assert "FAILED" in err and "Signal 9 (SIGKILL)" in err  # torchrun's report: the dead rank
    assert waited < 60
    store = open_run(run)
    n = store.committed_steps("routing")
    assert 3 <= n < 400  # rank 0 may have died mid-append: rows past the marker are not read
    ds = store.dataset("routing")
    assert ds.sizes["step"] == n
    np.testing.assert_array_equal(ds["step"].values, np.arange(n))
    assert np.isfinite(store.dataset("loss")["value"].values[:, -1]).all()
