"""The analyses/ notebooks (jupytext percent scripts) run end to end on fixture stores.

jupytext → nbformat → nbclient with the python3 kernel; each must finish without error and
print a value the test reads independently from the same store through the public reader.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = ROOT / "analyses"
sys.path.insert(0, str(ROOT))

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

from moe_probe import open_run  # noqa: E402


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from fixtures.generate import build

    out = tmp_path_factory.mktemp("nb_fixtures")
    for name in ("healthy", "collapse", "grad_conflict", "und_only_control", "live"):
        build(name, out)
    return out


def _run(name: str, env: dict, cwd: Path) -> str:
    nb = jupytext.read(ANALYSES / name)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits the test's environment
    try:
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=180,
                                         resources={"metadata": {"path": str(cwd)}})
        client.execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o.get("output_type") != "error", o
            out.append(o.get("text", ""))
            out.append(str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def _env(runs, control=None):
    env = {"MOE_PROBE_RUNS": os.pathsep.join(map(str, runs)), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    if control:
        env["MOE_PROBE_CONTROL"] = str(control)
    return env


def test_capacity_dynamics(fx):
    # the live store is being written: the notebook reads its committed rows only
    text = _run("capacity_dynamics.py", _env([fx / "collapse", fx / "live"]), ANALYSES)
    for name in ("collapse", "live"):
        ds = open_run(fx / name).dataset("routing")
        v = float(ds["capacity_rate"].isel(step=-1).mean("layer").sel(modality="text"))
        assert f"{name} text={v:.4f}" in text


def test_gradient_conflicts(fx):
    text = _run("gradient_conflicts.py", _env([fx / "healthy", fx / "grad_conflict"]), ANALYSES)
    cos = open_run(fx / "grad_conflict").dataset("grad")["cosine"].sel(component="attn").values
    # the notebook's summary: median over layers of each layer's median cosine
    meds = [np.median(c[np.isfinite(c)]) for c in cos.T if np.isfinite(c).any()]
    assert f"grad_conflict attn={np.median(meds):.4f}" in text


def test_shared_expert_probes_with_control(fx):
    text = _run("shared_expert_probes.py",
                _env([fx / "healthy"], control=fx / "und_only_control"), ANALYSES)
    ds = open_run(fx / "und_only_control").dataset("probe")
    x = ds["isolated"].sel(metric="digit_acc").values
    assert f"und_only_control (control): isolated digit_acc {x[0]:.4f} -> {x[-1]:.4f}" in text


def test_default_generates_fixtures(tmp_path):
    # no MOE_PROBE_RUNS: the notebook makes its own fixture stores and still runs
    env = {"MOE_PROBE_RUNS": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TMPDIR": str(tmp_path)}  # the notebook's temp fixture dir is cleaned with tmp_path
    text = _run("gradient_conflicts.py", env, ANALYSES)
    assert "grad_conflict attn=" in text


def test_hf_trainer_finetune(tmp_path):
    """Fine-tunes a tiny HF MoE under the real Trainer with TraceCallback, then reads the store."""
    env = {"MOE_PROBE_OUT": str(tmp_path / "run"), "MOE_PROBE_STEPS": "4", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    text = _run("hf_trainer_finetune.py", env, ANALYSES)
    r = open_run(tmp_path / "run").dataset("routing")
    assert "steps [1, 2, 3, 4] tokens/step [256]" in text
    share = r["load"] / r["load"].sum("expert")
    last = share.isel(step=-1).sel(layer=r["layer"].values[0])
    for kind in ("word", "punct"):
        assert f"{kind}: top expert {int(last.sel(modality=kind).argmax())} " \
               f"share={float(last.sel(modality=kind).max()):.4f}" in text
