"""Routing metrics from counts (ARCHITECTURE.md, "Metric definitions"). numpy only, no torch.

Used by the routing tracer, the HF adapter, the fixtures and readers. Every function accepts extra
leading dims (e.g. steps, layers) so whole histories can be computed at once.

Legend: M modalities (the run's modality names; ``MODALITIES`` for moe_probe's models), E routed
experts of the layer (all groups), T tokens, K top-k. A modality with no tokens (or whose group
received nothing) gets NaN, silently.

Groups: a layer's experts are partitioned into named groups (``{"und": (...), "gen": (...)}``, or
one group for a plain MoE); modality m routes into ``modality_group[m]``. Per-modality metrics are
taken over the E_g experts of that group. Pass ``groups=None`` for one group of all experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from moe_probe.capacity import expert_capacity
from moe_probe.modalities import MODALITIES

__all__ = [
    "group_masks", "capacity_rate", "entropy", "maxvio", "dead_frac", "load_cv", "routing_metrics",
    "routing_metrics_for", "nominal_kept", "saturation", "coactivation", "cosine",
    "cosine_from_sums", "DEAD_SHARE", "layer_groups", "expert_group", "pooled_dead",
]

DEAD_SHARE = 0.01
"""An expert is dead for modality m when it gets less than this fraction of the uniform share."""


def group_masks(n_experts: int, groups: Mapping[str, Sequence[int]] | None = None,
                modality_group: Mapping[str, str] | None = None,
                modalities: Sequence[str] = MODALITIES) -> np.ndarray:
    """Boolean (M, E): experts of the group each modality routes into.

    A modality absent from ``modality_group`` (or no groups at all) uses every expert."""
    mask = np.ones((len(modalities), n_experts), dtype=bool)
    if not groups:
        return mask
    for i, m in enumerate(modalities):
        g = (modality_group or {}).get(m)
        if g is None:
            continue
        if g not in groups:
            raise ValueError(f"modality {m!r} routes into unknown group {g!r} "
                             f"(groups: {sorted(groups)})")
        mask[i] = False
        mask[i, np.asarray(groups[g], dtype=np.int64)] = True
    return mask


def layer_groups(groups) -> dict | None:
    """A store's ``model.groups`` attr as {layer: {group: [ids]}} when some layer has more than
    one group (a plain MoE's {"all": ...} is None)."""
    if not isinstance(groups, dict):
        return None
    if not any(isinstance(g, dict) and len(g) > 1 for g in groups.values()):
        return None
    return {str(k): {n: [int(e) for e in ids] for n, ids in g.items()} for k, g in groups.items()}


def expert_group(groups: dict | None, modality_group: dict | None, layer: str, modality: str,
                 n_experts: int) -> list[int]:
    """Expert ids ``modality``'s tokens can route into at ``layer`` (``groups`` as
    :func:`layer_groups` gives them): its group where the store names one; else its task's group
    (TASK_OF_MODALITY) when the layer has it; else all."""
    from moe_probe.modalities import TASK_OF_MODALITY

    layer_groups_ = (groups or {}).get(str(layer))
    if layer_groups_:
        mg = (modality_group or {}).get(str(layer), {})
        for key in (mg.get(modality), TASK_OF_MODALITY.get(modality)):
            if key in layer_groups_:
                return [int(e) for e in layer_groups_[key]]
    return list(range(n_experts))


def pooled_dead(load_SME: np.ndarray, ids: Sequence[int], mis: Sequence[int]):
    """``(dead_SE, frac_S)``: per row, the experts ``ids`` of one group that get less than
    :data:`DEAD_SHARE` of the uniform share of the group's assignments, pooled over the kinds
    ``mis`` routed there, and their fraction. ``load_SME`` may carry more leading dims
    (``(..., M, E)``: every layer at once). The dead-experts detector and the rollups'
    ``group_dead_frac`` both call this, so their numbers are the same (sums of counts are exact,
    whether the counts come as integers or floats)."""
    x = load_SME
    if list(mis) != list(range(x.shape[-2])):  # (indexing copies: skip it when it selects all)
        x = x[..., list(mis), :]
    if list(ids) != list(range(x.shape[-1])):
        x = x[..., list(ids)]
    if x.dtype.kind == "f":
        tot = np.nansum(x, axis=-2)  # (..., E_g)
        share = tot.sum(-1, keepdims=True) / len(ids)
        with np.errstate(invalid="ignore"):
            dead_SE = (tot < DEAD_SHARE * share) & (share > 0)
    else:
        # Integer counts (the writer's rows, every step: the rollups' group_dead_frac), at a
        # third of the cost: sums through einsum (numpy's reductions over a short axis are
        # several times slower), the kinds' in the counts' own dtype (int32 rows hold one step's
        # assignments, far below 2**31), the experts' in int64, and an integer t < thr exactly
        # when t < ceil(thr), so no float copy of the loads (share 0 gives thr 0, which no
        # count is below).
        tot = np.einsum("...me->...e", x)
        share = np.einsum("...e->...", tot, dtype=np.int64)[..., None] / len(ids)
        dead_SE = tot < np.ceil(DEAD_SHARE * share).astype(tot.dtype)
    # = .mean(-1): einsum counts the booleans faster than .sum, and without a float copy
    return dead_SE, np.einsum("...e->...", dead_SE, dtype=np.int32) / dead_SE.shape[-1]


def _div(a, b):
    """a / b with NaN where b == 0, without RuntimeWarnings."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = np.full(np.broadcast(a, b).shape, np.nan)
    np.divide(a, b, out=out, where=(b != 0))
    return out


def capacity_rate(kept_M, tokens_M, k: int) -> np.ndarray:
    """kept / (k · tokens): 1.0 = nothing dropped."""
    return _div(kept_M, k * np.asarray(tokens_M, dtype=np.float64))


def entropy(load_ME, mask_ME) -> np.ndarray:
    """H(load / Σload) / log(E_g) over each modality's group. NaN if no load or E_g == 1."""
    load = np.where(mask_ME, np.asarray(load_ME, dtype=np.float64), 0.0)
    total = load.sum(-1, keepdims=True)
    p = _div(load, total)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = -plogp.sum(-1)
    h = np.where(np.isnan(p).any(-1), np.nan, h)
    return _div(h, np.log(np.maximum(mask_ME.sum(-1), 1)))


def maxvio(load_ME, mask_ME) -> np.ndarray:
    """(max_e load − mean_e load) / mean_e load over each modality's group."""
    load = np.asarray(load_ME, dtype=np.float64)
    e_g = mask_ME.sum(-1)
    mean = _div(np.where(mask_ME, load, 0.0).sum(-1), e_g)
    mx = np.where(mask_ME, load, -np.inf).max(-1)
    return _div(mx - mean, mean)


def dead_frac(load_ME, mask_ME, share: float = DEAD_SHARE) -> np.ndarray:
    """Fraction of the group's experts with load < ``share`` × the uniform share."""
    load = np.asarray(load_ME, dtype=np.float64)
    e_g = mask_ME.sum(-1)
    total = np.where(mask_ME, load, 0.0).sum(-1)
    uniform = _div(total, e_g)
    dead = (load < share * uniform[..., None]) & mask_ME
    return np.where(total > 0, _div(dead.sum(-1), e_g), np.nan)


def load_cv(load_ME, mask_ME) -> np.ndarray:
    """Coefficient of variation std_e / mean_e of load over each modality's group (population
    std; 0 = perfectly even). NaN if the group got no load."""
    load = np.asarray(load_ME, dtype=np.float64)
    e_g = mask_ME.sum(-1)
    mean = _div(np.where(mask_ME, load, 0.0).sum(-1), e_g)
    var = _div(np.where(mask_ME, (load - mean[..., None]) ** 2, 0.0).sum(-1), e_g)
    return _div(np.sqrt(var), mean)


LOAD_METRICS = {"entropy": entropy, "maxvio": maxvio, "dead_frac": dead_frac, "load_cv": load_cv}
"""The ``routing`` metrics of a modality's load over the experts of the group it routes into:
name -> f(load_ME, mask_ME) -> (..., M). The routing tracer, the HF adapter and the fixtures
compute every entry; a new one also needs its entry in ``moe_probe.store.schema.GROUPS``."""


def routing_metrics(tokens_M, load_ME, kept_M, k: int,
                    groups: Mapping[str, Sequence[int]] | None = None,
                    modality_group: Mapping[str, str] | None = None,
                    modalities: Sequence[str] = MODALITIES) -> dict[str, np.ndarray]:
    """capacity_rate and every :data:`LOAD_METRICS` entry (each ``(..., M)``) from one layer's
    counts."""
    load_ME = np.asarray(load_ME)
    mask = group_masks(load_ME.shape[-1], groups, modality_group, modalities)
    return {"capacity_rate": capacity_rate(kept_M, tokens_M, k),
            **{name: f(load_ME, mask) for name, f in LOAD_METRICS.items()}}


def routing_metrics_for(routing, tokens_M, load_ME, kept_M,
                        modalities: Sequence[str] = MODALITIES) -> dict[str, np.ndarray]:
    """Same, with the layout taken from a ``LayerRouting``-like object (duck-typed:
    ``top_k``, ``groups``, ``modality_group``)."""
    return routing_metrics(tokens_M, load_ME, kept_M, routing.top_k, routing.groups,
                           routing.modality_group, modalities)


def nominal_kept(load_ME, groups: Mapping[str, Sequence[int]] | None,
                 modality_group: Mapping[str, str] | None, capacity_factor: float,
                 modalities: Sequence[str] = MODALITIES) -> np.ndarray:
    """Assignments per modality that capacity factor C would keep, for ONE forward (``(..., M)``).

    cap_e = ``expert_capacity``(C, assignments into e's group, experts in that group); kept_e =
    min(load_e, cap_e), shared among modalities in proportion to their load on e. Capacity is per
    forward, so call this per forward and sum (summing loads first would be wrong)."""
    load = np.asarray(load_ME, dtype=np.float64)
    n_e = load.shape[-1]
    # group id per expert; experts in no group get their own (they receive no load anyway)
    gid = np.arange(n_e) + (len(groups) if groups else 1)
    if groups:
        for j, ids in enumerate(groups.values()):
            gid[np.asarray(ids, dtype=np.int64)] = j
    else:
        gid[:] = 0
    onehot_GE = (gid[None, :] == np.unique(gid)[:, None]).astype(np.float64)
    load_e = load.sum(-2)  # (..., E): all modalities
    into_g = load_e @ onehot_GE.T  # (..., G)
    size_g = onehot_GE.sum(-1)
    cap_g = expert_capacity(capacity_factor, into_g, size_g)
    cap_e = cap_g @ onehot_GE  # (..., E)
    kept_e = np.minimum(load_e, cap_e)
    share = _div(load, load_e[..., None, :])
    share = np.where(np.isnan(share), 0.0, share)
    del modality_group, modalities  # the split follows actual loads, whatever the routing rule
    return (share * kept_e[..., None, :]).sum(-1)


def saturation(topk_prev_TK, topk_now_TK) -> float:
    """OLMoE router saturation: mean over tokens of |TopK_prev ∩ TopK_now| / k (same tokens)."""
    prev = np.asarray(topk_prev_TK)
    now = np.asarray(topk_now_TK)
    if prev.shape != now.shape:
        raise ValueError(f"saturation needs the same tokens: shapes {prev.shape} vs {now.shape}")
    if prev.shape[0] == 0:
        return float("nan")
    hits = (now[:, :, None] == prev[:, None, :]).any(-1).sum(-1)
    return float(hits.mean() / now.shape[1])


def coactivation(topk_TK, n_experts: int) -> np.ndarray:
    """(E, E) with [e, e'] = P(e' | e) = count(e and e' both picked) / count(e); NaN rows for
    experts never picked. The diagonal is 1 for picked experts (it follows the formula);
    ids outside [0, E) (padding, dropped) are ignored."""
    ids = np.asarray(topk_TK, dtype=np.int64)
    t = ids.shape[0]
    onehot = np.zeros((t, n_experts + 1), dtype=np.float64)
    safe = np.where((ids >= 0) & (ids < n_experts), ids, n_experts)
    np.put_along_axis(onehot, safe, 1.0, axis=1)
    onehot = onehot[:, :n_experts]
    both = onehot.T @ onehot
    return _div(both, np.diag(both)[:, None])


def cosine(a, b) -> float:
    """cos(a, b) of two flattened arrays; NaN where either is all zero."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(cosine_from_sums(a @ b, a @ a, b @ b))


def cosine_from_sums(dot, sq_a, sq_b):
    """Cosine from accumulated dot product and squared norms (per component, summed over
    parameters): the gradient tracer never needs both full gradients at once."""
    return _div(dot, np.sqrt(np.asarray(sq_a, dtype=np.float64) * np.asarray(sq_b, np.float64)))
