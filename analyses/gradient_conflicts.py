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
# # Gradient conflicts between understanding and generation
#
# For every parameter component of every layer the tracer stores cos(∇L_und, ∇L_gen) and both
# gradient norms. Negative cosines are PCGrad's conflict; a large norm_gen / norm_und on
# parameters both tasks share means generation drives their updates. NaN = not measured (the
# layer lacks the component, or one gradient is zero, e.g. shared experts while shielded).
#
# Runs come from `MOE_PROBE_RUNS` (run directories separated by `:`); without it, the `healthy`
# and `grad_conflict` fixture stores are generated into a temporary directory.

# %% tags=["parameters"]
import os

RUN_DIRS = os.environ.get("MOE_PROBE_RUNS", "")
DEFAULT_FIXTURES = ["healthy", "grad_conflict"]

# %%
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
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


run_dirs = [Path(p) for p in RUN_DIRS.split(os.pathsep) if p] or fixture_runs(DEFAULT_FIXTURES)
stores = {Run(d).info().name: open_run(d) for d in run_dirs}
grads = {name: s.dataset("grad").load() for name, s in stores.items() if "grad" in s.groups}
{name: int(ds.sizes["step"]) for name, ds in grads.items()}

# %% [markdown]
# ## Cosine heat maps (layer × step), one panel per measured component

# %%
for name, ds in grads.items():
    cos = ds["cosine"]
    comps = [str(c) for c in cos["component"].values
             if np.isfinite(cos.sel(component=c).values).any()]
    if not comps:
        print(f"{name}: no cosine measured (no generation gradients)")
        continue
    f = make_subplots(rows=1, cols=len(comps), subplot_titles=comps, shared_yaxes=True)
    for j, c in enumerate(comps):
        z = cos.sel(component=c).transpose("layer", "step")
        f.add_trace(go.Heatmap(x=ds["step"].values, y=[str(x) for x in z["layer"].values],
                               z=z.values, zmin=-1, zmax=1, colorscale="RdBu",
                               showscale=j == 0), row=1, col=j + 1)
    f.update_layout(title=f"{name}: cos(∇und, ∇gen)", height=300)
    f.show()

# %% [markdown]
# ## How often each cell conflicts, and its median cosine

# %%
rows = []
for name, ds in grads.items():
    cos = ds["cosine"]
    for layer in cos["layer"].values:
        for c in cos["component"].values:
            x = cos.sel(layer=layer, component=c).values
            x = x[np.isfinite(x)]
            if x.size:
                rows.append({"run": name, "layer": str(layer), "component": str(c),
                             "rows": x.size, "conflict_frac": float((x < 0).mean()),
                             "median_cosine": float(np.median(x))})
cells = pd.DataFrame(rows)
if not cells.empty:
    summary = cells.groupby(["run", "component"])["median_cosine"].median().unstack()
    for name, row in summary.iterrows():
        print(name, " ".join(f"{c}={v:.4f}" for c, v in row.dropna().items()))
cells.pivot_table(index=["run", "layer"], columns="component", values="conflict_frac").round(2) \
    if not cells.empty else cells

# %% [markdown]
# ## Gradient norm ratio gen / und (geometric mean over layers)

# %%
f = go.Figure()
for i, (name, ds) in enumerate(grads.items()):
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(ds["norm_gen"] / ds["norm_und"])
    ratio = ratio.where(np.isfinite(ratio))
    for c in ("shared", "router", "attn"):
        if c not in ratio["component"].values:
            continue
        r = np.exp(ratio.sel(component=c).mean("layer", skipna=True))
        if np.isfinite(r.values).any():
            f.add_trace(go.Scatter(x=ds["step"].values, y=r.values, name=f"{name} {c}"))
f.update_yaxes(type="log", title_text="norm_gen / norm_und")
f.update_layout(title="Which task drives the shared parameters", height=350)
f.show()
