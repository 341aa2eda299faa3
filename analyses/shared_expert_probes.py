# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Shared-expert probes vs an understanding-only control (paper, Fig. 6)
#
# Two views of what the always-on shared experts know on their own:
# * `isolated` — understanding metrics with every routed expert masked;
# * linear probes on shared-expert outputs, reported as selectivity = accuracy − control-task
#   accuracy (Hewitt & Liang), per layer and task.
#
# The paper: under Symbiotic co-training these improve; under understanding-only training they
# degrade. Runs come from `MOE_PROBE_RUNS` (`:`-separated), the control from
# `MOE_PROBE_CONTROL`; without them, fixture stores are generated into a temporary directory.

# %% tags=["parameters"]
import os

RUN_DIRS = os.environ.get("MOE_PROBE_RUNS", "")
CONTROL_DIR = os.environ.get("MOE_PROBE_CONTROL", "")
DEFAULT_FIXTURES = ["healthy", "probe_regression"]
DEFAULT_CONTROL = "und_only_control"

# %%
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from moe_probe import open_run
from moe_probe.run import Run

pio.renderers.default = "plotly_mimetype"


def fixture_runs(names):
    """Generate fixture stores (repo's fixtures/generate.py) into a temp dir."""
    root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "fixtures" / "generate.py").exists())
    out = Path(tempfile.mkdtemp(prefix="moe_probe_fx_"))
    subprocess.run([sys.executable, "-m", "fixtures.generate", str(out), "--only", *names],
                   cwd=root, check=True, capture_output=True)
    return [out / n for n in names]


if RUN_DIRS:
    run_dirs = [Path(p) for p in RUN_DIRS.split(os.pathsep) if p]
    control_dir = Path(CONTROL_DIR) if CONTROL_DIR else None
else:
    *run_dirs, control_dir = fixture_runs(DEFAULT_FIXTURES + [DEFAULT_CONTROL])
stores = {Run(d).info().name: open_run(d) for d in run_dirs}
control = open_run(control_dir) if control_dir else None
series = {name: s.dataset("probe").load() for name, s in stores.items() if "probe" in s.groups}
if control is not None and "probe" in control.groups:
    series[f"{Run(control_dir).info().name} (control)"] = control.dataset("probe").load()
list(series)

# %% [markdown]
# ## Isolated understanding (routed experts masked)

# %%
metrics = sorted({str(m) for ds in series.values() for m in ds["metric"].values})
f = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics)
for i, (name, ds) in enumerate(series.items()):
    is_ctrl = name.endswith("(control)")
    for j, m in enumerate(metrics):
        if m in ds["metric"].values:
            f.add_trace(go.Scatter(x=ds["step"].values, y=ds["isolated"].sel(metric=m).values,
                                   name=name, legendgroup=name, showlegend=j == 0,
                                   mode="lines+markers",
                                   line={"dash": "dash" if is_ctrl else None}), row=1, col=j + 1)
f.update_layout(title="Shared experts only: isolated eval", height=340)
f.show()

# %% [markdown]
# ## Probe selectivity per layer (mean over tasks)

# %%
f = go.Figure()
for name, ds in series.items():
    sel = ds["selectivity"].mean("task")
    for layer in sel["layer"].values:
        f.add_trace(go.Scatter(x=ds["step"].values, y=sel.sel(layer=layer).values,
                               name=f"{name} L{layer}", mode="lines+markers",
                               line={"dash": "dash" if name.endswith("(control)") else None}))
f.update_layout(title="Probe selectivity (accuracy − control-task accuracy)", height=360)
f.show()

# %% [markdown]
# ## Start vs end, each run and the control

# %%
rows = []
for name, ds in series.items():
    for m in ds["metric"].values:
        x = ds["isolated"].sel(metric=m).values
        rows.append({"run": name, "series": f"isolated {m}", "start": float(x[0]),
                     "final": float(x[-1])})
    sel = ds["selectivity"].mean(["layer", "task"]).values
    rows.append({"run": name, "series": "selectivity (mean)", "start": float(sel[0]),
                 "final": float(sel[-1])})
table = pd.DataFrame(rows)
table["change"] = table["final"] - table["start"]
for r in table.itertuples():
    print(f"{r.run}: {r.series} {r.start:.4f} -> {r.final:.4f}")
table.round(4)
