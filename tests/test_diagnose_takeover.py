"""expert_takeover: named tokens and numbers where generation tokens took experts over, nothing
where they did not (planted token-routing runs), and the check on a trained run's store."""

from __future__ import annotations

import json

import pytest

from fixtures.tokens import build_tokens
from moe_probe.diagnose.config import DiagnoseConfig
from moe_probe.diagnose.rundata import load_run
from moe_probe.diagnose.runner import diagnose
from moe_probe.diagnose.takeover import detect_takeover


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("takeover")
    return {t: build_tokens(root / ("taken" if t else "kept"), takeover=t) for t in (True, False)}


def test_a_takeover_names_the_tokens_and_their_numbers(runs):
    res = detect_takeover(load_run(runs[True]), DiagnoseConfig())
    (f,) = res.findings
    assert f.kind == "expert_takeover" and f.layers == ("1",) and f.modality == "vae"
    per = f.evidence["per_layer"]["1"]
    # fixtures/tokens.py: from step 50, layer 1's vae tokens take experts 0 (top patch rows) and
    # 1 (bottom), which vit tokens of classes 0, 4, 8 and 1, 5, 9 took at step 0
    assert sorted(per) == ["0", "1"]
    assert set(per["0"]["und_labels_before"]) == {"vit digit 0", "vit digit 4", "vit digit 8"}
    assert set(per["1"]["und_labels_before"]) == {"vit digit 1", "vit digit 5", "vit digit 9"}
    # classes 0 and 4 left expert 0 (their first picks moved), 8 stayed: 32 tokens (2 images)
    before = per["0"]["und_labels_before"]
    assert before["vit digit 8"] == [32, 32] and before["vit digit 0"][1] < 16
    assert per["0"]["gen_share"][0] <= 0.5 <= per["0"]["gen_share"][1]
    rows = per["0"]["gen_patch_rows_after"]
    assert rows["0"] + rows["1"] > 4 * (rows["2"] + rows["3"])
    assert "layer 1 expert 0" in f.explanation and "vit digit 4 (32 → " in f.explanation
    assert "patch rows 0 and 1" in f.explanation
    json.dumps(f.to_dict(), allow_nan=False)  # the report's strict JSON


def test_no_takeover_no_finding(runs):
    report = diagnose([load_run(runs[False])])
    assert report.runs[0].checks["expert_takeover"] == "ok"
    assert not [f for f in report.findings if f.kind == "expert_takeover"]


def test_runs_without_token_routing_are_not_measured():
    from pathlib import Path

    frozen = Path(__file__).resolve().parents[1] / "fixtures" / "stores" / "healthy"
    status = diagnose([load_run(frozen)]).runs[0].checks["expert_takeover"]
    assert status == "not measured: no token-level routing rows"
