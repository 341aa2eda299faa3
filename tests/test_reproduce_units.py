"""Fast checks of the reproduce plan, statistics and verdict logic (no training)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from moe_probe.reproduce import claims
from moe_probe.reproduce.config import KINDS, make_config
from moe_probe.reproduce.metrics import METRICS, reduce, window_rows
from moe_probe.reproduce.runner import build_plan
from moe_probe.stats import summarize


def test_plan_covers_every_kind_and_seed_once(tmp_path):
    cfg = make_config(quick=True, seeds=2)
    plan = build_plan(cfg, tmp_path)
    assert len(plan) == len(KINDS) * 2
    assert len({s.run_dir for s in plan}) == len(plan)
    assert {s.run_dir.relative_to(tmp_path).as_posix() for s in plan} == {
        f"{k.name}/seed{s}" for k in KINDS for s in (0, 1)}
    assert all(s.recipe.startswith("tiny-") for s in plan)
    # The 3/4 split is the symbiotic run itself: no kind trains symbiotic at 0.75 again.
    fractions = [o for k in KINDS for o in k.overrides if o.startswith("model.und_fraction")]
    assert sorted(fractions) == ["model.und_fraction=0.25", "model.und_fraction=0.5"]


def test_every_kind_resolves_to_a_valid_config(tmp_path):
    from moe_probe.reproduce.runner import _planned_config

    for quick in (True, False):
        for spec in build_plan(make_config(quick=quick, seeds=1), tmp_path):
            cfg = _planned_config(spec)  # unknown override keys raise here
            assert cfg.train.stage == 2 and cfg.train.seed == 0
            if spec.kind.name == "sym_no_shield":
                assert cfg.train.shielding is False
            if spec.kind.name == "sym_no_difflr":
                assert cfg.train.differential_lr is False
            if spec.kind.name == "sym_und_1_4":
                assert cfg.model.und_fraction == 0.25


def test_all_kinds_of_a_seed_map_to_one_base(tmp_path):
    from moe_probe.reproduce.runner import _planned_config
    from moe_probe.train.stages import base_config, base_key

    plan = build_plan(make_config(quick=True, seeds=2), tmp_path)
    keys = {}
    for spec in plan:
        keys.setdefault(spec.seed, set()).add(base_key(base_config(_planned_config(spec))))
    assert all(len(v) == 1 for v in keys.values()) and keys[0] != keys[1]


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_seed_counts(bad):
    with pytest.raises(ValueError, match="--seeds"):
        make_config(quick=True, seeds=bad)


def test_reductions():
    v = np.array([1.0, 0.5, np.nan, 0.9, 0.8])
    assert reduce(v, "last", 1) == 0.8
    assert math.isclose(reduce(v, "change", 1), -0.2)
    assert reduce(v, "max", 1) == 1.0 and reduce(v, "min", 1) == 0.5
    assert math.isclose(reduce(v, "tail_mean", 2), 0.85)
    assert math.isclose(reduce(v, "min_window_mean", 2), 0.5)  # window [0.5, nan]
    assert math.isnan(reduce(np.array([np.nan]), "last", 1))
    assert window_rows(6) == 1 and window_rows(300) == 15
    assert {m.reduce for m in METRICS} <= {"tail_mean", "min_window_mean", "last", "change",
                                           "max", "min", "mean"}


def _cells(a_vals, b_vals, metric="text_loss"):
    def cell(vals):
        return {**summarize(vals), "values": [{"seed": s, "value": v} for s, v in enumerate(vals)]}
    return {"x": {metric: cell(a_vals)}, "y": {metric: cell(b_vals)}}


@pytest.mark.parametrize("a,b,expect,verdict", [
    ([0.9, 0.8, 0.85, 0.7], [0.5, 0.45, 0.5, 0.3], "greater", "supports"),
    ([0.9, 0.8, 0.85, 0.7], [0.5, 0.45, 0.5, 0.3], "less", "refutes"),
    ([0.9, 0.2, 0.6, 0.4], [0.5, 0.45, 0.5, 0.5], "greater", "inconclusive"),  # p > 0.05
    ([0.9], [0.5], "greater", "inconclusive"),  # n < 2
])
def test_comparison_verdicts(a, b, expect, verdict):
    c = claims.Comparison(metric="text_loss", a="x", b="y", expect=expect)
    (got,) = claims.decide([claims.compare(c, _cells(a, b))])
    assert got["verdict"] == verdict
    if len(a) > 1:
        assert math.isclose(got["paired"]["p"], stats.ttest_rel(a, b).pvalue)


def test_holm_within_a_claim_can_undo_a_lone_significance():
    """p ≈ 0.03 alone supports; beside a second comparison with p ≈ 0.9 the Holm factor 2
    makes it inconclusive."""
    a, b = [1.0, 1.2, 1.1, 1.3, 0.9], [0.8, 1.0, 1.0, 1.0, 0.9]
    p = stats.ttest_rel(a, b).pvalue
    assert 0.025 < p < 0.05
    cmp_ = claims.Comparison(metric="m", a="x", b="y", expect="greater")
    (alone,) = claims.decide([claims.compare(cmp_, _cells(a, b, "m"))])
    assert alone["verdict"] == "supports"
    noise = claims.Comparison(metric="n", a="x", b="y", expect="greater")
    cells = _cells(a, b, "m")
    other = _cells([0.5, 0.6, 0.4, 0.5, 0.55], [0.52, 0.5, 0.45, 0.6, 0.5], "n")
    cells["x"].update(other["x"])
    cells["y"].update(other["y"])
    first, _ = claims.decide([claims.compare(cmp_, cells), claims.compare(noise, cells)])
    assert first["verdict"] == "inconclusive" and math.isclose(first["p_holm"], 2 * p)


def test_every_claim_names_known_metrics_and_kinds():
    keys = {m.key for m in METRICS}
    names = {k.name for k in KINDS}
    assert [c.id for c in claims.CLAIMS] == list(range(1, 8))
    for claim in claims.CLAIMS:
        for c in claim.comparisons:
            assert c.metric in keys and c.a in names and c.b in names
            assert c.expect in ("greater", "less")


def test_missing_kind_gives_inconclusive():
    out = claims.evaluate({})
    assert {c["verdict"] for c in out} == {"inconclusive"}


# ----------------------------------------------------------------------------- bad input

def _cmd(out, *extra):
    return [sys.executable, "-m", "moe_probe", "reproduce", "--quick", "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MOE_PROBE_JOBS": "1"}


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-probe reproduce: error:"), proc.stderr
    return lines[0]


def test_zero_seeds_is_bad_input(tmp_path):
    proc = subprocess.run(_cmd(tmp_path / "o", "--seeds", "0"), env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert "--seeds" in _one_line_error(proc)
    assert not (tmp_path / "o").exists()


def test_unwritable_out_is_bad_input(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.run(_cmd(blocker / "out"), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert "cannot write" in _one_line_error(proc)


def test_out_of_another_plan_is_refused(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "reproduce.json").write_text(json.dumps({"plan": {"quick": False, "size_overrides": []},
                                                    "seeds": [0]}))
    proc = subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=120)
    assert "another plan" in _one_line_error(proc)


@pytest.mark.parametrize("value", ["0", "two"])
def test_bad_jobs_env_is_bad_input(value, monkeypatch):
    monkeypatch.setenv("MOE_PROBE_JOBS", value)
    with pytest.raises(ValueError, match="MOE_PROBE_JOBS"):
        make_config(quick=True, seeds=1)


def test_jobs_flag_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("MOE_PROBE_JOBS", "2")
    assert make_config(quick=True, seeds=1, jobs=3).jobs == 3
    assert make_config(quick=True, seeds=1).jobs == 2
    with pytest.raises(ValueError, match="--jobs"):
        make_config(quick=True, seeds=1, jobs=0)


def test_default_jobs(monkeypatch):
    monkeypatch.delenv("MOE_PROBE_JOBS", raising=False)
    assert make_config(quick=True, seeds=1).jobs == 1
    assert 1 <= make_config(quick=False, seeds=3).jobs <= 2
    assert make_config(quick=False, seeds=None).seeds == (0, 1, 2, 3, 4)


def test_sweep_plan_and_its_directory_are_its_own(tmp_path):
    from moe_probe.reproduce import sweep
    from moe_probe.reproduce.runner import prepare_out

    full = make_config(quick=False, seeds=None, sweep=True)
    assert len(full.seeds) == 3 and len(sweep.cells(False)) == 14
    assert len(full.kinds) == 28 and len({k.name for k in full.kinds}) == 28
    assert sweep.CENTER in sweep.cells(False)
    quick = make_config(quick=True, seeds=None, sweep=True)
    assert [k.name for k in quick.kinds][:2] == ["moe/p2_t2i0.6_lr1_cf1.25",
                                                 "symbiotic/p2_t2i0.6_lr1_cf1.25"]
    out = tmp_path / "o"
    prepare_out(make_config(quick=True, seeds=1), out)  # a reproduce study's directory
    with pytest.raises(ValueError, match="another plan"):
        prepare_out(quick, out)
