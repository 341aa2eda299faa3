"""Routing counts per optimizer step: the ``routing`` row of the store (INTERNAL_API §5).

:class:`RoutingCounter` depends only on :class:`RouterRecord` and :class:`LayerRouting`, so the
Hugging Face adapter reuses it unchanged. Counting stays on the model's device (bincounts, no
``.item()``) because a host sync per layer per micro-batch would stall the step; ``finish``
moves everything to the host in one transfer and derives the ratios with ``metrics.py``.

Legend: T tokens, K top-k, E experts of a layer (all groups), M modalities, G groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F

from moe_probe.capacity import expert_capacity
from moe_probe.model.hooks import LayerRouting, RouterRecord
from moe_probe.modalities import MODALITIES
from moe_probe import metrics


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


class RoutingCounter:
    """Sums router decisions over the micro-batches of a step, on device; one host copy per step.

    ``add`` only keeps references to the record's tensors; the counting runs batched over all
    layers and micro-batches of the step (a few dozen kernels per step instead of a few dozen per
    layer per micro-batch — at demo size the per-record version cost ~2.5% of a training step).
    Producers must therefore not modify a record's tensors in place after the hook call.
    """

    max_pending: int = 256
    """Records kept before they are reduced early (bounds memory with many micro-batches)."""

    def __init__(self, layers: list[str], infos: list[LayerRouting], nominal_capacity: float = 1.0,
                 device: torch.device | str = "cpu", *, modalities: Sequence[str] = MODALITIES):
        if len(layers) != len(infos):
            raise ValueError(f"{len(layers)} layer names for {len(infos)} routing infos")
        if not modalities:
            raise ValueError("a routing counter needs at least one modality name")
        self.layers = list(layers)
        self.modalities = tuple(modalities)
        """Labels of the ``modality`` dim: a record's ``modality_T`` indexes them."""
        self.infos = list(infos)
        self.nominal_capacity = float(nominal_capacity)
        self.device = torch.device(device)
        self.n_experts = max((i.n_experts for i in infos), default=0)
        """Width of the ``expert`` dim: layers with fewer experts are zero-padded."""
        E = self.n_experts
        gids = [group_of_experts(i) for i in infos]
        # Padding experts of narrower layers get one extra group of their own (they get no load).
        pad_gid = max((max(g) for g in gids if g), default=0) + 1
        gid_LE = [g + [pad_gid] * (E - len(g)) for g in gids]
        self._gid_LE = torch.tensor(gid_LE, dtype=torch.int64, device=self.device).reshape(len(infos), E)
        G = pad_gid + 1
        size_LG = torch.zeros(len(infos), G, dtype=torch.float64, device=self.device)
        size_LG.scatter_add_(1, self._gid_LE, torch.ones_like(self._gid_LE, dtype=torch.float64))
        self._size_LG = size_LG.clamp_min(1)
        self._layer_ids = torch.arange(len(infos), device=self.device)
        self._nominal_flag = torch.tensor([0.0, 1.0], dtype=torch.float64, device=self.device)
        self._one = torch.ones(1, dtype=torch.float64, device=self.device)
        # (L, M, E) experts of the group each modality routes into (padding experts in none)
        self._masks_LME = np.zeros((len(infos), len(self.modalities), E), dtype=bool)
        for li, info in enumerate(infos):
            self._masks_LME[li, :, : info.n_experts] = metrics.group_masks(
                info.n_experts, info.groups, info.modality_group, self.modalities)
        self._k_L = np.array([i.top_k for i in infos], dtype=np.float64)
        self._pending: list[tuple[int, RouterRecord]] = []
        self._reset()

    # Per layer one float64 accumulator row: [tokens M | load M·E | kept M | conf M | z_sum | z_n],
    # so counts() is a single .cpu().
    def _reset(self) -> None:
        E, M = self.n_experts, len(self.modalities)
        self._acc = torch.zeros(len(self.layers), M * (3 + E) + 2, dtype=torch.float64, device=self.device)
        self._pending = []

    def reset(self) -> None:
        """Drop everything counted since the last ``finish`` (a step that was abandoned)."""
        self._reset()

    def add(self, layer_index: int, record: RouterRecord) -> None:
        """Count one router call (one forward of one layer). No kernels, no host synchronisation."""
        self._pending.append((layer_index, record))
        if len(self._pending) >= self.max_pending:
            self._reduce()

    def _nominal(self, layer_index: int, record: RouterRecord) -> bool:
        return record.kept_TK is None or self.infos[layer_index].capacity_factor is None

    def _reduce(self) -> None:
        """Fold the pending records into the accumulator (on device, no host sync)."""
        if not self._pending:
            return
        recs, self._pending = self._pending, []
        E, L, R, dev = self.n_experts, len(self.layers), len(recs), self.device
        M = len(self.modalities)
        slot_A, slot_T, logits, kept_slot, kept_val, flags = [], [], [], [], [], []
        for r, (li, rec) in enumerate(recs):
            ids_TK = rec.topk_ids_TK.detach().to(dev, torch.int64)
            mod_T = rec.modality_T.detach().to(dev, torch.int64).reshape(-1)
            T, K = ids_TK.shape
            slot_A.append((mod_T[:, None] * E + (ids_TK + r * M * E)).reshape(-1))
            slot_T.append(mod_T + li * M)
            lg = rec.logits_TE.detach().to(dev, torch.float32)
            if lg.shape[1] < E:
                lg = F.pad(lg, (0, E - lg.shape[1]), value=float("-inf"))
            logits.append(lg)
            nominal = self._nominal(li, rec)
            flags.append(self._nominal_flag[int(nominal): int(nominal) + 1])
            if not nominal:
                kept_slot.append((mod_T[:, None] + li * M).expand(T, K).reshape(-1))
                kept_val.append(rec.kept_TK.detach().to(dev, torch.float64).reshape(-1))
        layer_R = torch.cat([self._layer_ids[li: li + 1] for li, _ in recs])
        slot_A, slot_T = torch.cat(slot_A), torch.cat(slot_T)
        # load per record (capacity is per forward), then summed per layer
        load_RME = torch.zeros(R * M * E, dtype=torch.float64, device=dev)
        load_RME.index_add_(0, slot_A, self._one.expand(slot_A.shape))
        load_RME = load_RME.view(R, M, E)
        load_LME = torch.zeros(L, M * E, dtype=torch.float64, device=dev)
        load_LME.index_add_(0, layer_R, load_RME.view(R, M * E))
        # tokens, confidence (top-1 prob of the group softmax: logits are -inf outside the group),
        # z = logsumexp² — without materialising the softmax
        logits_NE = torch.cat(logits)
        # logsumexp by hand: exp(-inf) takes a slow path on CPU (~20x; it made the counter cost
        # ~2.5% of a demo step). Clamping at -30 keeps masked experts out: each adds <= e^-30 to
        # a sum >= 1, below float32 resolution. A row's max is finite (its group's logits).
        max_N = logits_NE.amax(-1)
        sum_N = (logits_NE - max_N[:, None]).clamp_min_(-30.0).exp_().sum(-1)
        lse_N = max_N + torch.log(sum_N)
        top1_N = sum_N.reciprocal()  # exp(max − lse)
        tokens_LM = torch.zeros(L * M, dtype=torch.float64, device=dev).index_add_(
            0, slot_T, self._one.expand(slot_T.shape))
        conf_LM = torch.zeros(L * M, dtype=torch.float64, device=dev).index_add_(0, slot_T, top1_N.double())
        z_L = torch.zeros(L, dtype=torch.float64, device=dev).index_add_(
            0, torch.div(slot_T, M, rounding_mode="floor"), lse_N.double().square())
        # kept: actual drops where the layer reports them, else nominal per forward
        gid_RE = self._gid_LE[layer_R]
        load_RE = load_RME.sum(1)
        into_RG = torch.zeros(R, self._size_LG.shape[1], dtype=torch.float64, device=dev)
        into_RG.scatter_add_(1, gid_RE, load_RE)
        cap_RE = expert_capacity(self.nominal_capacity, into_RG.gather(1, gid_RE),
                                 self._size_LG[layer_R].gather(1, gid_RE))
        frac_RE = torch.where(load_RE > 0, torch.minimum(load_RE, cap_RE) / load_RE.clamp_min(1), 0.0)
        kept_RM = (load_RME * frac_RE[:, None, :]).sum(-1) * torch.cat(flags)[:, None]
        kept_LM = torch.zeros(L, M, dtype=torch.float64, device=dev).index_add_(0, layer_R, kept_RM)
        if kept_slot:
            kept_LM.view(-1).index_add_(0, torch.cat(kept_slot), torch.cat(kept_val))
        tokens_LM = tokens_LM.view(L, M)
        self._acc += torch.cat([tokens_LM, load_LME, kept_LM, conf_LM.view(L, M), z_L[:, None],
                                tokens_LM.sum(1, keepdim=True)], 1)

    def counts(self) -> dict[str, np.ndarray]:
        """Raw summed counts on the host (one transfer); does not reset."""
        self._reduce()
        E, L, M = self.n_experts, len(self.layers), len(self.modalities)
        a = self._acc.cpu().numpy()
        o = 0
        tokens = a[:, o:o + M]; o += M
        load = a[:, o:o + M * E].reshape(L, M, E); o += M * E
        kept = a[:, o:o + M]; o += M
        conf = a[:, o:o + M]; o += M
        return {"tokens": tokens, "load": load, "kept": kept, "confidence_sum": conf,
                "z_sum": a[:, o], "z_count": a[:, o + 1]}

    distributed: bool = False
    """Under torch.distributed: ``finish`` sums the counts of every rank before any metric."""

    def finish(self) -> dict[str, np.ndarray]:
        """The ``routing`` row (arrays without the step dim), then reset for the next step."""
        if self.distributed:
            # Counts (and the sums behind confidence / router_z) are summed over ranks before the
            # ratios: one collective on the one stacked accumulator per step.
            self._reduce()
            torch.distributed.all_reduce(self._acc)
        c = self.counts()
        self._reset()
        # All layers at once (metrics take leading dims); masks hold each layer's groups.
        mask, load = self._masks_LME, c["load"]
        derived = {
            "capacity_rate": metrics.capacity_rate(c["kept"], c["tokens"], self._k_L[:, None]),
            **{name: f(load, mask) for name, f in metrics.LOAD_METRICS.items()},
        }
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


def counter_for(model, nominal_capacity: float = 1.0, device=None) -> RoutingCounter:
    """A counter sized from ``model.moe_layers()`` (on the model's device unless given), over
    moe_probe's ``MODALITIES``. Attach it with
    ``hooks(model, layer_hooks(model, "hook_router", counter.add))``."""
    layers = model.moe_layers()
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    return RoutingCounter([n for n, _ in layers], [m.routing_info() for _, m in layers],
                          nominal_capacity, device)
