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
# # Capacity-rate dynamics per token kind
#
# The paper's Fig. 5a (capacity rate over training, runs compared) and its appendix view per token
# kind (text, ViT, VAE), plus the cumulative tokens each kind got processed. Capacity rate =
# kept assignments / (k · tokens): 1.0 means nothing was dropped; a fall is routing collapse.
#
# Runs come from `MOE_PROBE_RUNS` (run directories separated by `:`); without it, the
# `healthy` and `collapse` fixture stores are generated into a temporary directory.

# %% tags=["parameters"]
import os

RUN_DIRS = os.environ.get("MOE_PROBE_RUNS", "")
DEFAULT_FIXTURES = ["healthy", "collapse"]

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

pio.renderers.default = "plotly_mimetype"  # figure JSON only: the notebook stays small


def fixture_runs(names):
    """Generate fixture stores (repo's fixtures/generate.py) into a temp dir."""
    root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "fixtures" / "generate.py").exists())
    out = Path(tempfile.mkdtemp(prefix="moe_probe_fx_"))
    subprocess.run([sys.executable, "-m", "fixtures.generate", str(out), "--only", *names],
                   cwd=root, check=True, capture_output=True)
    return [out / n for n in names]


run_dirs = [Path(p) for p in RUN_DIRS.split(os.pathsep) if p] or fixture_runs(DEFAULT_FIXTURES)
stores = {Run(d).info().name: open_run(d) for d in run_dirs}
{Run(d).info().name: Run(d).info().committed for d in run_dirs}

# %% [markdown]
# ## Fig. 5a: capacity rate per token kind, mean over layers

# %%
routing = {name: s.dataset("routing").load() for name, s in stores.items()}
modalities = [str(m) for m in next(iter(routing.values()))["modality"].values]
fig = make_subplots(rows=1, cols=len(modalities), subplot_titles=modalities, shared_yaxes=True)
for i, (name, ds) in enumerate(routing.items()):
    cr = ds["capacity_rate"].mean("layer")
    for j, m in enumerate(modalities):
        fig.add_trace(go.Scatter(x=ds["step"].values, y=cr.sel(modality=m).values, name=name,
                                 legendgroup=name, showlegend=j == 0,
                                 line={"color": pio.templates["plotly"].layout.colorway[i % 10]}),
                      row=1, col=j + 1)
fig.update_layout(title="Capacity rate (mean over layers)", height=350)
fig.show()

# %%
final = pd.DataFrame({name: ds["capacity_rate"].isel(step=-1).mean("layer").to_series()
                      for name, ds in routing.items()}).T
final.columns.name = "final capacity rate"
for name, row in final.iterrows():
    print(name, " ".join(f"{m}={row[m]:.4f}" for m in final.columns))
final

# %% [markdown]
# ## Appendix view: every layer, per token kind
#
# A collapse usually starts in a few layers; the mean above can hide it.

# %%
for name, ds in routing.items():
    cr = ds["capacity_rate"]
    f = make_subplots(rows=1, cols=len(modalities), subplot_titles=modalities, shared_yaxes=True)
    for j, m in enumerate(modalities):
        for layer in cr["layer"].values:
            f.add_trace(go.Scatter(x=ds["step"].values, y=cr.sel(modality=m, layer=layer).values,
                                   name=f"layer {layer}", legendgroup=str(layer),
                                   showlegend=j == 0), row=1, col=j + 1)
    f.update_layout(title=f"{name}: capacity rate per layer", height=330)
    f.show()

# %% [markdown]
# ## Cumulative tokens processed per kind
#
# `tokens` entered each layer; `kept / k` is how many token-equivalents the experts actually
# processed (layer mean). The gap between the two is what collapse costs.

# %%
k = {name: int(s.attrs["model"]["top_k"]) for name, s in stores.items()}
rows = []
f = make_subplots(rows=1, cols=len(modalities), subplot_titles=modalities)
for i, (name, ds) in enumerate(routing.items()):
    entered = ds["tokens"].mean("layer").cumsum("step")
    processed = (ds["kept"] / k[name]).mean("layer").cumsum("step")
    for j, m in enumerate(modalities):
        color = pio.templates["plotly"].layout.colorway[i % 10]
        f.add_trace(go.Scatter(x=ds["step"].values, y=entered.sel(modality=m).values,
                               name=f"{name} entered", line={"color": color, "dash": "dot"},
                               legendgroup=name, showlegend=j == 0), row=1, col=j + 1)
        f.add_trace(go.Scatter(x=ds["step"].values, y=processed.sel(modality=m).values,
                               name=f"{name} processed", line={"color": color},
                               legendgroup=name, showlegend=j == 0), row=1, col=j + 1)
        rows.append({"run": name, "modality": m,
                     "entered": float(entered.sel(modality=m)[-1]),
                     "processed": float(processed.sel(modality=m)[-1])})
f.update_layout(title="Cumulative tokens per kind (layer mean)", height=350)
f.show()
table = pd.DataFrame(rows)
table["processed_share"] = table["processed"] / table["entered"]
table.round(4)
