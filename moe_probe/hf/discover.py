"""Find the MoE layers of a Hugging Face causal LM: from the family table, else by structure.

Structural discovery (families missing from ``families.FAMILIES``) looks, inside each decoder
layer, for an *experts* module — a ModuleList of E identically shaped modules, or direct 3-D
parameters with leading dim E and a dim of size D (``gate_up_proj [E, 2F, D]``; JetMoE's
``input_linear``) — and, beside it, the nearest *router* weight [E, D] (or [E + shared, D], a
router that also scores its shared experts): a direct parameter of a sibling, else of a module
the sibling wraps (HunYuan's ``gate.wg``, JetMoE's ``router.layer``). Modules named ``*shared*``
are shared experts (a 1-output linear among them is the shared-expert gate). One probe forward
with temporary hooks (``moe_probe.model.hooks.hooks``) then checks what the gate returns:
- a ``(logits, weights, ids, ...)`` tuple (transformers 5.x): ids recorded as the model chose
  them, so bias-corrected (DeepSeek-V3's ``e_score_correction_bias``), group-limited or hashed
  selections are exact, and k is read from the ids;
- bare logits, from the gate or else from the Linear it wraps: picks = softmax top-k, k from
  the config — refused when a selection-correction bias [E] sits beside the router.
Anything else is refused with one line naming what was found.

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
            top_k=int(getattr(router, "top_k", None) or getattr(block, "top_k", None)
                      or _config_int(model.config, TOP_K_KEYS)),
            shared=shared, shared_gate=f"{pre}.{gate}" if gate else None, n_shared=n_shared,
            output=family.output))
    return out


def _same_shapes(mods: nn.ModuleList) -> bool:
    sig = [tuple(tuple(p.shape) for p in m.parameters()) for m in mods]
    return bool(sig[0]) and all(x == sig[0] for x in sig)


def _experts_size(mod: nn.Module, D: int | None) -> tuple[int, str]:
    """``(E, what)`` if ``mod`` looks like routed experts, else ``(0, "")``: a ModuleList of E ≥ 2
    identically shaped modules, or direct 3-D parameters sharing a leading dim E, each with a dim
    of size D (a convolution's [C, 1, k] kernel is not an expert bank)."""
    if isinstance(mod, nn.ModuleList):
        if len(mod) > 1 and _same_shapes(mod):
            return len(mod), f"an expert list {{path}} of {len(mod)} × {type(mod[0]).__name__}"
        return 0, ""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return 0, ""
    p3 = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.ndim == 3]
    if not p3 or len({p.shape[0] for _, p in p3}) != 1 or p3[0][1].shape[0] < 2:
        return 0, ""
    if D is not None and not all(D in p.shape[1:] for _, p in p3):
        return 0, ""
    n, p = p3[0]
    return int(p.shape[0]), f"a 3-D expert parameter {{path}}.{n} {list(p.shape)}"


def _own_weight(mod: nn.Module) -> torch.Tensor | None:
    w = mod._parameters.get("weight")
    return w if w is not None and w.ndim == 2 else None


def _router_for(parent: nn.Module, experts_name: str, rows: set[int], D: int | None):
    """``(outer, inner)``: the child of ``parent`` holding a router weight [E, D] (E + shared rows
    also accepted: a router that scores its shared experts too), and the module owning that
    weight — the child itself, or a Linear it wraps. Direct children are tried before their
    descendants, so the nearest [E, D] weight wins."""
    children = [(n, c) for n, c in parent.named_children() if n != experts_name and "shared" not in n]
    for depth in (0, 1):
        for name, child in children:
            subs = [("", child)] if depth == 0 else list(child.named_modules())[1:]
            for sub, m in subs:
                w = _own_weight(m)
                if w is not None and w.shape[0] in rows and (D is None or w.shape[1] == D):
                    return name, f"{name}.{sub}" if sub else name
    return None


def _bias_beside(parent: nn.Module, ename: str, inner: str, E: int) -> list[str]:
    """[E] tensors named ``*bias*`` in the sparse block outside the experts, shared experts and
    the router Linear's own bias: a selection-correction bias (DeepSeek-V3's
    ``e_score_correction_bias``, AFMoE's ``expert_bias``) that bare logits do not show."""
    out = []
    for name, t in [*parent.named_parameters(), *parent.named_buffers()]:
        if (t.ndim == 1 and t.shape[0] == E and "bias" in name.rpartition(".")[2]
                and name != f"{inner}.bias" and not name.startswith(f"{ename}.") and "shared" not in name):
            out.append(name)
    return out


@dataclass(frozen=True)
class _Candidate:
    """A structurally found layer before its router output is checked."""

    layer: MoeLayer
    """``router`` is the outer module (the gate wrapper, whose output may carry the picks)."""
    inner: str
    """Path of the module owning the [E, D] weight (== ``layer.router`` when the gate is a Linear)."""
    biases: tuple[str, ...]
    """Selection-correction biases beside the router (paths from the model root)."""


def find_structural(model: nn.Module) -> list[_Candidate]:
    """MoE layers found by shape alone (no module names assumed except ``*shared*``). ValueError
    naming what was found when no layer has both experts and a router."""
    path, layers = decoder_layers(model)
    cfg = model.config
    D = _config_int(cfg, ("hidden_size", "d_model"))
    n_shared_cfg = _config_int(cfg, N_SHARED_KEYS, default=0)
    k_cfg = _config_int(cfg, TOP_K_KEYS, default=0)
    out, unrouted = [], []
    for i, layer in enumerate(layers):
        pre = f"{path}.{i}"
        found = None
        for sub, mod in layer.named_modules():
            if "shared" in sub or sub == "":
                continue
            E, what = _experts_size(mod, D)
            if E < 2:
                continue
            parent_path, _, ename = sub.rpartition(".")
            parent = _get(layer, parent_path) if parent_path else layer
            hit = _router_for(parent, ename, {E, E + n_shared_cfg}, D)
            if hit is not None:
                found = (parent_path, parent, ename, *hit, E)
                break
            unrouted.append(f"layer {i}: found {what.format(path=sub)} but no "
                            f"[{E}, {D if D else 'D'}] router weight beside it")
        if found is None:
            continue
        parent_path, parent, ename, rname, inner, E = found
        ppre = f"{pre}.{parent_path}" if parent_path else pre
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
        n_shared = _config_int(cfg, N_SHARED_KEYS, default=len(shared)) if shared else 0
        top_k = int(getattr(getattr(parent, rname), "top_k", None) or k_cfg)
        out.append(_Candidate(
            MoeLayer(name=str(i), index=i, router=f"{ppre}.{rname}", experts=f"{ppre}.{ename}",
                     n_experts=E, top_k=top_k, shared=tuple(shared), shared_gate=gate, n_shared=n_shared),
            inner=f"{ppre}.{inner}",
            biases=tuple(f"{ppre}.{b}" for b in _bias_beside(parent, ename, inner, E))))
    if not out:
        if unrouted:
            raise ValueError(unrouted[0])
        kids = ", ".join(f"{n} ({type(c).__name__})" for n, c in layers[0].named_children())
        raise ValueError(f"{type(model).__name__} ({getattr(cfg, 'model_type', '?')}) has no MoE layer: "
                         f"no experts (a list of identical modules or 3-D parameters) in any of "
                         f"{len(layers)} decoder layers at {path}; layer 0 holds {kids}")
    return out


def _form(out, E: int) -> tuple[str, int]:
    """``(form, k)`` of a router output: the (logits, weights, ids, ...) tuple (k from ids), bare
    [.., E] logits (k unknown: 0), or ``unknown``."""
    if (isinstance(out, tuple) and len(out) >= 3 and all(torch.is_tensor(t) for t in out[:3])
            and out[0].shape[-1] == E and out[0].is_floating_point() and not out[2].is_floating_point()):
        return "ids", int(out[2].shape[-1])
    if torch.is_tensor(out) and out.is_floating_point() and out.shape[-1] == E:
        return "logits", 0
    return "unknown", 0


def _describe(out) -> str:
    if torch.is_tensor(out):
        return f"a {str(out.dtype).removeprefix('torch.')} tensor {list(out.shape)}"
    if isinstance(out, tuple):
        return f"a {len(out)}-tuple of " + ", ".join(
            f"{list(t.shape)}" if torch.is_tensor(t) else type(t).__name__ for t in out)
    return type(out).__name__


def _check_router_outputs(model: nn.Module, found: list[_Candidate]) -> list[MoeLayer]:
    """One tiny forward with temporary hooks on each gate and the module owning its weight: what
    do they return? Read without a table entry: the gate's (logits, weights, ids, ...) tuple
    (picks as the model chose them, bias-corrected or group-limited included), else bare [T, E]
    logits from the gate or its Linear (picks = softmax top-k) when no selection-correction bias
    sits beside it. Anything else is refused rather than guessed at."""
    seen: dict[str, object] = {}
    paths = {p for c in found for p in (c.layer.router, c.inner)}
    save = {p: (lambda out, p=p: seen.__setitem__(p, out)) for p in paths}
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    with torch.no_grad(), hooks(model, save):
        model(input_ids=torch.arange(4).remainder(vocab)[None].to(_device(model)))
    out = []
    for c in found:
        m = c.layer
        if m.router not in seen:
            raise ValueError(f"layer {m.index}: router {m.router} found but not called by a forward")
        form, k = _form(seen[m.router], m.n_experts)
        router = m.router
        if form == "unknown" and c.inner != m.router and _form(seen.get(c.inner), m.n_experts)[0] == "logits":
            form, router = "logits", c.inner
        if form == "unknown":
            raise ValueError(f"layer {m.index}: router {m.router} returns {_describe(seen[m.router])}, "
                             "a form the adapter cannot read without a family-table entry")
        if form == "logits" and c.biases:
            raise ValueError(f"layer {m.index}: router {router} returns bare logits but a selection "
                             f"bias {c.biases[0]} [{m.n_experts}] lies beside it: picks cannot be "
                             "recomputed without a family-table entry")
        top_k = k or m.top_k
        if top_k <= 0:
            raise ValueError(f"layer {m.index}: router {router} returns bare logits and the top-k is "
                             f"unknown (config has none of {TOP_K_KEYS})")
        out.append(MoeLayer(**{**m.__dict__, "router": router, "output": form, "top_k": top_k}))
    return out


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
    return "structural", _check_router_outputs(model, find_structural(model))
