"""The store layout of a traced model: ``coords`` and root ``model`` attrs for StoreWriter.create.

Built from the hook contract only (``moe_layers``, ``routing_info``) plus the model's config
when it has one, so the trainer creates the store in one call:

    attrs, coords = store_layout(model, eval_metrics=Evaluator.metric_names)
    Run(run_dir).create(store_attrs={"run": {...}, **attrs}, store_coords=coords)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from moe_probe.model.params import n_params
from moe_probe.modalities import ISOLATED_METRICS, MODALITIES
from moe_probe.store.schema import default_coords
from moe_probe.trace.probes import PROBE_TASKS
from moe_probe.trace.tokens import ATTR as TOKEN_ATTR, ProbeTokens


def model_attrs(model) -> dict:
    """Root ``model`` attrs: arch, layers, experts, top_k, capacity_factor, groups, shared experts."""
    layers = model.moe_layers()
    infos = [m.routing_info() for _, m in layers]
    cfg = getattr(model, "cfg", None)
    out = {
        "arch": getattr(cfg, "arch", type(model).__name__),
        "layers": [str(n) for n, _ in layers],
        "experts": max(i.n_experts for i in infos),
        "top_k": infos[0].top_k,
        "capacity_factor": infos[0].capacity_factor,
        "groups": {str(n): {g: list(ids) for g, ids in i.groups.items()} for (n, _), i in zip(layers, infos)},
        "modality_group": {str(n): dict(i.modality_group) for (n, _), i in zip(layers, infos)},
        "shared_experts": infos[0].n_shared,
        "n_params": n_params(model),
    }
    if cfg is not None and dataclasses.is_dataclass(cfg):
        out["config"] = dataclasses.asdict(cfg)
    return out


def store_layout(model, *, eval_metrics: list[str] | tuple[str, ...],
                 isolated_metrics: tuple[str, ...] = ISOLATED_METRICS,
                 probe_tasks: tuple[str, ...] = PROBE_TASKS,
                 modalities: Sequence[str] = MODALITIES,
                 probe_tokens: ProbeTokens | None = None) -> tuple[dict, dict]:
    """``({"model": ...}, coords)``; the ``probe`` group only when some layer has shared experts.
    ``modalities`` labels the routing ``modality`` dim (the run's names; the counter's width).
    ``probe_tokens``: adds the ``token_routing`` group and its root attrs legend."""
    layers = model.moe_layers()
    infos = [m.routing_info() for _, m in layers]
    has_shared = any(i.n_shared > 0 for i in infos)
    coords = default_coords(
        layers=[str(n) for n, _ in layers],
        n_experts=max(i.n_experts for i in infos),
        eval_metrics=list(eval_metrics),
        isolated_metrics=list(isolated_metrics) if has_shared else None,
        tasks=list(probe_tasks),
    )
    coords["routing"]["modality"] = list(modalities)
    attrs = {"model": model_attrs(model)}
    if probe_tokens is not None:
        coords["token_routing"] = probe_tokens.coords([str(n) for n, _ in layers], infos[0].top_k)
        attrs[TOKEN_ATTR] = probe_tokens.attrs()
    return attrs, coords


def writer_labels(writer, group: str, dim: str) -> list[str] | None:
    """The labels a store was created with for ``group``'s ``dim`` (None if the group is absent)."""
    if group not in writer.groups:
        return None
    return [str(x) for x in writer.labels(group, dim)]
