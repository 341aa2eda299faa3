"""A Hugging Face MoE model's routers as :class:`moe_probe.trace.watch.Watch` sees them.

The routers are the discovered module paths (``find_moe_layers``: family table, else structure);
each router call becomes a :class:`RouterRecord` the way ``scan`` reads it (``router_record``).
HF routers are dropless and see every position of the batch (T = B·S, padding included: label
padding -1 to leave it out). Gradient-conflict components are ``hf.grad.param_components``'.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_probe.hf.capture import layer_routing, router_record
from moe_probe.hf.discover import MoeLayer, decoder_layers, find_moe_layers
from moe_probe.hf.grad import param_components
from moe_probe.model.hooks import RouterRecord
from moe_probe.model.params import n_params
from moe_probe.trace.grad import ALL, IO, GradConflictTracer


def model_attrs(model, layers: list[MoeLayer], how: str) -> dict:
    """Root ``model`` attrs of a store of an HF model (scan and watch)."""
    cfg = model.config
    _, dec = decoder_layers(model)
    return {
        "arch": cfg.model_type,
        "hf_class": type(model).__name__,
        "discovery": how,
        "layers": [x.name for x in layers],
        "n_decoder_layers": len(dec),
        "experts": max(x.n_experts for x in layers),
        "top_k": layers[0].top_k,
        "capacity_factor": None,
        "groups": {x.name: {"all": list(range(x.n_experts))} for x in layers},
        "modality_group": {x.name: {} for x in layers},
        "shared_experts": layers[0].n_shared,
        "shared_gate": any(x.shared_gate for x in layers),
        "routers": {x.name: x.router for x in layers},
        "n_params": n_params(model),
        "hf_config": cfg.to_json_string(use_diff=True),
    }


class HFRouters:
    kind_names = None
    """No kinds of its own: unlabelled tokens are the run's first kind."""

    def __init__(self, model: torch.nn.Module, *, use_table: bool = True):
        if not hasattr(model, "config"):
            raise ValueError(f"{type(model).__name__} has no MoE layer moe_probe can find: watch takes "
                             "moe_probe's model or a Hugging Face MoE model")
        self.model = model
        self.how, self.moe = find_moe_layers(model, use_table=use_table)
        self.layers = [x.name for x in self.moe]
        self.infos = [layer_routing(x) for x in self.moe]

    def hook_fns(self, fn: Callable[[int, object], None]) -> dict:
        return {x.router: (lambda out, li=li: fn(li, out)) for li, x in enumerate(self.moe)}

    def record(self, li: int, out) -> RouterRecord:
        return router_record(self.moe[li], out, None)

    def tokens(self, args, kwargs) -> tuple[tuple[int, int], None]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("inputs_embeds") is not None:
            ids = kwargs["inputs_embeds"][..., 0]
        if ids is None or ids.ndim != 2:
            raise ValueError("kinds: this forward has no input_ids (B, S) or inputs_embeds to label")
        return tuple(ids.shape), None

    def grad_tracer(self, distributed: bool) -> GradConflictTracer:
        comps = {name: (self.layers[li] if li >= 0 else IO, comp)
                 for name, (li, comp) in param_components(self.model, self.moe).items()}
        return GradConflictTracer(self.model, distributed=distributed, components=comps,
                                  layers=[*self.layers, ALL])

    def attrs(self) -> dict:
        return model_attrs(self.model, self.moe, self.how)
