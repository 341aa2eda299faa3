"""Shared-expert probes of an HF model: isolated LM eval and linear probes with control tasks.

*Isolated*: every routed-experts output is replaced by zeros by a forward hook, so each
MoE layer adds only its shared experts (Qwen2-MoE: still scaled by its sigmoid gate); the LM
loss of that model vs the full one, per text set. Metrics (store ``probe/isolated``):
``lm_full``, ``lm_shared_only``, ``lm_delta`` (= shared_only − full) for ``--text``, and the same
with suffix ``_b`` for ``--text-b``.

*Linear probes*: token-level features = the shared experts' output h_TD of each MoE layer (before
Qwen2-MoE's gate). Tasks: ``source`` — which text file the token's window came from (only with
``--text-b``) — and ``position`` — whether the token sits in the first or second half of its
window. Scored with the model tracer's probe machinery (``moe_probe.trace.probes.run_probe``:
L2 logistic regression, split by window, Hewitt–Liang control = a random label per token id).

Legend: N windows, S sequence, T tokens (= N·S), D model dim.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_probe.hf.capture import RouterCapture, lm_loss
from moe_probe.trace.config import TraceConfig
from moe_probe.trace.probes import ProbeData, run_probe


def isolated_metric_names(two_sets: bool) -> list[str]:
    base = ["lm_full", "lm_shared_only", "lm_delta"]
    return base + [f"{m}_b" for m in base] if two_sets else base


def probe_task_names(two_sets: bool) -> list[str]:
    return ["source", "position"] if two_sets else ["position"]


def _batched_loss(cap: RouterCapture, ids_NS: torch.Tensor, batch: int, mask: bool) -> float:
    total, n = 0.0, 0
    for i in range(0, ids_NS.shape[0], batch):
        x = ids_NS[i:i + batch]
        total += float(lm_loss(cap.logits(x, mask_routed=mask), x)) * x.shape[0]
        n += x.shape[0]
    return total / max(n, 1)


def isolated_row(cap: RouterCapture, sets: list[torch.Tensor], batch: int) -> np.ndarray:
    vals = []
    for ids in sets:
        full = _batched_loss(cap, ids, batch, mask=False)
        shared = _batched_loss(cap, ids, batch, mask=True)
        vals += [full, shared, shared - full]
    return np.array(vals, dtype=np.float64)


def probe_rows(cap: RouterCapture, sets: list[torch.Tensor], batch: int,
               cfg: TraceConfig | None = None) -> dict[str, np.ndarray]:
    """accuracy, control_accuracy, selectivity (layer, task) over the MoE layers with shared experts
    (NaN rows for layers without)."""
    cfg = cfg or TraceConfig()
    tasks = probe_task_names(len(sets) > 1)
    has = [bool(layer.shared) for layer in cap.layers]
    feats: list[list[torch.Tensor]] = [[] for _ in cap.layers]
    src, pos, types, sample = [], [], [], []
    offset = 0
    for si, ids in enumerate(sets):
        N, S = ids.shape
        for i in range(0, N, batch):
            x = ids[i:i + batch]
            hs = iter(cap.shared_outputs(x))
            for li in range(len(cap.layers)):
                if has[li]:
                    feats[li].append(next(hs).double().cpu())
        src.append(np.full(N * S, si))
        pos.append(np.tile((np.arange(S) >= S // 2).astype(np.int64), N))
        types.append(ids.reshape(-1).numpy())
        sample.append(np.repeat(np.arange(N) + offset, S))
        offset += N
    y = {"source": np.concatenate(src), "position": np.concatenate(pos)}
    types_T, sample_T = np.concatenate(types), np.concatenate(sample)
    L, K = len(cap.layers), len(tasks)
    acc, ctl = np.full((L, K), np.nan), np.full((L, K), np.nan)
    for li in range(L):
        if not has[li]:
            continue
        X = torch.cat(feats[li]).numpy()
        for ti, task in enumerate(tasks):
            acc[li, ti], ctl[li, ti] = run_probe(ProbeData(X=X, y=y[task], types=types_T, sample=sample_T),
                                                 cfg, task_seed=ti)
    return {"accuracy": acc, "control_accuracy": ctl, "selectivity": acc - ctl}
