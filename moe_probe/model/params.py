"""Parameter tags: components for the gradient-conflict tracer, groups for differential LR.

Name patterns (``layers.{i}.`` prefix):
- ``attn_norm``/``ffn_norm`` -> component ``norm``, tag ``backbone``; the MoT gen tower's
  ``gen_*_norm`` -> ``norm``, ``gen_backbone``
- ``attn.*`` -> ``attn``, ``backbone``; ``gen_attn.*`` -> ``attn``, ``gen_backbone`` (the gen tower is
  a new copy in stage 2, so differential LR trains it at the new-parts rate)
- ``ffn.groups.{g}.router.weight`` -> ``router``; tag ``und_router`` (g = all/und) or ``gen_router``
- ``ffn.groups.{g}.experts.*`` -> ``experts`` (g = all) / ``und_experts`` / ``gen_experts``; tag
  ``und_experts`` (a plain MoE's experts count as understanding experts) or ``gen_experts``
- ``ffn.shared.*`` -> ``shared``, ``shared``; MoT towers' ``ffn.groups.{g}.shared.*`` -> ``shared``,
  tagged ``shared`` (und tower) / ``gen_experts`` (gen tower: only generation tokens reach it)
Outside the layers (layer ``io``, component ``norm``): vae in/out, its final norm and the timestep
embedding are tagged ``gen_io``; token/position embeddings, vit_in, LM head, final norm ``backbone``.
"""

from __future__ import annotations

GEN_IO_PREFIXES = ("vae_in.", "vae_out.", "vae_norm_out.", "t_embed.")
PARAM_TAGS = ("gen_experts", "gen_router", "und_experts", "und_router", "shared", "backbone", "gen_io",
              "gen_backbone")


def _classify(name: str) -> tuple[str, str, str]:
    """name -> (layer, component, tag)."""
    parts = name.split(".")
    if parts[0] != "layers":
        return "io", "norm", "gen_io" if name.startswith(GEN_IO_PREFIXES) else "backbone"
    layer, mod = parts[1], parts[2]
    if mod.endswith("_norm"):
        return layer, "norm", "gen_backbone" if mod.startswith("gen_") else "backbone"
    if mod in ("attn", "gen_attn"):
        return layer, "attn", "gen_backbone" if mod == "gen_attn" else "backbone"
    assert mod == "ffn", name
    if parts[3] == "shared":
        return layer, "shared", "shared"
    assert parts[3] == "groups", name
    group, kind = parts[4], parts[5]
    side = "gen" if group == "gen" else "und"
    if kind == "router":
        return layer, "router", f"{side}_router"
    if kind == "experts":
        return layer, ("experts" if group == "all" else f"{group}_experts"), f"{side}_experts"
    assert kind == "shared", name
    return layer, "shared", "shared" if side == "und" else "gen_experts"


def param_components(model) -> dict[str, tuple[str, str]]:
    return {n: _classify(n)[:2] for n, _ in model.named_parameters()}


def param_groups(model) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t: [] for t in PARAM_TAGS}
    for n, _ in model.named_parameters():
        out[_classify(n)[2]].append(n)
    return out


def n_params(model) -> int:
    """Parameters of a module, each counted once (the number in run summaries and store attrs)."""
    return sum(p.numel() for p in model.parameters())
