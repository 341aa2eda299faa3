"""``moe-probe probe`` on a checkpoint written by the trainer's checkpoint module."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moe_probe.cli import main
from moe_probe.data import MultimodalData
from moe_probe.model import MultimodalMoE, convert
from moe_probe.train import checkpoint
from moe_probe.train.config import to_json
from moe_probe.train.recipes import recipe
from moe_probe.train.probe import load_run_model


def _save_run(run_dir, arch):
    cfg = recipe(f"tiny-{arch}")
    data = MultimodalData(cfg.data, cfg.train.seed)
    torch.manual_seed(1)
    model = MultimodalMoE(replace(cfg.model, arch="moe", groups=None), data.tokenizer.vocab_size)
    groups = None
    if arch == "symbiotic":
        groups = ((0, 2, 4, 5, 6, 7), (1, 2, 3, 4, 5, 7))
        model = convert(model, "symbiotic", groups=groups)
        cfg = replace(cfg, model=replace(cfg.model, groups=groups))
    with torch.no_grad():  # move off the init so a wrong load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    checkpoint.save(run_dir, model=model, optimizer=None, generator=torch.Generator(), step=6,
                    config_json=to_json(cfg), tokenizer_state=data.tokenizer.state_dict(),
                    groups=[list(g) for g in groups] if groups else None)
    return model


@pytest.mark.parametrize("arch", ["symbiotic", "moe"])
def test_probe_command_loads_checkpoint_and_prints_table(tmp_path, capsys, arch):
    saved = _save_run(tmp_path, arch)
    model, _, cfg, step = load_run_model(tmp_path)
    assert step == 6 and cfg.model.arch == arch
    ref = saved.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert main(["probe", str(tmp_path), "--tasks", "vit_digit", "isolated"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "vit_digit" in ln]
    assert len(lines) == len(model.moe_layers())
    for ln in lines:
        acc, ctl, sel = map(float, ln.split()[2:5])
        assert 0 <= acc <= 1 and 0 <= ctl <= 1 and sel == pytest.approx(acc - ctl, abs=2e-3)
    assert "text_topic" not in out and "isolated" in out and "digit_acc" in out


def test_probe_command_user_errors(tmp_path, capsys):
    _save_run(tmp_path, "moe")
    assert main(["probe", str(tmp_path), "--step", "3"]) == 2
    assert "step 6" in capsys.readouterr().err
    assert main(["probe", str(tmp_path), "--tasks", "nope"]) == 2
    assert main(["probe", str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["probe", str(empty)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
