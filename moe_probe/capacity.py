"""Expert capacity: the one formula behind the model's token dropping and every nominal-kept count.

Pure Python with numpy (no torch import): the model (``model/moe.py``), the routing counter
(``trace/routing.py``) and the numpy reader side (``metrics.py``) all call
:func:`expert_capacity`. It takes Python numbers, numpy arrays or torch tensors — the arithmetic is
written once and dispatched only for the final ceil, so the three callers cannot drift apart
(docs/CONTRACT_CHANGES.md item 5).
"""

from __future__ import annotations

import math

import numpy as np

CAPACITY_TOL = 1e-9
"""Subtracted before the ceil: C·A/E_g computed in floating point must not round an exact
integer up (ceil(1.1 · 10 / 11) would otherwise be 2)."""


def expert_capacity(capacity_factor, assignments, n_experts):
    """cap = ceil(C · A / E_g): the picks each expert of a group may process in one forward.

    ``assignments`` = K · T_g, the picks routed into the expert's group in that forward;
    ``n_experts`` = E_g. Python numbers give an ``int``; numpy arrays and torch tensors give the
    same type back (float, element-wise)."""
    x = capacity_factor * assignments / n_experts - CAPACITY_TOL
    if isinstance(x, (int, float)):
        return math.ceil(x)
    # a torch tensor has .ceil(); numpy arrays and scalars go through np.ceil
    return x.ceil() if hasattr(x, "ceil") else np.ceil(x)
