"""Stage-2 conversion of a stage-1 ``moe`` model (Modality-Aware Expert Disentanglement).

- ``moe``: unchanged (the same object).
- ``symbiotic``: per layer, the experts listed in ``groups[layer]`` form the und group, the rest
  the gen group; router rows / expert weights / balance biases are sliced, never re-initialised,
  so the parameter count is identical.
- ``mot``: the gen tower is a copy of the und tower (attention projections, norms, router,
  routed and shared experts); right after conversion both towers compute the same function.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moe_probe.model.hooks import hooks, layer_hooks
from moe_probe.model.transformer import MultimodalMoE
from moe_probe.modalities import VAE


def choose_groups(counts_LE, und_fraction: float) -> tuple[tuple[int, ...], ...]:
    """Per layer, the round(und_fraction·E) experts most picked by text+vit tokens (ties: lower
    id first) as a sorted tuple of und ids."""
    counts = torch.as_tensor(counts_LE, dtype=torch.float64)
    if counts.dim() != 2:
        raise ValueError(f"counts must be (layers, experts), got shape {tuple(counts.shape)}")
    L, E = counts.shape
    n_und = round(und_fraction * E)
    if not 0 < n_und < E:
        raise ValueError(f"und_fraction {und_fraction} leaves an empty group of {E} experts "
                         f"({n_und} und, {E - n_und} gen)")
    out = []
    for layer in range(L):
        # Stable sort on -count keeps lower ids first among ties.
        order = torch.sort(-counts[layer], stable=True).indices[:n_und]
        out.append(tuple(sorted(order.tolist())))
    return tuple(out)


@torch.no_grad()
def und_expert_counts(model: MultimodalMoE, batches) -> torch.Tensor:
    """(L, E) top-k picks (before drops) of text and vit tokens over ``batches``."""
    layers = model.moe_layers()
    counts = torch.zeros(len(layers), layers[0][1].n_experts, dtype=torch.long)

    def count(li, rec):
        ids = rec.topk_ids_TK[rec.modality_T != VAE].flatten().cpu()
        counts[li] += torch.bincount(ids, minlength=counts.shape[1])

    was_training = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        with hooks(model, layer_hooks(model, "hook_router", count)):
            for b in batches:
                model(b.to(dev))
    finally:
        model.train(was_training)
    return counts


def convert(model: MultimodalMoE, arch: str, *, groups=None) -> MultimodalMoE:
    """Stage-2 model of ``arch`` from a stage-1 ``moe`` model (see module docstring)."""
    cfg = model.cfg
    if cfg.arch != "moe":
        raise ValueError(f"convert expects a stage-1 'moe' model, got arch {cfg.arch!r}")
    if arch == "moe":
        return model
    if arch == "symbiotic":
        if groups is None:
            raise ValueError("symbiotic conversion needs groups: "
                             "choose_groups(und_expert_counts(model, batches), und_fraction)")
        new_cfg = replace(cfg, arch="symbiotic", groups=groups)  # validates sizes
    elif arch == "mot":
        new_cfg = replace(cfg, arch="mot", groups=None)
    else:
        raise ValueError(f"unknown arch {arch!r}: expected moe, mot or symbiotic")
    src = model.state_dict()
    new = MultimodalMoE(new_cfg, model.vocab_size)
    state = {}
    for name in new.state_dict():
        state[name] = _source_tensor(name, src, new_cfg)
    new.load_state_dict(state)
    p = next(model.parameters())
    new.to(device=p.device, dtype=p.dtype)
    new.set_shield(model.layers[0].ffn.shield_scale)
    new.train(model.training)
    return new


def _source_tensor(name: str, src: dict, cfg) -> torch.Tensor:
    if name in src:
        return src[name].clone()
    parts = name.split(".")
    if cfg.arch == "mot":
        if parts[2].startswith("gen_"):  # gen tower attention / norms = und tower's
            return src[".".join(parts[:2] + [parts[2][4:]] + parts[3:])].clone()
        # layers.i.ffn.groups.{und,gen}.<rest>: routed part from the single group `all`,
        # shared experts from the layer's shared experts.
        rest = parts[5:]
        if rest[0] == "shared":
            return src[".".join(parts[:3] + rest)].clone()
        return src[".".join(parts[:4] + ["all"] + rest)].clone()
    # symbiotic: slice rows of the `all` group by the layer's und/gen ids.
    layer = int(parts[1])
    und, gen = cfg.layer_groups()[layer]
    ids = torch.tensor(und if parts[4] == "und" else gen)
    return src[".".join(parts[:4] + ["all"] + parts[5:])][ids].clone()
