"""Detectors on the generated fixture stores, against the truth each store records
(`run.fixture_truth` in its root attrs), read through the public reader."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_probe import open_run  # noqa: E402
from moe_probe.diagnose.config import DiagnoseConfig  # noqa: E402
from moe_probe.diagnose.rundata import load_run  # noqa: E402
from moe_probe.diagnose.runner import diagnose_run  # noqa: E402

CFG = DiagnoseConfig()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from fixtures.generate import build_all

    out = tmp_path_factory.mktemp("diag_fixtures")
    build_all(out)
    return out


def _diag(fx, name, control=None):
    run = load_run(fx / name)
    ctrl = load_run(fx / control) if control else None
    return run.attrs["run"]["fixture_truth"], diagnose_run(run, CFG, ctrl)


def _next_row(fx, name, group, step):
    """The first row of `group` after `step`: where a change planted at `step` shows first."""
    s = open_run(fx / name).dataset(group)["step"].values
    return int(s[s > step].min())


@pytest.mark.parametrize("name", ["healthy", "live"])
def test_healthy_and_live_have_no_findings(fx, name):
    truth, d = _diag(fx, name)
    assert d.findings == ()
    # the fixtures have no token-level routing (an extra group: tests/test_diagnose_takeover.py)
    assert d.checks.pop("expert_takeover") == "not measured: no token-level routing rows"
    assert set(d.checks.values()) == {"ok"}


def test_live_store_read_up_to_committed_rows(fx):
    truth, d = _diag(fx, "live")
    assert d.steps == truth["committed"]
    run = load_run(fx / "live")
    for g, ds in run.groups.items():
        assert (ds["step"].values >= 0).all()  # the garbage rows (step -7) are not read
        for v in ds.data_vars:
            assert not (ds[v].values == truth["garbage"]).any()


def test_collapse_found_where_planted(fx):
    truth, d = _diag(fx, "collapse")
    (f,) = [f for f in d.findings if f.kind == "routing_collapse" and f.modality == truth["modality"]]
    assert list(f.layers) == truth["layers"]
    # onset: the first step of the first 20-row stretch below the bar, within the smoothing
    # tolerance of the step from which each layer stays below it
    for layer, step in truth["below_from_step"].items():
        assert abs(f.evidence["per_layer"][layer]["onset_step"] - step) <= 10
        assert f.evidence["per_layer"][layer]["final"] == pytest.approx(
            truth["final_capacity_rate"][layer], abs=1e-5)
    assert truth["onset_step"] <= f.onset_step <= min(truth["below_from_step"].values())
    assert f.severity == "critical"
    # vit was piled onto the same two experts (the generator's docstring: "text (and vit)"), which
    # also makes their MaxVio high: the only other findings, all on the planted layers
    others = {(g.kind, g.modality) for g in d.findings if g is not f}
    assert others <= {("routing_collapse", "vit"), ("load_imbalance", "text"),
                      ("load_imbalance", "vit")}
    assert all(list(g.layers) == truth["layers"] for g in d.findings)


def test_dead_experts_found_where_planted(fx):
    truth, d = _diag(fx, "dead_experts")
    (f,) = d.findings
    assert f.kind == "dead_experts" and list(f.layers) == truth["layers"]
    assert [str(e) for e in f.evidence["experts"]] == truth["experts"]
    assert abs(f.onset_step - truth["from_step"]) <= CFG.smooth


def test_gradient_conflict_found_where_planted(fx):
    truth, d = _diag(fx, "grad_conflict")
    nxt = _next_row(fx, "grad_conflict", "grad", truth["from_step"])
    conflict = {f.evidence["component"]: f for f in d.findings if f.kind == "gradient_conflict"}
    assert sorted(conflict) == sorted(truth["components"])
    dom = {f.evidence["component"]: f for f in d.findings if f.kind == "gradient_domination"}
    assert sorted(dom) == sorted(set(truth["components"]) & set(CFG.grad_components))
    assert {f.kind for f in d.findings} == {"gradient_conflict", "gradient_domination"}
    for f in [*conflict.values(), *dom.values()]:
        assert list(f.layers) == truth["layers"]
        assert truth["from_step"] <= f.onset_step <= nxt
    for f in conflict.values():
        assert f.evidence["min_median_cosine"] == pytest.approx(truth["cosine"], abs=0.1)
    for f in dom.values():
        assert f.evidence["max_median_ratio"] == pytest.approx(truth["ratio"], rel=0.2)


def test_probe_regression_found_where_planted(fx):
    truth, d = _diag(fx, "probe_regression")
    nxt = _next_row(fx, "probe_regression", "probe", truth["from_step"])
    (f,) = d.findings
    assert f.kind == "shared_regression" and f.evidence["basis"] == "start"
    assert truth["from_step"] <= f.onset_step <= nxt
    flagged = set(f.evidence["series"])
    assert {f"isolated[{m}]" for m in truth["isolated"]} <= flagged
    drops = [v["reference"] - v["final"] for k, v in f.evidence["series"].items()
             if k.startswith("selectivity")]
    assert np.median(drops) == pytest.approx(truth["selectivity_drop"], abs=0.1)


def test_und_only_control(fx):
    # no vae tokens: everything about generation is "not measured", never a finding; its
    # shared-expert probe degrades slowly (paper, Fig. 6), which is what the detector reports
    truth, d = _diag(fx, "und_only_control")
    for kind in ("gradient_domination", "gradient_conflict", "modality_dominance"):
        assert d.checks[kind].startswith("not measured")
    assert {f.kind for f in d.findings} == {"shared_regression"}
    assert d.final_capacity_rate["vae"] is None


def test_control_comparison(fx):
    # the co-trained regression run is worse than the healthy control as well as its own start
    _, d = _diag(fx, "probe_regression", control="healthy")
    assert sorted(f.evidence["basis"] for f in d.findings) == ["control", "start"]
    # a healthy run is not worse than the degrading und-only control
    _, d = _diag(fx, "healthy", control="und_only_control")
    assert d.findings == ()
