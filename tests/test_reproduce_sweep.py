"""`moe-probe reproduce --quick --sweep` end to end (3 cells × moe/symbiotic × 2 seeds, tiny
recipes): every configuration it ran, every value re-read from the stores, every cell's mean,
interval and paired symbiotic − moe test recomputed here with scipy; resumed, nothing retrains."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

import moe_probe
from moe_probe.run import Run
from test_reproduce_cli import _close, _holm_rejected, _per_step, _reduce

pytestmark = pytest.mark.slow
ARCHS = ("moe", "symbiotic")
CELLS = ("p2_t2i0.6_lr1_cf1.25", "p4_t2i0.6_lr1_cf1.25", "p2_t2i0.6_lr3_cf1.25")


def _run(out):
    return subprocess.run([sys.executable, "-m", "moe_probe", "reproduce", "--quick", "--sweep",
                           "--out", str(out)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MOE_PROBE_JOBS": "1"},
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    first = _run(out)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run(out)
    assert second.returncode == 0, second.stderr[-3000:]
    return out, first, second, json.loads((out / "sweep.json").read_text())


def test_every_configuration_is_run_and_reported(sweep):
    out, first, second, res = sweep
    runs = {r["run"]: r for r in res["runs"]}
    assert set(runs) == {f"{a}/{c}/seed{s}" for a in ARCHS for c in CELLS for s in (0, 1)}
    for name, r in runs.items():
        arch, cell, _ = name.split("/")
        assert r["recipe"] == f"tiny-{arch}"
        mark = json.loads((out / name / "reproduce_done.json").read_text())
        assert mark["overrides"] == r["overrides"]
        cfg = Run(out / name).config()
        patch = int(cell[1])
        assert cfg["data"]["patch_size"] == patch and cfg["model"]["n_image_tokens"] == (8 // patch) ** 2
        assert cfg["model"]["capacity_factor"] == 1.25 and cfg["data"]["mix"] == [6.0, 2.0, 2.0]
        assert math.isclose(cfg["train"]["lr_new"], 3e-3 * (3 if "_lr3_" in cell else 1))
    assert "12 already done, 0 to train" in second.stdout + second.stderr
    for name in ("sweep.md", "sweep.csv", "sweep.html"):
        assert (out / name).stat().st_size > 0
    try:
        import kaleido  # noqa: F401
        assert (out / "sweep_gen_share.png").stat().st_size > 0
    except ImportError:
        assert "no PNG" in (out / "sweep.md").read_text()
    md = (out / "sweep.md").read_text()
    assert "generation-token share" in md and "capacity factor" in md


def test_cells_and_paired_differences_recomputed_from_the_stores(sweep):
    out, _, _, res = sweep
    stores = {}
    got = {}
    for src in res["sources"]:
        store = stores.setdefault(src["run"], moe_probe.open_run(out / src["run"]))
        v = _reduce(_per_step(store.read(src["group"], src["var"], **src["sel"])), src["reduce"],
                    src["window"])
        arch, cell, _ = src["run"].split("/")
        got.setdefault((cell, arch, src["metric"]), {})[src["seed"]] = v
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == sum(len(p["cells"]) for p in res["panels"]) * len(res["metrics"])
    for p in res["panels"]:
        for m in res["metrics"]:
            ps = {}
            for c in p["cells"]:
                cm = c["metrics"][m["key"]]
                for arch in ARCHS:
                    xs = [v for v in got[(c["cell"], arch, m["key"])].values() if math.isfinite(v)]
                    assert cm[arch]["n"] == len(xs) == 2 and _close(cm[arch]["mean"], np.mean(xs))
                    if np.std(xs) > 0:
                        lo, hi = stats.t.interval(0.95, 1, loc=np.mean(xs), scale=stats.sem(xs))
                        assert _close(cm[arch]["ci_low"], lo) and _close(cm[arch]["ci_high"], hi)
                a, b = got[(c["cell"], "symbiotic", m["key"])], got[(c["cell"], "moe", m["key"])]
                d = cm["diff"]
                x, y = [a[s] for s in (0, 1)], [b[s] for s in (0, 1)]
                assert d["test"] == "paired" and _close(d["diff"], float(np.mean(np.subtract(x, y))))
                if np.std(np.subtract(x, y)) > 0:
                    ref = stats.ttest_rel(x, y)
                    assert _close(d["p"], ref.pvalue) and _close(d["t"], ref.statistic)
                    ps[c["cell"]] = ref.pvalue
                else:
                    ps[c["cell"]] = None
            rejected = _holm_rejected(ps)
            for c in p["cells"]:
                ph = c["metrics"][m["key"]]["diff"]["p_holm"]
                assert (ph is not None and ph < 0.05) == (c["cell"] in rejected)
