"""Expert-partition advisor: Symbiotic-MoE groups proposed from an HF model's routing counts.

Per MoE layer, the ``round(und_fraction · E)`` experts most picked by the ``--text`` tokens
(the "understanding" data) form the und group, the rest the gen group — the paper's step 1–2
(96 of 128). The choice is the model part's own ``choose_groups`` so the proposal is exactly what
``convert(model, "symbiotic", groups=...)`` / ``ModelConfig.groups`` take.

JSON written to ``--advise-groups FILE``::

    {"format": "moe_probe.groups/1",
     "groups": [[und ids of MoE layer 0], ...],      # ModelConfig.groups: per-layer und ids, sorted
     "gen":    [[the remaining ids], ...],
     "layers": ["1", "2"],                            # store layer labels (decoder layer index)
     "experts": 8, "und_fraction": 0.75,
     "counts": [[picks of expert e by --text tokens], ...],
     "model": {"arch": ..., "top_k": ..., "shared_experts": ...}, "steps": N}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = "moe_probe.groups/1"


def propose(counts_LE: np.ndarray, und_fraction: float) -> list[list[int]]:
    from moe_probe.model.convert import choose_groups

    return [list(g) for g in choose_groups(np.asarray(counts_LE, dtype=np.float64), und_fraction)]


def write_advice(path: str, counts_LE: np.ndarray, layers: list[str], und_fraction: float,
                 model_attrs: dict, steps: int) -> dict:
    und = propose(counts_LE, und_fraction)
    E = int(counts_LE.shape[1])
    doc = {
        "format": FORMAT,
        "groups": und,
        "gen": [[e for e in range(E) if e not in set(g)] for g in und],
        "layers": list(layers),
        "experts": E,
        "und_fraction": und_fraction,
        "counts": np.asarray(counts_LE).astype(int).tolist(),
        "model": {k: model_attrs.get(k) for k in ("arch", "top_k", "shared_experts", "source")},
        "steps": steps,
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=1))
    return doc
