"""Hook points and the one way to attach hooks (TransformerLens / nnsight style).

A :class:`HookPoint` is an identity module. The model calls it with a value at a named
place (its module path is the hook name, e.g. ``layers.3.ffn.hook_router``); tracers read the
value through :func:`hooks`. The model knows nothing of tracers.

:func:`hooks` is the only place a forward hook is registered — for moe_probe's hook points and
for the router / expert modules of a Hugging Face model alike (there the hook names are the
discovered module paths). Everything that reads activations (routing counter, captures, the
Hugging Face adapter, the base-routing count choosing Symbiotic groups) goes through it, so
removal is written once. :func:`before_forward` is its one counterpart for a forward's inputs
(``moe_probe.watch`` reads the token kinds of a batch there).

Legend: T tokens (= B·S, flattened), E experts of the layer (all groups), K top-k, D model dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

HookFn = Callable[[object], object]
"""Called with a module's forward output (a hook point's value); a non-None return replaces it."""


class HookPoint(nn.Module):
    """Identity; tracers attach to it with :func:`hooks`."""

    def forward(self, x):
        return x


@dataclass
class RouterRecord:
    """What one router call decided, for every token that entered the layer.

    Passed (as the single argument) to a layer's ``hook_router`` once per forward.
    Ids are layer-global expert indices in ``[0, E)`` even when a token routes inside a
    group (symbiotic, mot): group membership comes from :class:`LayerRouting`.
    """

    logits_TE: torch.Tensor
    """Router logits over all E experts of the layer, ``-inf`` outside the token's group."""
    topk_ids_TK: torch.Tensor
    """Top-k picks (int64), before capacity drops."""
    topk_weights_TK: torch.Tensor
    """Gate weights of the picks (as used to mix expert outputs)."""
    kept_TK: torch.Tensor | None
    """True where the pick was processed; ``None`` for a dropless layer (kept is then nominal)."""
    modality_T: torch.Tensor
    """Modality id of each token (int64): index into the run's modality names (``MODALITIES``
    for moe_probe's models, the input's kinds for a Hugging Face scan)."""


@dataclass(frozen=True, kw_only=True)
class LayerRouting:
    """Static routing layout of one MoE layer; tracers size their counters from it."""

    n_experts: int
    """E: routed experts of the layer, all groups together (mot: und tower then gen tower)."""
    top_k: int
    """K: picks per token inside its group."""
    capacity_factor: float | None
    """C for token dropping; ``None`` = dropless (then the tracer's nominal C applies)."""
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Group name -> expert ids. A plain MoE has one group, ``{"all": (0..E-1)}``."""
    modality_group: dict[str, str] = field(default_factory=dict)
    """Modality name -> the group its tokens route into."""
    n_shared: int = 0
    """Always-on shared experts (not counted in E)."""


@contextmanager
def hooks(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[dict[str, nn.Module]]:
    """``with hooks(model, {"layers.0.ffn.hook_router": fn, ...}) as mods:`` — forward hooks at
    the named modules (module paths from ``model``), yielding name -> module.

    ``fn(output)`` sees the module's output (a hook point's value); returning something other
    than None replaces the output. Every name is resolved before any hook is added, so a bad
    name raises ``ValueError`` with nothing attached; the hooks are removed on exit, also when
    the body raises.
    """
    mods = {}
    for name in fns:
        try:
            mods[name] = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"no module {name!r} in {type(model).__name__} to hook "
                             f"(hook names are module paths, e.g. 'layers.0.ffn.hook_router')") from None
    handles = []
    try:
        for name, fn in fns.items():
            handles.append(mods[name].register_forward_hook(lambda _m, _args, out, fn=fn: fn(out)))
        yield mods
    finally:
        for h in handles:
            h.remove()


@contextmanager
def before_forward(module: nn.Module, fn: Callable[[tuple, dict], None]) -> Iterator[None]:
    """``fn(args, kwargs)`` before every forward of ``module`` (it reads the inputs, e.g. a batch's
    token kinds; it cannot change them); removed on exit, also when the body raises."""
    handle = module.register_forward_pre_hook(lambda _m, args, kwargs: fn(args, kwargs), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def layer_hooks(model: nn.Module, point: str, fn: Callable[[int, object], object]) -> dict[str, HookFn]:
    """``{path of <point> in MoE layer li: value -> fn(li, value)}`` for :func:`hooks`, over
    ``model.moe_layers()`` (layers without ``point``, e.g. ``hook_shared``, are skipped)."""
    path_of = {id(m): name for name, m in model.named_modules()}
    out = {}
    for li, (_, layer) in enumerate(model.moe_layers()):
        if isinstance(getattr(layer, point, None), nn.Module):
            out[f"{path_of[id(layer)]}.{point}".lstrip(".")] = lambda v, li=li: fn(li, v)
    return out
