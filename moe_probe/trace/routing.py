"""Routing counts per optimizer step: the ``routing`` row of the store (INTERNAL_API §5).

:class:`RoutingCounter` depends only on :class:`RouterRecord` and :class:`LayerRouting`, so the
Hugging Face adapter reuses it unchanged. Counting stays on the model's device (bincounts, no
``.item()``) because a host sync per layer per micro-batch would stall the step; ``finish``
moves everything to the host in one transfer and derives the ratios with ``metrics.py``.

Legend: T tokens, K top-k, E experts of a layer (all groups), M modalities, G groups.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from moe_probe.model.hooks import LayerRouting, RouterRecord
from moe_probe.modalities import MODALITIES
from moe_probe.trace import metrics

M = len(MODALITIES)


def group_of_experts(info: LayerRouting) -> list[int]:
    """Group index of each expert (declared order); an expert in no group is a group of its own
    (as in ``metrics.nominal_kept``), a layer without groups is one group."""
    groups = list(info.groups.values())
    if not groups:
        return [0] * info.n_experts
    gid = [len(groups) + e for e in range(info.n_experts)]
    for g, ids in enumerate(groups):
        for e in ids:
            gid[e] = g
    return gid


def nominal_kept_torch(load_ME: torch.Tensor, group_of_E: torch.Tensor, group_size_G: torch.Tensor,
                       capacity: float) -> torch.Tensor:
    """Assignments per modality that capacity factor C would keep, for ONE forward's loads.

    cap_e = ceil(C · assignments into e's group / experts in that group); kept_e = min(load_e,
    cap_e), shared among modalities in proportion to their load on e. Float64 because
    ceil(1.25 · 12 / 5) must not become ceil(3.0000002) in float32.
    """
    load_ME = load_ME.to(torch.float64)
    load_E = load_ME.sum(0)
    into_G = torch.zeros(group_size_G.shape[0], dtype=torch.float64, device=load_E.device)
    into_G.index_add_(0, group_of_E, load_E)
    # Same tolerance as metrics.nominal_kept: an exact integer C·A/E_g must not round up.
    cap_E = torch.ceil(capacity * into_G[group_of_E] / group_size_G[group_of_E].to(torch.float64) - 1e-9)
    keep_frac_E = torch.where(load_E > 0, torch.minimum(load_E, cap_E) / load_E.clamp_min(1), 0.0)
    return (load_ME * keep_frac_E).sum(1)


class RoutingCounter:
    """Sums router decisions over the micro-batches of a step, on device; one host copy per step."""

    def __init__(self, layers: list[str], infos: list[LayerRouting], nominal_capacity: float = 1.0,
                 device: torch.device | str = "cpu"):
        if len(layers) != len(infos):
            raise ValueError(f"{len(layers)} layer names for {len(infos)} routing infos")
        self.layers = list(layers)
        self.infos = list(infos)
        self.nominal_capacity = float(nominal_capacity)
        self.device = torch.device(device)
        self.n_experts = max((i.n_experts for i in infos), default=0)
        """Width of the ``expert`` dim: layers with fewer experts are zero-padded."""
        self._group_of_E = [torch.tensor(group_of_experts(i), dtype=torch.int64, device=self.device)
                            for i in infos]
        self._group_size = [torch.bincount(t, minlength=1) for t in self._group_of_E]
        self._reset()

    # Per layer one float64 accumulator row: [tokens M | load M·E | kept M | conf M | z_sum | z_n],
    # so finish() is a single stack + .cpu().
    def _reset(self) -> None:
        E = self.n_experts
        self._acc = torch.zeros(len(self.layers), M * (3 + E) + 2, dtype=torch.float64, device=self.device)

    def add(self, layer_index: int, record: RouterRecord) -> None:
        """Count one router call (one forward of one layer). No host synchronisation."""
        E = self.n_experts
        info = self.infos[layer_index]
        ids_TK = record.topk_ids_TK.detach().to(self.device, torch.int64)
        mod_T = record.modality_T.detach().to(self.device, torch.int64).reshape(-1)
        T, K = ids_TK.shape
        mod_TK = mod_T[:, None].expand(T, K)
        tokens_M = torch.bincount(mod_T, minlength=M)[:M]
        load_ME = torch.bincount((mod_TK * E + ids_TK).reshape(-1), minlength=M * E)[: M * E].view(M, E)
        if record.kept_TK is not None and info.capacity_factor is not None:
            kept = record.kept_TK.detach().to(self.device)
            kept_M = torch.bincount(mod_TK.reshape(-1), weights=kept.reshape(-1).to(torch.float64),
                                    minlength=M)[:M]
        else:
            kept_M = nominal_kept_torch(load_ME[:, : info.n_experts], self._group_of_E[layer_index],
                                        self._group_size[layer_index], self.nominal_capacity)
        logits_TE = record.logits_TE.detach().to(self.device, torch.float32)
        # Softmax over all E equals the group softmax: logits outside the group are -inf.
        top1_T = torch.softmax(logits_TE, dim=-1).amax(-1).to(torch.float64)
        conf_M = torch.bincount(mod_T, weights=top1_T, minlength=M)[:M]
        z_T = torch.logsumexp(logits_TE, dim=-1).to(torch.float64).square()
        row = torch.cat([tokens_M.to(torch.float64), load_ME.reshape(-1).to(torch.float64), kept_M,
                         conf_M, z_T.sum().reshape(1), torch.full((1,), float(T), dtype=torch.float64,
                                                                  device=self.device)])
        self._acc[layer_index] += row

    def counts(self) -> dict[str, np.ndarray]:
        """Raw summed counts on the host (one transfer); does not reset."""
        E, L = self.n_experts, len(self.layers)
        a = self._acc.cpu().numpy()
        o = 0
        tokens = a[:, o:o + M]; o += M
        load = a[:, o:o + M * E].reshape(L, M, E); o += M * E
        kept = a[:, o:o + M]; o += M
        conf = a[:, o:o + M]; o += M
        return {"tokens": tokens, "load": load, "kept": kept, "confidence_sum": conf,
                "z_sum": a[:, o], "z_count": a[:, o + 1]}

    def finish(self) -> dict[str, np.ndarray]:
        """The ``routing`` row (arrays without the step dim), then reset for the next step."""
        c = self.counts()
        self._reset()
        L = len(self.layers)
        derived = {k: np.full((L, M), np.nan) for k in ("capacity_rate", "entropy", "maxvio", "dead_frac")}
        for li, info in enumerate(self.infos):
            E_l = info.n_experts
            row = metrics.routing_metrics_for(info, c["tokens"][li], c["load"][li, :, :E_l], c["kept"][li])
            for k, v in row.items():
                derived[k][li] = v
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(c["tokens"] > 0, c["confidence_sum"] / np.maximum(c["tokens"], 1), np.nan)
            router_z = np.where(c["z_count"] > 0, c["z_sum"] / np.maximum(c["z_count"], 1), np.nan)
        return {
            "tokens": c["tokens"].astype(np.int64),
            "load": c["load"].astype(np.int64),
            "kept": c["kept"],
            **derived,
            "confidence": confidence,
            "router_z": router_z,
        }


@contextmanager
def attach_router_hooks(model, callback):
    """Forward hooks on every layer's ``hook_router``: ``callback(layer_index, RouterRecord)``.

    The hooks are removed on exit, also when the body raises.
    """
    handles = []
    try:
        for li, (_, layer) in enumerate(model.moe_layers()):
            handles.append(layer.hook_router.register_forward_hook(
                lambda _m, args, _out, li=li: callback(li, args[0])))
        yield
    finally:
        for h in handles:
            h.remove()


def counter_for(model, nominal_capacity: float = 1.0, device=None) -> RoutingCounter:
    """A counter sized from ``model.moe_layers()`` (on the model's device unless given)."""
    layers = model.moe_layers()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    return RoutingCounter([n for n, _ in layers], [m.routing_info() for _, m in layers],
                          nominal_capacity, device)


class RoutingTracer:
    """Context manager feeding every ``hook_router`` call of ``model`` into ``counter``."""

    def __init__(self, model, counter: RoutingCounter):
        self.model = model
        self.counter = counter
        self._ctx = None

    def __enter__(self) -> RoutingTracer:
        self._ctx = attach_router_hooks(self.model, self.counter.add)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        ctx, self._ctx = self._ctx, None
        return bool(ctx.__exit__(*exc)) if ctx is not None else False
