"""End-to-end runs through the CLI entry point (in-process), on the tiny recipes.

One stage-1 base is trained per module into a temporary MOE_PROBE_CACHE and shared by the
tests, as real runs share it.
"""

from __future__ import annotations

import json

import pytest
import torch

from moe_probe import open_run
from moe_probe.cli import main


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("base-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("MOE_PROBE_CACHE", str(path))
    yield path
    mp.undo()


def _train(out, *extra):
    return main(["train", "--recipe", extra[0] if extra else "tiny-symbiotic", "--out", str(out),
                 "--quiet", *extra[1:]])


def _state(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_tiny_symbiotic_end_to_end_writes_a_run(cache, tmp_path, capsys):
    run = tmp_path / "sym"
    assert _train(run, "tiny-symbiotic") == 0
    out = capsys.readouterr().out
    assert f"moe-probe info {run}" in out and "moe-probe diagnose" in out and "moe-probe dash" in out
    store = open_run(run)
    assert store.committed_steps("loss") == 6 and store.committed_steps("routing") == 6
    evals = store.dataset("eval")
    assert list(evals["step"].values) == [0, 4, 6]
    assert set(evals["metric"].values) == {"text_loss", "digit_acc", "flow_loss", "gen_acc"}
    assert store.attrs["run"]["recipe"] == "tiny-symbiotic"
    # Chosen groups: saved as JSON, in the config, and in the checkpoint.
    groups = json.loads((run / "groups.json").read_text())["groups"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["groups"] == groups and len(groups) == 2
    assert all(len(g) == 6 for g in groups)  # round(3/4 · 8) most-used experts per layer
    assert _state(run)["groups"] == groups
    # The groups are the base's most-used experts on understanding data (recount and compare).
    from moe_probe.data import MultimodalData
    from moe_probe.model import MultimodalMoE, choose_groups
    from moe_probe.train.config import run_config_from_json
    from moe_probe.train.stages import UND_MIX, count_expert_use
    from dataclasses import replace
    base_dir = next(p for p in cache.iterdir() if p.is_dir())
    bstate = _state(base_dir)
    bcfg = run_config_from_json(bstate["config"])
    base = MultimodalMoE(bcfg.model, len(bstate["tokenizer"]["words"]))
    base.load_state_dict(bstate["model"])
    scfg = run_config_from_json((run / "config.json").read_text())
    data = MultimodalData(replace(scfg.data, mix=UND_MIX), scfg.train.seed)
    counts = count_expert_use(base, data, scfg.train.group_batches, scfg.train.batch_size,
                              scfg.train.seed)
    assert [list(g) for g in choose_groups(counts, 0.75)] == groups


def test_info_json_and_same_params_for_moe_and_symbiotic(cache, tmp_path, capsys):
    runs = {}
    for arch in ("moe", "symbiotic", "mot"):
        run = tmp_path / arch
        assert _train(run, f"tiny-{arch}", "--steps", "1") == 0
        capsys.readouterr()
        assert main(["info", str(run), "--json"]) == 0
        runs[arch] = json.loads(capsys.readouterr().out)
    for arch, info in runs.items():
        assert info["arch"] == arch and info["steps_done"] == 1
        assert info["n_params"] > 0 and info["layers"] == ["0", "1"]
        assert info["experts"] == (16 if arch == "mot" else 8)  # MoT: both towers
        assert info["modalities"] == ["text", "vit", "vae"]
        assert info["top_k"] == 2 and info["capacity_factor"] == 1.25 and info["shared_experts"] == 1
        assert info["committed"]["loss"] == 1
    assert runs["moe"]["n_params"] == runs["symbiotic"]["n_params"]  # zero extra parameters
    assert runs["mot"]["n_params"] > runs["moe"]["n_params"]          # untied towers
    assert runs["moe"]["groups"] is None
    sym_groups = runs["symbiotic"]["groups"]
    assert set(sym_groups) == {"0", "1"}
    for g in sym_groups.values():
        assert sorted(g["und"] + g["gen"]) == list(range(8)) and len(g["gen"]) == 2
    # All three share one base (the cache key ignores the stage-2 arch).
    assert len({info["base"]["dir"] for info in runs.values()}) == 1
    # Plain-text info names the same things.
    assert main(["info", str(tmp_path / "symbiotic")]) == 0
    text = capsys.readouterr().out
    assert "symbiotic" in text and "groups" in text and "store" in text


def test_stage1_is_cached_and_reused(cache, tmp_path, capsys):
    assert _train(tmp_path / "a", "tiny-und_only", "--steps", "1") == 0
    bases = [p for p in cache.iterdir() if p.is_dir()]
    assert len(bases) == 1
    ckpt = bases[0] / "checkpoint.pt"
    before = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    main(["train", "--recipe", "tiny-und_only", "--out", str(tmp_path / "b"), "--steps", "0"])
    assert "reusing base" in capsys.readouterr().out
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before
    # A different base config (another seed) trains a second base.
    assert _train(tmp_path / "c", "tiny-und_only", "--steps", "0", "--seed", "1") == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    # und_only trains no generation: its generation metrics are NaN, not noise.
    ev = open_run(tmp_path / "a").dataset("eval")["value"]
    assert torch.isnan(torch.tensor(float(ev.sel(metric="gen_acc")[-1])))
    # ... and `info --json` stays strict JSON (null, not NaN).
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert info["eval"]["gen_acc"] is None and info["eval"]["digit_acc"] is not None


def test_resume_is_exact(cache, tmp_path):
    """2N steps in one go == N steps, then --resume to 2N (constant LR after warm-up, so the
    schedule of the N-step run is the first half of the 2N-step one)."""
    const = ["--set", "train.min_lr_ratio=1.0", "--set", "model.bias_balance=true"]
    full, half = tmp_path / "full", tmp_path / "half"
    assert _train(full, "tiny-symbiotic", "--steps", "6", *const) == 0
    assert _train(half, "tiny-symbiotic", "--steps", "3", *const) == 0
    assert main(["train", "--recipe", "tiny-symbiotic", "--out", str(half), "--steps", "6",
                 "--resume", "--quiet"]) == 0
    a, b = _state(full), _state(half)
    assert a["step"] == b["step"] == 6
    assert json.loads((half / "config.json").read_text())["train"]["steps"] == 6
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    assert torch.equal(a["generator"], b["generator"])
    # The trace rows agree too (loss every step; eval re-written at the resume step).
    la, lb = (open_run(r).dataset("loss")["value"].values for r in (full, half))
    assert la.shape == lb.shape == (6, 6) and (la == lb).all()
    ea, eb = (open_run(r).dataset("eval") for r in (full, half))
    assert list(eb["step"].values) == [0, 3, 4, 6]
    assert (ea["value"].sel(step=6).values == eb["value"].sel(step=6).values).all()


def test_resume_after_a_crash_past_the_checkpoint(cache, tmp_path):
    """A run that died after writing trace rows past its last checkpoint resumes from that
    checkpoint: the stale rows are dropped and re-written, the result equals a clean run."""
    import shutil

    const = ["--set", "train.min_lr_ratio=1.0"]
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert _train(clean, "tiny-symbiotic", "--steps", "6", *const) == 0
    assert _train(crashed, "tiny-symbiotic", "--steps", "4", *const) == 0
    saved = tmp_path / "ckpt-4"
    saved.mkdir()
    for f in ("checkpoint.pt", "progress.json"):
        shutil.copy2(crashed / f, saved / f)
    assert main(["train", "--recipe", "tiny-symbiotic", "--out", str(crashed), "--steps", "6",
                 "--resume", "--quiet"]) == 0
    # "Crash": the store holds steps 4-5 and the eval at 6, the checkpoint is back at step 4.
    for f in ("checkpoint.pt", "progress.json"):
        shutil.copy2(saved / f, crashed / f)
    assert main(["train", "--recipe", "tiny-symbiotic", "--out", str(crashed), "--steps", "6",
                 "--resume", "--quiet"]) == 0
    a, b = _state(clean), _state(crashed)
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    la, lb = (open_run(r).dataset("loss") for r in (clean, crashed))
    assert list(lb["step"].values) == list(range(6)) and (la["value"].values == lb["value"].values).all()
    assert list(open_run(crashed).dataset("eval")["step"].values) == [0, 4, 6]
    # Probes keep their cadence across the resume: no extra probe row at the resume step.
    pa, pb = (list(open_run(r).dataset("probe")["step"].values) for r in (clean, crashed))
    assert pa == pb == [0, 6]
    # Router saturation continues too: the snapshot row re-written at the resume step compares
    # with step 0's routing again (the reference travels in the checkpoint), as in the clean run.
    sa, sb = (open_run(r).dataset("snapshot")["saturation"] for r in (clean, crashed))
    assert list(sb["step"].values) == [0, 4, 6]
    assert torch.isfinite(torch.from_numpy(sb.sel(step=[4, 6]).values)).all()
    assert (sa.fillna(-1).values == sb.fillna(-1).values).all()  # step 0 has no reference: NaN
