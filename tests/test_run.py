"""moe_probe.run.Run: atomic creation, start over in place, refusals that change nothing."""

import os
import stat

import numpy as np
import pytest

from moe_probe.run import Run, config_diff, find_runs, open_run
from moe_probe.store import StoreWriter, default_coords


def _layout(experts=2):
    return dict(store_attrs={"run": {"name": "r"}, "model": {"arch": "moe", "layers": ["0"]}},
                store_coords=default_coords(layers=["0"], n_experts=experts, isolated_metrics=None,
                                            groups=("loss", "routing")))


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_create_writes_everything_at_once_with_the_usual_mode(tmp_path):
    run = Run(tmp_path / "runs" / "a")
    run.create(**_layout(), config={"recipe": "x", "train": {"seed": 1, "steps": 5}},
               summary={"n_params": 10})
    assert run.exists() and run.has_config() and not run.has_checkpoint()
    assert open_run(run.path).groups == ["routing", "loss"]
    assert not list((tmp_path / "runs").glob(".*"))  # no hidden leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(run.path.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    info = run.info()
    assert (info.recipe, info.seed, info.steps_planned, info.n_params) == ("x", 1, 5, 10)
    assert info.committed == {"routing": 0, "loss": 0} and info.steps_done == 0


def test_create_refuses_a_non_empty_directory_and_leftovers_are_cleaned(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        Run(tmp_path / "a").create(**_layout())
    assert _files(tmp_path) == {"a/mine.txt": b"keep"}
    # A creation killed midway leaves a hidden sibling; readers skip it, the next creation removes it.
    (tmp_path / ".b.creating-123-ff").mkdir()
    (tmp_path / ".b.creating-123-ff" / "config.json").write_text("{}")
    assert find_runs(tmp_path) == []
    Run(tmp_path / "b").create(**_layout())
    assert not (tmp_path / ".b.creating-123-ff").exists()
    assert find_runs(tmp_path) == [tmp_path / "b"]


def test_start_over_truncates_in_place_and_refuses_another_layout_untouched(tmp_path):
    run = Run(tmp_path / "r")
    run.create(**_layout(), config={"recipe": "x"})
    w, _ = StoreWriter.resume(run.store_path)
    for s in range(3):
        w.append("loss", s, value=np.full(6, s, np.float32))
    w.close()
    before = _files(tmp_path)
    with pytest.raises(ValueError, match="stored trace layout differs .*groups routing"):
        run.start_over(**_layout(experts=4), config={"recipe": "x"})
    assert _files(tmp_path) == before
    run.start_over(**_layout(), config={"recipe": "x"}, summary={"n_params": 1})
    assert open_run(run.path).committed_steps("loss") == 0
    assert run.summary() == {"n_params": 1}


@pytest.mark.parametrize("target, needle", [
    ("f", "is a file, not a run directory"),
    ("f/sub/run", "is a file, so no directory"),
])
def test_check_writable(tmp_path, target, needle):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=needle):
        Run(tmp_path / target).check_writable()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe left nothing


def test_config_diff_names_nested_keys():
    a = {"recipe": "x", "model": {"top_k": 2, "d": 4}, "train": {"steps": 3}}
    b = {"recipe": "x", "model": {"top_k": 1, "d": 4}, "train": {"steps": 3, "lr": 1}}
    assert config_diff(a, b) == ["model.top_k", "train.lr"]
