"""`moe-probe compare` on generated groups with a planted difference (fixtures/groups.py),
paired and unpaired; every statistic recomputed here from the stores with scipy."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

import moe_probe
from moe_probe.cli import main
from fixtures.groups import SEEDS, SHIFT, build_groups


def _cli(capsys, *args):
    """(exit code, stdout, stderr) of ``moe-probe compare ARGS`` run in this process."""
    capsys.readouterr()
    rc = main(["compare", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def paired_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("paired")
    return out, build_groups(out)


@pytest.fixture(scope="module")
def unpaired_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("unpaired")
    return out, build_groups(out, unpaired=True)


def _final_text_loss(run):
    return float(moe_probe.open_run(run).read("eval", "value", metric="text_loss").values[-1])


def _json(capsys, tmp_path, *args):
    path = tmp_path / "out.json"
    rc, out, err = _cli(capsys, *args, "--json", path)
    assert rc == 0, err
    return json.loads(path.read_text()), out


def test_paired_groups_find_the_planted_shift(paired_runs, tmp_path, capsys):
    out, runs = paired_runs
    res, md = _json(capsys, tmp_path, out / "base", f"ablation={out}/lr_x*", "--var", "eval/value",
                    "--sel", "metric=text_loss")
    base = [_final_text_loss(r) for r in runs["base"]]
    abl = [_final_text_loss(r) for r in runs["lr_x3"]]
    (c,) = res["comparisons"]
    ref = stats.ttest_rel(abl, base)
    lo, hi = ref.confidence_interval(0.95)
    assert c["test"] == "paired" and c["n_a"] == len(SEEDS) and c["group"] == "ablation"
    for got, want in ((c["diff"], np.mean(np.subtract(abl, base))), (c["t"], ref.statistic),
                      (c["p"], ref.pvalue), (c["p_holm"], ref.pvalue), (c["ci_low"], lo),
                      (c["ci_high"], hi)):
        assert math.isclose(got, want, rel_tol=1e-9)
    assert lo < SHIFT < hi and ref.pvalue < 0.05 and c["result"] == "higher"
    g = {x["name"]: x for x in res["groups"]}
    assert [v["value"] for v in g["ablation"]["runs"]] == pytest.approx(abl, rel=1e-12)
    assert math.isclose(g[str(out / "base")]["mean"], np.mean(base))
    assert "| ablation | paired | 5 |" in md


def test_unpaired_groups_use_welch(unpaired_runs, tmp_path, capsys):
    """No shared seed: Welch, which the seed-to-seed spread keeps from seeing the small shift."""
    out, runs = unpaired_runs
    res, _ = _json(capsys, tmp_path, out / "base", out / "lr_x3", "--var", "eval/value", "--sel",
                   "metric=text_loss")
    base = [_final_text_loss(r) for r in runs["base"]]
    abl = [_final_text_loss(r) for r in runs["lr_x3"]]
    (c,) = res["comparisons"]
    ref = stats.ttest_ind(abl, base, equal_var=False)
    lo, hi = ref.confidence_interval(0.95)
    assert c["test"] == "welch" and (c["n_a"], c["n_b"]) == (5, 5)
    for got, want in ((c["t"], ref.statistic), (c["p"], ref.pvalue), (c["df"], ref.df),
                      (c["ci_low"], lo), (c["ci_high"], hi)):
        assert math.isclose(got, want, rel_tol=1e-9)
    assert lo < SHIFT < hi and c["result"] == "no significant difference"


def test_by_config_groups_runs_without_the_seed(paired_runs, tmp_path, capsys):
    """Grouped by config minus seed; routing selection by modality and layer labels, mean over
    the last 5 rows, recomputed here; the CSV carries the same comparison."""
    out, runs = paired_runs
    res, _ = _json(capsys, tmp_path, out, "--by-config", "--var", "routing/capacity_rate",
                   "--modality", "text", "--layer", "1", "--reduce", "mean", "--last", "5",
                   "--csv", tmp_path / "out.csv")
    names = [g["name"] for g in res["groups"]]
    assert names == ["train.lr_new=0.001", "train.lr_new=0.003"]

    def val(r):
        return float(moe_probe.open_run(r).read("routing", "capacity_rate", modality="text",
                                                layer="1").values[-5:].astype(float).mean())
    a = [val(r) for r in runs["lr_x3"]]
    b = [val(r) for r in runs["base"]]
    (c,) = res["comparisons"]
    assert c["test"] == "paired" and math.isclose(c["p"], stats.ttest_rel(a, b).pvalue)
    (row,) = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert row["group"] == "train.lr_new=0.003" and math.isclose(float(row["p"]), c["p"])
    assert math.isclose(float(row["mean_group"]), np.mean(a))


def test_min_reduction_and_metric_keys(paired_runs, tmp_path, capsys):
    out, runs = paired_runs
    res, _ = _json(capsys, tmp_path, out / "base", out / "lr_x3", "--var", "eval/value",
                   "--sel", "metric=digit_acc", "--reduce", "min")
    want = [float(moe_probe.open_run(r).read("eval", "value", metric="digit_acc").values.min())
            for r in runs["base"]]
    assert [v["value"] for v in res["groups"][0]["runs"]] == pytest.approx(want, rel=1e-12)
    res, _ = _json(capsys, tmp_path, out / "base", out / "lr_x3", "--var", "text_loss")
    assert res["selection"]["sel"] == {"metric": ["text_loss"]}
    assert [v["value"] for v in res["groups"][0]["runs"]] == pytest.approx(
        [_final_text_loss(r) for r in runs["base"]], rel=1e-12)


@pytest.mark.parametrize("args,needle", [
    (("{out}/nope", "{out}/base", "--var", "eval/value"), "matches no run"),
    (("{out}/base", "{out}/lr_x3", "--var", "eval/nothing"), "unknown variable"),
    (("{out}/base", "{out}/lr_x3", "--var", "capacity"), "unknown variable"),
    (("{out}/base", "{out}/lr_x3", "--var", "eval/value", "--sel", "metric=bogus"), "bogus"),
    (("{out}/base", "{out}/lr_x3", "--var", "eval/value", "--sel", "expert=1"), "no dim"),
    (("{out}/base", "--var", "eval/value"), "at least two groups"),
    (("{out}/base", "{out}/lr_x3", "--var", "eval/value", "--last", "0"), "--last"),
])
def test_bad_input_is_one_line_exit_2(paired_runs, args, needle, capsys):
    out, _ = paired_runs
    rc, _, err = _cli(capsys, *(a.format(out=out) for a in args))
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-probe compare: error:") and needle in lines[0]


def test_compare_and_stats_never_import_torch():
    code = ("import sys, moe_probe.compare, moe_probe.stats, moe_probe.reproduce.claims\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
