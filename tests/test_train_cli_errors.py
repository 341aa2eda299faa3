"""User errors of `moe-probe train` / `info`: exit code 2, one line on stderr, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moe_probe.cli import main
from moe_probe.run import Run


def _run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "moe_probe", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["train", "--recipe", "nope"], "unknown recipe 'nope'; known: base"),
    (["train", "--recipe", "tiny-moe", "--out", "{tmp}/a/b", "--steps", "-1"], "--steps must be"),
])
def test_real_process_exits_2_with_one_line(tmp_path, args, needle):
    p = _run(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("moe-probe ") and needle in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # a rejected command writes nothing


@pytest.mark.parametrize("args, needle", [
    (["train", "--recipe", "tiny-moe", "--set", "model.topk=2"], "did you mean model.top_k"),
    (["train", "--recipe", "tiny-moe", "--set", "train.steps"], "expects KEY=VALUE"),
    (["train", "--recipe", "tiny-moe", "--steps", "-1"], "--steps must be >= 0"),
    (["train", "--recipe", "tiny-moe", "--set", "train.steps=-4"], "train.steps must be >= 0"),
    (["train", "--recipe", "tiny-symbiotic", "--set", "model.top_k=3"], "larger than the gen group"),
    (["train", "--recipe", "tiny-symbiotic", "--set", "model.und_fraction=0.95"], "group is empty"),
    (["train", "--recipe", "tiny-moe", "--set", "train.micro_batches=3"], "divisible"),
    (["info", "{tmp}/missing"], "no run directory"),
    (["info", "{tmp}"], "not a moe-probe run"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, needle):
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["train", "--recipe", "tiny-moe", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "config.json").read_text() == "{}"
    other = tmp_path / "scan"  # e.g. an HF scan: a store but no training config
    (other / "traces.zarr").mkdir(parents=True)
    assert main(["train", "--recipe", "tiny-moe", "--out", str(other)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["traces.zarr"]


def _snapshot(root):
    """Every file under root with its bytes: a refused command must leave them all as they were."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make, out, needle", [
    (lambda t: (t / "notes.txt").write_text("mine"), "notes.txt", "is a file, not a run directory"),
    (lambda t: (t / "notes.txt").write_text("mine"), "notes.txt/run", "is a file, so no directory"),
    (lambda t: (t / "data").mkdir() or (t / "data" / "x.csv").write_text("1,2"), "data",
     "holds files that are not a moe-probe run"),
])
def test_out_that_cannot_be_a_run_exits_2_in_a_real_process(tmp_path, make, out, needle):
    make(tmp_path)
    before = _snapshot(tmp_path)
    p = _run("train", "--recipe", "tiny-moe", "--out", str(tmp_path / out), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr and needle in lines[0], p.stderr
    assert _snapshot(tmp_path) == before


def test_out_where_nothing_can_be_written_exits_2(tmp_path, capsys):
    # /proc refuses new entries even to root (a chmod'ed directory would not stop root).
    rc = main(["train", "--recipe", "tiny-moe", "--out", "/proc/moe-probe-run"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot write in /proc" in err, err


def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--recipe", "tiny-base", "--steps", "2", "--quiet", "--out", str(run)]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    for args, needle in (
        (["--set", "model.top_k=1", "--set", "data.seq_len=20"],
         "config differs in data.seq_len, model.top_k (only train.* and trace.* may change"),
        (["--seed", "3"], "config differs in train.seed (0 saved, 3 given)"),
    ):
        assert main(["train", "--recipe", "tiny-base", "--resume", "--out", str(run), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert main(["train", "--recipe", "tiny-moe", "--resume", "--out", str(run)]) == 2
    assert "config differs in recipe ('tiny-base' saved, 'tiny-moe' given)" in capsys.readouterr().err
    assert _snapshot(run) == before  # refused: every run file as it was
    # A schedule change is a resume, not a refusal.
    assert main(["train", "--recipe", "tiny-base", "--resume", "--out", str(run), "--steps", "3",
                 "--quiet"]) == 0
    assert Run(run).progress() == 3
