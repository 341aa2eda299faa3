"""Find the MoE layers of a Hugging Face causal LM: from the family table, else by structure.

Structural discovery (families missing from ``families.FAMILIES``) looks, inside each decoder
layer, for an *experts* module (a direct 3-D parameter with first dim E, or a ModuleList of E
identically shaped sub-modules) and a sibling *router* (a direct 2-D ``weight`` of shape [E, D]).
Modules named ``*shared*`` next to them are shared experts (a 1-output linear among them is the
shared-expert gate). One probe forward with temporary hooks (``moe_probe.model.hooks.hooks``)
then checks what each router returns: the transformers-5 ``(logits, weights, ids)`` tuple (ids
recorded as the model chose them) or bare logits (then picks = top-k of softmax(logits), k from
the config).

Legend: E experts, D model dim, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_probe.hf.families import FAMILIES, Family
from moe_probe.model.hooks import hooks

TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts", "moe_k")
N_SHARED_KEYS = ("n_shared_experts", "num_shared_experts", "shared_expert_count")


@dataclass(frozen=True)
class MoeLayer:
    """One sparse layer of an HF model, as the adapter sees it. Paths are from the model root."""

    name: str
    """Store label of the layer: the decoder layer index as a string."""
    index: int
    router: str
    experts: str
    n_experts: int
    top_k: int
    shared: tuple[str, ...] = ()
    shared_gate: str | None = None
    n_shared: int = 0
    output: str = "ids"
    """Router output form (``families.Family.output``): ``ids`` = (logits, weights, ids) recorded
    as the model chose; ``logits`` = bare logits, picks = softmax top-k; ``scores_logits`` = Llama 4."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Path and ModuleList of the decoder layers (the ModuleList of ``num_hidden_layers`` blocks)."""
    n = getattr(model.config, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if n is not None and len(mod) == n and name.endswith("layers"):
                return name, mod
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no list of decoder layers found")
    return best


def _config_int(config, keys, default=None):
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _n_experts(experts: nn.Module) -> int:
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    for p in experts.parameters(recurse=False):
        if p.ndim == 3:
            return int(p.shape[0])
    return int(getattr(experts, "num_experts", 0))


def from_table(model: nn.Module, family: Family) -> list[MoeLayer]:
    path, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        block = getattr(layer, family.block, None)
        router = getattr(block, family.router, None) if block is not None else None
        experts = getattr(block, family.experts, None) if block is not None else None
        if router is None or experts is None:
            continue  # dense layer (DeepSeek-V3's first layers, Qwen2-MoE mlp_only_layers)
        pre = f"{path}.{i}"
        shared = tuple(f"{pre}.{s}" for s in family.shared if _get(layer, s) is not None)
        gate = family.shared_gate if family.shared_gate and _get(layer, family.shared_gate) else None
        n_shared = 0
        if shared:
            n_shared = _config_int(model.config, (family.n_shared_key,) if family.n_shared_key else (),
                                   default=len(shared))
        out.append(MoeLayer(
            name=str(i), index=i, router=f"{pre}.{family.block}.{family.router}",
            experts=f"{pre}.{family.block}.{family.experts}", n_experts=_n_experts(experts),
            top_k=int(getattr(router, "top_k", None) or _config_int(model.config, TOP_K_KEYS)),
            shared=shared, shared_gate=f"{pre}.{gate}" if gate else None, n_shared=n_shared,
            output=family.output))
    return out


def _same_shapes(mods: nn.ModuleList) -> bool:
    sig = [tuple(tuple(p.shape) for p in m.parameters()) for m in mods]
    return bool(sig[0]) and all(x == sig[0] for x in sig)


def _router_for(parent: nn.Module, experts_name: str, E: int) -> str | None:
    for name, child in parent.named_children():
        if name == experts_name or "shared" in name:
            continue
        w = getattr(child, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[0] == E:
            return name
    return None


def find_structural(model: nn.Module) -> list[MoeLayer]:
    """MoE layers found by shape alone (no module names assumed except ``*shared*``)."""
    path, layers = decoder_layers(model)
    k_cfg = _config_int(model.config, TOP_K_KEYS)
    out = []
    for i, layer in enumerate(layers):
        pre = f"{path}.{i}"
        found = None
        for sub, mod in layer.named_modules():
            if "shared" in sub:
                continue
            E = 0
            if isinstance(mod, nn.ModuleList) and len(mod) > 1 and _same_shapes(mod):
                E = len(mod)  # a list of identical expert MLPs (older / custom-code layouts)
            elif any(p.ndim == 3 for p in mod.parameters(recurse=False)):
                E = _n_experts(mod)
            if E < 2 or sub == "":
                continue
            parent_path, _, ename = sub.rpartition(".")
            parent = _get(layer, parent_path) if parent_path else layer
            rname = _router_for(parent, ename, E)
            if rname is not None:
                found = (parent_path, parent, ename, rname, E)
                break
        if found is None:
            continue
        parent_path, parent, ename, rname, E = found
        ppre = f"{pre}.{parent_path}" if parent_path else pre
        router = getattr(parent, rname)
        shared, gate = [], None
        # Shared experts sit in the sparse block (Qwen2-MoE, DeepSeek) or beside it (Granite).
        for owner, opre in ((parent, ppre), (layer, pre)) if parent is not layer else ((layer, pre),):
            for n, child in owner.named_children():
                if "shared" not in n or f"{opre}.{n}" in shared:
                    continue
                if isinstance(child, nn.Linear) and child.out_features == 1:
                    gate = f"{opre}.{n}"
                else:
                    shared.append(f"{opre}.{n}")
        n_shared = _config_int(model.config, N_SHARED_KEYS, default=len(shared)) if shared else 0
        top_k = int(getattr(router, "top_k", None) or k_cfg or 0)
        if top_k <= 0:
            raise ValueError(f"layer {i}: router found but top-k unknown (config has none of {TOP_K_KEYS})")
        out.append(MoeLayer(name=str(i), index=i, router=f"{ppre}.{rname}", experts=f"{ppre}.{ename}",
                            n_experts=E, top_k=top_k, shared=tuple(shared), shared_gate=gate,
                            n_shared=n_shared))
    return out


def _check_router_outputs(model: nn.Module, found: list[MoeLayer]) -> list[MoeLayer]:
    """One tiny forward with temporary hooks: what does each router return? Only two forms are
    read without a table entry — the (logits, weights, ids) tuple and bare [T, E] logits —
    anything else is refused rather than guessed at."""
    seen: dict[str, str] = {}

    def hook(name, E):
        def fn(out):
            if (isinstance(out, tuple) and len(out) >= 3 and all(torch.is_tensor(t) for t in out[:3])
                    and out[0].shape[-1] == E and not out[2].is_floating_point()):
                seen[name] = "ids"
            elif torch.is_tensor(out) and out.is_floating_point() and out.shape[-1] == E:
                seen[name] = "logits"
            else:
                seen[name] = "unknown"
        return fn

    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    with torch.no_grad(), hooks(model, {m.router: hook(m.router, m.n_experts) for m in found}):
        model(input_ids=torch.arange(4).remainder(vocab)[None].to(_device(model)))
    bad = [m.router for m in found if seen.get(m.router, "unknown") == "unknown"]
    if bad:
        raise ValueError(f"{getattr(model.config, 'model_type', '?')}: router {bad[0]} returns a form "
                         "the adapter cannot read without a family-table entry")
    return [MoeLayer(**{**m.__dict__, "output": seen[m.router]}) for m in found]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def find_moe_layers(model: nn.Module, *, use_table: bool = True) -> tuple[str, list[MoeLayer]]:
    """``(how, layers)``: how = "table:<model_type>" or "structural". ValueError if none found."""
    mt = getattr(model.config, "model_type", "?")
    family = FAMILIES.get(mt) if use_table else None
    if family is not None:
        found = from_table(model, family)
        if found:
            return f"table:{mt}", found
    found = find_structural(model)
    if not found:
        raise ValueError(f"{type(model).__name__} ({mt}) has no MoE layer: no router [E, D] beside an "
                         f"experts module was found in any decoder layer")
    return "structural", _check_router_outputs(model, found)
