"""`python -m moe_probe diagnose …` end to end: exit codes, JSON schema, the HTML report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_probe import open_run  # noqa: E402
from moe_probe.diagnose.findings import SCHEMA, Report  # noqa: E402


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from fixtures.generate import build

    out = tmp_path_factory.mktemp("diag_cli")
    for name in ("healthy", "collapse", "grad_conflict", "und_only_control", "live"):
        build(name, out)
    return out


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "moe_probe", "diagnose", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


@pytest.mark.parametrize("runs, fail_on, rc", [
    (["healthy"], "any", 0),
    (["collapse"], "collapse", 1),
    (["collapse"], "conflict", 0),  # findings, but none of that kind
    (["healthy", "grad_conflict"], "conflict", 1),
    (["collapse"], None, 0),  # no --fail-on: findings never change the exit code
    (["live"], "any", 0),  # a store still being written: its committed rows are healthy
])
def test_fail_on_exit_codes(fx, runs, fail_on, rc):
    r = _cli(*[fx / x for x in runs], *(["--fail-on", fail_on] if fail_on else []))
    assert r.returncode == rc, r.stderr
    assert "# moe-probe diagnose" in r.stdout and "Traceback" not in r.stderr
    if "collapse" in runs:
        assert "routing_collapse" in r.stdout


@pytest.mark.parametrize("make", ["missing", "not_a_store", "other_schema"])
def test_bad_input_exit_2_one_line(fx, tmp_path, make):
    target = tmp_path / make
    if make == "not_a_store":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    elif make == "other_schema":
        import shutil

        shutil.copytree(fx / "healthy", target)
        meta = target / "traces.zarr" / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"]["schema_version"] = 99
        meta.write_text(json.dumps(doc))
    r = _cli(fx / "healthy", target)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-probe diagnose: error:")
    if make == "other_schema":
        assert "99" in lines[0]


def test_json_and_html_reports(fx, tmp_path):
    js, page = tmp_path / "v.json", tmp_path / "r.html"
    runs = [fx / "healthy", fx / "collapse", fx / "grad_conflict"]
    r = _cli(*runs, "--control", fx / "und_only_control", "--json", js, "--html", page)
    assert r.returncode == 0, r.stderr

    doc = json.loads(js.read_text())
    assert doc["schema"] == SCHEMA and doc["control"] == str(fx / "und_only_control")
    assert [x["run_dir"] for x in doc["runs"]] == [str(p) for p in runs]
    assert Report.from_dict(doc).to_dict() == doc  # round trip
    kinds = {f["kind"] for f in doc["findings"]}
    assert {"routing_collapse", "gradient_conflict"} <= kinds
    for f in doc["findings"]:
        assert set(f) == {"kind", "severity", "run", "layers", "modality", "onset_step",
                          "evidence", "explanation", "remedy"}
    assert doc["runs"][0]["findings"] == []

    text = page.read_text()
    assert text.count("* plotly.js v") == 1  # the library, once
    assert not re.search(r"<(script|link)[^>]+(src|href)=", text)  # nothing fetched: offline
    figs = {m.group(1): json.loads(m.group(2).replace("<\\/", "</")) for m in re.finditer(
        r'<script type="application/json" data-fig="(fig\d+)">(.*?)</script>', text, re.S)}
    assert len(figs) >= 6
    # Fig. 5a: the collapse run's text trace is the layer mean of the store's capacity rate
    cap = next(f for f in figs.values() if "Capacity rate" in f["layout"]["title"]["text"])
    tr = next(t for t in cap["data"] if t["name"] == "collapse" and t["xaxis"] == "x")
    ds = open_run(fx / "collapse").dataset("routing")
    want = ds["capacity_rate"].sel(modality="text").mean("layer").values
    assert tr["x"] == [int(s) for s in ds["step"].values]
    np.testing.assert_allclose(np.array(tr["y"], dtype=float), want, atol=1e-4)
    # the gradient-cosine heat map of grad_conflict holds the store's cosines
    cosfig = next(f for f in figs.values()
                  if f["layout"]["title"]["text"].startswith("grad_conflict: gradient cosine"))
    z = np.array(cosfig["data"][0]["z"], dtype=float)
    g = open_run(fx / "grad_conflict").dataset("grad")["cosine"].sel(component="attn")
    np.testing.assert_allclose(z, g.transpose("layer", "step").values, atol=1e-3)
    # findings with their explanations are in the page
    assert "routing_collapse" in text and "capacity rate of text tokens fell" in text


def test_thresholds_from_the_command_line(fx, tmp_path):
    """`--set` changes what counts as a collapse: the fixture's layers 2-3 fall to a capacity
    rate of ~0.36-0.38, a finding at τ = 0.5, none at τ = 0.3; the JSON records the values."""
    js = tmp_path / "d.json"
    r = _cli(fx / "collapse", "--set", "collapse_rate=0.5", "--set", "window=30", "--json", js)
    assert r.returncode == 0, r.stderr
    assert "routing_collapse" in r.stdout and "below 0.5 for at least 30" in r.stdout
    doc = json.loads(js.read_text())
    assert doc["config"]["collapse_rate"] == 0.5 and doc["config"]["window"] == 30
    r = _cli(fx / "collapse", "--set", "collapse_rate=0.3")
    assert r.returncode == 0 and "routing_collapse" not in r.stdout, r.stderr
    for bad, why in (("collapse_rat=0.5", "did you mean collapse_rate"),
                     ("window=many", "expects an integer"), ("window", "KEY=VALUE"),
                     ("window=0", "must be >= 1"), ("conflict_cosine=2", "in [-1, 1]")):
        r = _cli(fx / "collapse", "--set", bad)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and why in r.stderr
