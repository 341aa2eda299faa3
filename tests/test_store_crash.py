"""Crash safety: a writer process killed with SIGKILL at random moments, and a reader polling a
store while another process writes it. Real processes, real files."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from moe_probe.run import open_run, store_path
from moe_probe.store import StoreWriter

REPO = Path(__file__).resolve().parents[1]

# Values are functions of the step, so any torn, shifted or garbage row is detected.
VALUES = textwrap.dedent("""
    import numpy as np
    def loss_value(s):
        return (s * 10 + np.arange(6)).astype(np.float32)
    def routing(s):
        f = np.float32(s) / np.float32(1000)
        r = {k: np.full((2, 3), f, np.float32) for k in
             ("kept", "capacity_rate", "entropy", "maxvio", "dead_frac", "confidence")}
        r["tokens"] = np.full((2, 3), s, np.int32)
        r["load"] = (s + np.arange(24)).reshape(2, 3, 4).astype(np.int32)
        r["router_z"] = np.full(2, f, np.float32)
        return r
    def grad(s):
        return {k: np.full((3, 7), s + i, np.float32)
                for i, k in enumerate(("cosine", "norm_und", "norm_gen"))}
""")
exec(VALUES)

CHILD = VALUES + textwrap.dedent("""
    import sys, time
    from moe_probe.run import store_path
    from moe_probe.store import StoreWriter, default_coords
    run, mode = sys.argv[1], sys.argv[2]
    if mode == "create":
        coords = default_coords(layers=["0", "1"], n_experts=4, isolated_metrics=None,
                                groups=("routing", "loss", "grad"))
        w = StoreWriter.create(store_path(run), attrs={"run": {"name": "crash"}, "model": {"arch": "moe"}},
                               coords=coords, chunk_steps={"routing": 64, "loss": 64, "grad": 8},
                               linger=0.002)
    else:
        w, _ = StoreWriter.resume(store_path(run), linger=0.002)
    nxt = {g: (w.last_step(g) + 1 if w.last_step(g) is not None else 0) for g in w.groups}
    s = min(nxt.values())
    print("ready", s, flush=True)
    while True:
        if s >= nxt["loss"]:
            w.append("loss", s, value=loss_value(s))
        if s >= nxt["routing"]:
            w.append("routing", s, **routing(s))
        if s % 10 == 0 and s >= nxt["grad"]:
            w.append("grad", s, **grad(s))
        s += 1
        if s % 20 == 0:
            time.sleep(0.0005)  # let the writer thread interleave (realistic training cadence)
""")


def _spawn(tmp_path, run, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(script), str(run), mode], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        raise AssertionError(f"child did not start: {line!r} {p.stderr.read()}")
    return p, int(line.split()[1])


def _check_committed(run):
    """Every committed row of every group is exactly what the writer was told; steps contiguous."""
    r = open_run(run)
    out = {}
    for g, every in (("loss", 1), ("routing", 1), ("grad", 10)):
        ds = r.dataset(g).load()
        steps = ds["step"].values
        n = steps.size
        np.testing.assert_array_equal(steps, np.arange(n) * every, err_msg=f"{g} steps")
        if g == "loss" and n:
            np.testing.assert_array_equal(ds["value"].values, np.stack([loss_value(s) for s in steps]))
        if g == "routing" and n:
            want = [routing(s) for s in steps]
            for k in ("load", "capacity_rate", "tokens", "router_z"):
                np.testing.assert_array_equal(ds[k].values, np.stack([w[k] for w in want]), k)
        if g == "grad" and n:
            np.testing.assert_array_equal(ds["norm_gen"].values,
                                          np.stack([grad(s)["norm_gen"] for s in steps]))
        out[g] = n
    return out


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    rnd = random.Random()  # kill moments are meant to vary between runs
    run = tmp_path / "run"
    mode, seen = "create", []
    for trial in range(5):
        p, start = _spawn(tmp_path, run, mode)
        time.sleep(rnd.uniform(0.1, 1.0))
        assert p.poll() is None, f"writer child died before the kill: {p.stderr.read()}"
        p.send_signal(signal.SIGKILL)
        p.wait()
        committed = _check_committed(run)
        # resumed children continue where the committed rows end: no gap, no duplicate
        if mode == "resume":
            prev = seen[-1]  # what was committed when the previous child was killed
            grad_next = 10 * (prev["grad"] - 1) + 1 if prev["grad"] else 0
            assert start == min(prev["loss"], prev["routing"], grad_next)
        seen.append(committed)
        mode = "resume"
    # the trials did write and kept it (groups commit one after the other inside a batch, so
    # a kill can leave them at quite different counts: only the total must grow)
    assert sum(seen[-1].values()) > sum(seen[0].values()) > 0, seen
    # a final in-process resume: garbage past the markers is dropped, writing continues
    w, committed = StoreWriter.resume(store_path(run))
    assert committed == {g: seen[-1][g] for g in ("routing", "loss", "grad")}
    assert not list((run / "traces.zarr").rglob("*.partial"))
    n = committed["loss"]
    w.append_rows("loss", np.arange(n, n + 3), value=np.stack([loss_value(s) for s in range(n, n + 3)]))
    w.close()
    assert _check_committed(run)["loss"] == n + 3


@pytest.mark.slow
def test_reader_polling_a_store_being_written(tmp_path):
    run = tmp_path / "run"
    p, _ = _spawn(tmp_path, run, "create")
    try:
        counts, polls, t_end = set(), 0, time.monotonic() + 3.0
        while time.monotonic() < t_end:
            c = _check_committed(run)  # raises on any fill / garbage / torn row
            counts.add(c["routing"])
            polls += 1
        assert p.poll() is None, "writer died while being read"
    finally:
        p.kill()
        p.wait()
    assert len(counts) >= 3, f"reader saw the store grow only {counts} over {polls} polls"
