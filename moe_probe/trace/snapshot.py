"""Routing snapshot at each eval on the fixed probe batch: saturation and co-activation.

Saturation compares each token's top-k set with the previous snapshot's for the same token
(OLMoE's router saturation between checkpoints), so the probe batch must be the same batch
every time — the data's ``probe_batch()`` is fixed by seed.
"""

from __future__ import annotations

import numpy as np

from moe_probe.trace import metrics


class SnapshotTracer:
    """Keeps the previous snapshot's top-k ids; ``row(topk_ids)`` gives the ``snapshot`` row."""

    def __init__(self, n_experts: int):
        self.n_experts = int(n_experts)
        """Width of the expert dims (layers with fewer experts are NaN-padded)."""
        self._previous: list[np.ndarray | None] | None = None

    def row(self, topk_ids: list) -> dict[str, np.ndarray]:
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
        self._previous = ids
        return {"saturation": saturation, "coactivation": coactivation}

    def state(self) -> list[np.ndarray | None] | None:
        return self._previous

    def load_state(self, previous) -> None:
        """Restore the reference snapshot (a resumed run keeps saturation continuous)."""
        self._previous = previous
