"""Online findings: the diagnose detectors during training, on the rows as they are written.

A real collapse, not a fabricated one: moe_probe's tiny ``moe`` recipe from a fresh base, no
balance loss, the routers at LR 1.0 (everything else at 3e-3). The same settings at the normal
router LR is the healthy control. Both are checked by the offline ``diagnose`` on the store.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

torch.set_num_threads(1)

import moe_probe  # noqa: E402
from moe_probe.cli import main  # noqa: E402
from moe_probe.diagnose.rundata import load_run  # noqa: E402
from moe_probe.diagnose.runner import diagnose_run  # noqa: E402
from moe_probe.run import Run  # noqa: E402
from moe_probe.trace.online import FindingWarning, StopTraining  # noqa: E402

SETTINGS = ["model.aux_weight=0", "base.steps=0", "train.batch_size=16",
            "model.capacity_factor=2.0", "train.eval_every=0", "train.checkpoint_every=0"]
COLLAPSE = ["train.lr_router=1.0"]
STOP_STEP = 39
"""Last step the collapsing run trains (deterministic on CPU: seed 0, one thread)."""


def _train(out, steps, extra=(), resume=False, fail_on="collapse"):
    argv = ["train", "--recipe", "tiny-moe", "--steps", str(steps), "--out", str(out), "--quiet"]
    argv += [a for s in [*SETTINGS, *extra] for a in ("--set", s)]
    argv += ["--resume"] * resume + (["--fail-on", fail_on] if fail_on else [])
    return main(argv)


def test_fail_on_collapse_stops_a_real_collapse_at_detection_and_resumes(tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("MOE_PROBE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "collapse"
    assert _train(run, 60, COLLAPSE) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    m = re.fullmatch(r"moe-probe train: --fail-on collapse: critical (\w+) in layer\(s\) ([\d, ]+)"
                     r"(?: \((\w+)\))? from step (\d+); stopped after step (\d+) \(checkpoint at "
                     r"step (\d+); continue with --resume\)", err[0])
    assert m, err[0]
    kind, layers, modality, onset, stop, ckpt = m.groups()
    assert int(stop) == STOP_STEP and int(ckpt) == STOP_STEP + 1
    assert int(onset) <= int(stop)
    # Store and checkpoint agree: every row up to the stop step, the checkpoint right after it.
    info = Run(run).info()
    assert info.steps_done == STOP_STEP + 1
    assert moe_probe.open_run(run).last_step("routing") == STOP_STEP
    # The offline diagnosis of the finished store reports the very finding that stopped it.
    offline = diagnose_run(load_run(run))
    f = next(f for f in offline.findings if f.kind == kind and f.severity == "critical")
    assert (f.onset_step, ", ".join(f.layers), f.modality) == (int(onset), layers, modality)
    # Resumed with --fail-on, the diagnosis starts from the committed rows: it stops again at
    # the next check, on the same finding.
    assert _train(run, 60, COLLAPSE, resume=True) == 1
    again = capsys.readouterr().err
    assert f"{kind} in layer(s) {layers}" in again and "stopped after step 49" in again
    assert Run(run).info().steps_done == 50
    # A later --resume (without --fail-on) trains on from the checkpoint: no row lost or doubled.
    assert _train(run, 60, COLLAPSE, resume=True, fail_on=None) == 0
    steps = moe_probe.open_run(run).dataset("routing")["step"].values
    assert steps.tolist() == list(range(60))


def test_the_same_run_at_the_normal_router_lr_is_not_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_PROBE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "healthy"
    assert _train(run, 60) == 0
    assert Run(run).info().steps_done == 60
    offline = diagnose_run(load_run(run))
    assert not [f for f in offline.findings if f.kind == "routing_collapse"]
    assert not [f for f in offline.findings if f.severity == "critical"]


def _plain_loop_parts(lr_router):
    """moe_probe's tiny moe model, data and optimizer for a loop of our own (no trainer)."""
    from moe_probe.data import MultimodalData, Tokenizer
    from moe_probe.model import MultimodalMoE
    from moe_probe.train import recipes
    from moe_probe.train.trainer import build_optimizer

    cfg = recipes.recipe("tiny-moe")
    model_cfg = replace(cfg.model, aux_weight=0.0, capacity_factor=2.0)
    tok = Tokenizer.build(cfg.data.vocab_words)
    torch.manual_seed(0)
    model = MultimodalMoE(model_cfg, tok.vocab_size).train()
    data = MultimodalData(cfg.data, 0, tok)
    opt = build_optimizer(model, replace(cfg.train, lr_router=lr_router))
    return model, data, opt


def test_online_findings_equal_offline_diagnose_at_every_check_and_stop_ends_the_loop(tmp_path):
    model, data, opt = _plain_loop_parts(lr_router=1.0)
    gen = torch.Generator().manual_seed(0)
    reported, compared = [], 0
    out = tmp_path / "run"
    with moe_probe.watch(model, out, grad_every=2, tasks=("und", "gen"), diagnose_every=5,
                         on_finding=lambda f: reported.append(f) or False) as w:
        for step in range(40):
            o = model(data.batch("train", 16, gen))
            w.backward(o.task_losses)
            opt.step()
            opt.zero_grad(set_to_none=True)
            w.step(step, losses={k: float(v.detach()) for k, v in o.losses.items()})
            if (step + 1) % 5 == 0:
                w.flush()
                offline = diagnose_run(load_run(out))
                assert w.monitor.diagnosis.to_dict() == offline.to_dict(), step
                compared += 1
        assert not w.should_stop  # a callable that returns False never stops
    assert compared == 8
    assert {f.kind for f in reported} >= {"routing_collapse"}
    assert all(f.onset_step <= 39 for f in reported)


def test_on_finding_stop_and_warn_in_a_plain_loop(tmp_path):
    model, data, opt = _plain_loop_parts(lr_router=1.0)
    gen = torch.Generator().manual_seed(0)
    out = tmp_path / "run"
    with pytest.warns(FindingWarning) as warned:
        with moe_probe.watch(model, out, diagnose_every=5, on_finding="stop") as stopper, \
                moe_probe.watch(model, tmp_path / "warned", diagnose_every=5,
                                on_finding="warn") as warner:
            for step in range(200):
                o = model(data.batch("train", 16, gen))
                o.losses["total"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                stopper.step(step)
                warner.step(step)
                if stopper.should_stop:
                    break
            with pytest.raises(StopTraining):  # a loop that goes on is told why
                stopper.step(step + 1)
    stopped = stopper.stopped
    assert stopped.step == step and (step + 1) % 5 == 0
    assert stopped.finding.severity == "critical" and stopped.finding.onset_step <= step
    assert moe_probe.open_run(out).last_step("routing") == step
    offline = diagnose_run(load_run(out))
    assert stopped.finding.to_dict() in [f.to_dict() for f in offline.findings]
    assert any("moe_probe: " in str(w.message) for w in warned)


def test_bad_on_finding_settings_are_one_line(tmp_path):
    model, _, _ = _plain_loop_parts(lr_router=None)
    for kw, msg in [({"on_finding": "explode"}, "on_finding must be"),
                    ({"on_finding": "stop", "diagnose_every": 0}, "diagnose_every must be"),
                    ({"on_finding": "stop", "fail_on": "everything"}, "fail_on must be one of")]:
        with pytest.raises(ValueError, match=msg):
            moe_probe.watch(model, tmp_path / "run", **kw)
        assert not (tmp_path / "run").exists()


def test_under_torchrun_every_rank_stops_at_rank_0s_check(tmp_path):
    """Rank 0 diagnoses, every rank learns its decision: no rank trains on (or hangs) alone."""
    run = tmp_path / "run"
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moe_probe",
            "train", "--recipe", "tiny-moe", "--steps", "60", "--out", str(run), "--quiet",
            "--fail-on", "collapse", *[a for s in [*SETTINGS, *COLLAPSE] for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_PROBE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("moe-probe train: --fail-on")]
    assert len(lines) == 1, proc.stderr[-3000:]
    stop = int(re.search(r"stopped after step (\d+)", lines[0]).group(1))
    assert (stop + 1) % 10 == 0
    assert Run(run).info().steps_done == stop + 1
    assert moe_probe.open_run(run).last_step("routing") == stop


def test_fail_on_without_routing_rows_is_refused_before_anything_is_written(tmp_path, capsys):
    argv = ["train", "--recipe", "tiny-moe", "--out", str(tmp_path / "r"), "--fail-on", "any",
            "--set", "trace.enabled=false"]
    assert main(argv) == 2
    assert "--fail-on diagnoses the routing rows" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
