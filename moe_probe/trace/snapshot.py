"""Routing snapshot at each eval on the fixed probe batch: saturation and co-activation.

Saturation compares each token's top-k set with the previous snapshot's for the same token
(OLMoE's router saturation between checkpoints), so the probe batch must be the same batch
every time — the data's ``probe_batch()`` is fixed by seed.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_probe import metrics


class SnapshotTracer:
    """Keeps the previous snapshot's top-k ids; ``row(topk_ids)`` gives the ``snapshot`` row."""

    def __init__(self, n_experts: int):
        self.n_experts = int(n_experts)
        """Width of the expert dims (layers with fewer experts are NaN-padded)."""
        self._previous: list[np.ndarray | None] | None = None
        self._reference: list[np.ndarray | None] | None = None  # what the last row compared to
        self._step: int | None = None  # the last row's step

    def row(self, topk_ids: list, step: int | None = None) -> dict[str, np.ndarray]:
        """``topk_ids``: per layer a (T, K) tensor/array of top-k expert ids (or None)."""
        E = self.n_experts
        ids = [None if t is None else np.asarray(t.cpu() if hasattr(t, "cpu") else t, dtype=np.int64)
               for t in topk_ids]
        L = len(ids)
        saturation = np.full(L, np.nan)
        coactivation = np.full((L, E, E), np.nan)
        for li, cur in enumerate(ids):
            if cur is None:
                continue
            coactivation[li] = metrics.coactivation(cur, E)
            prev = None if self._previous is None else self._previous[li]
            if prev is not None and prev.shape == cur.shape:
                saturation[li] = metrics.saturation(cur, prev)
        self._reference, self._previous, self._step = self._previous, ids, step
        return {"saturation": saturation, "coactivation": coactivation}

    def state(self) -> dict:
        """For a checkpoint (tensors: checkpoints load with ``weights_only``)."""
        def pack(ids):
            return None if ids is None else [None if a is None else torch.from_numpy(a) for a in ids]
        return {"step": self._step, "latest": pack(self._previous), "reference": pack(self._reference)}

    def load_state(self, state: dict | None, resume_step: int) -> None:
        """Continue a resumed run's saturation as if it had never stopped. The trainer re-writes
        the snapshot row at the checkpoint step: if the saved state's last row is that one, it
        must compare against that row's own reference again."""
        if not state:
            return

        def unpack(ids):
            return None if ids is None else [None if a is None else a.numpy() for a in ids]
        again = state.get("step") == resume_step
        self._previous = unpack(state["reference"] if again else state["latest"])
