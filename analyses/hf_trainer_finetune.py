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
# # Fine-tuning an HF MoE under the `Trainer`, traced by `TraceCallback`
#
# A tiny random-init Mixtral (built from `fixtures/hf/mixtral.json`, no download) is fine-tuned by
# the Hugging Face `Trainer` on Python's bundled pydoc text, with gradient accumulation 2.
# `moe_probe.hf.TraceCallback` writes one routing row per optimizer step into `OUT/traces.zarr`,
# per layer × kind of token × expert; the kinds come from a batch column (`token_type_ids`: here
# "punct" for punctuation tokens, "word" otherwise). Then the store is read back like any run.
#
# `MOE_PROBE_OUT` sets the run directory (default: a new temporary one); `MOE_PROBE_STEPS` the
# number of optimizer steps.

# %% tags=["parameters"]
import os

OUT = os.environ.get("MOE_PROBE_OUT", "")
STEPS = int(os.environ.get("MOE_PROBE_STEPS", "8"))

# %%
import re
import tempfile
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import torch
from pydoc_data.topics import topics
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from moe_probe import open_run
from moe_probe.hf import TraceCallback
from moe_probe.hf.loading import encode, load_model

pio.renderers.default = "plotly_mimetype"
hf_logging.set_verbosity_error()
torch.set_num_threads(1)
root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "fixtures" / "hf").exists())
tmp = Path(tempfile.mkdtemp(prefix="moe_probe_hf_"))
out = Path(OUT) if OUT else tmp / "run"

# %% [markdown]
# ## Data: token windows with a kind per token

# %%
B, S, ACCUM = 4, 32, 2
model, _, _ = load_model(str(root / "fixtures" / "hf" / "mixtral.json"), seed=0)
words = re.findall(r"\w+|[^\w\s]", " ".join(topics[k] for k in sorted(topics)[:60]))
n = STEPS * ACCUM * B
ids = torch.tensor(encode(" ".join(words), None, model.config.vocab_size)[: n * S]).view(n, S)
punct = torch.tensor([not w[0].isalnum() and w[0] != "_" for w in words[: n * S]]).view(n, S)
train = [{"input_ids": i, "labels": i, "token_type_ids": p.long()} for i, p in zip(ids, punct)]
f"{n} windows of {S} tokens, {float(punct.float().mean()):.1%} punctuation"

# %% [markdown]
# ## Fine-tune with the callback

# %%
args = TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=B,
                         gradient_accumulation_steps=ACCUM, max_steps=STEPS, learning_rate=3e-3,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         remove_unused_columns=False, disable_tqdm=True, seed=0)
callback = TraceCallback(out, kinds="token_type_ids", kind_names=["word", "punct"])
Trainer(model=model.train(), args=args, train_dataset=train, callbacks=[callback]).train()

# %% [markdown]
# ## Read the store: load per expert, per kind

# %%
run = open_run(out)
routing = run.dataset("routing").load()
share = routing["load"] / routing["load"].sum("expert")  # fraction of each kind's picks per expert
fig = go.Figure()
for kind in routing["modality"].values:
    for e in routing["expert"].values:
        fig.add_trace(go.Scatter(x=routing["step"].values,
                                 y=share.sel(modality=kind, expert=e).mean("layer").values,
                                 name=f"{kind} → expert {e}", line={"dash": "dot" if kind == "punct" else None}))
fig.update_layout(title="Share of each kind's picks per expert (mean over layers)",
                  xaxis_title="global step", height=380)
fig.show()

# %%
tokens = routing["tokens"].sum("modality").isel(layer=0).values
last = share.isel(step=-1).sel(layer=routing["layer"].values[0])
print(f"steps {list(map(int, routing['step'].values))} tokens/step {sorted(set(map(int, tokens)))}")
for kind in routing["modality"].values:
    print(f"final step, layer 0, {kind}: top expert {int(last.sel(modality=kind).argmax())} "
          f"share={float(last.sel(modality=kind).max()):.4f}")

# %%
loss = run.dataset("loss")["value"].sel(term="total").to_series()
loss.round(4)
