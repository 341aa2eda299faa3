"""Expert specialization from token-level routing (the ``token_routing`` group). numpy only.

Per (step, layer, expert), from the probe set's per-token top-k picks:

- ``vocabulary``: OLMoE's vocabulary (token) specialization, as ``do_token_analysis_layers_experts``
  in allenai/OLMoE ``scripts/run_moe_analysis.py`` computes it (``normalize=False``): for each text
  id x, all k picks of all its occurrences are pooled; its most frequent expert e*(x) (ties: the
  one picked first in token order, as ``Counter`` + a stable sort give) takes
  ``p(x) = count(x, e*) / occurrences(x)``; an expert's value is the mean of ``p(x)`` over the ids
  whose e* it is (NaN when it is no id's e*).
- ``domain_share`` (per topic): OLMoE's domain specialization, as
  ``scripts/plot_routing_analysis_v2.ipynb`` computes its "Proportion": of a topic's top-k
  assignments (its text tokens), the share that went to expert e (uniform = 1/E).
  ``domain`` condenses it per expert: ``max_D share(D, e) / Σ_D share(D, e)``, the part of the
  expert's size-normalised topic traffic that comes from its top topic (1/D even, 1 = one topic).
- ``class_<m>`` (m = vit, vae): normalised mutual information between "e is among the token's
  picks" and the digit class, over the digit tokens of kind m (arithmetic normalisation, as
  sklearn's ``normalized_mutual_info_score``); NaN when e takes none of them.
- ``position_<m>``: the same NMI with the token's patch position in its image.
- ``saturation``: OLMoE's router saturation (``do_ckpt_analysis``, top-k) against the **last**
  snapshot, per expert: of the tokens that pick e at this step, the share that also pick e at
  the last step; ``layer_saturation`` is OLMoE's per-layer value, mean |S_t ∩ S_last| / k.

Legend: S snapshot steps, L layers, N probe tokens, K top-k, E experts, D topics, C classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from moe_probe import metrics

__all__ = ["TokenRouting", "vocabulary_specialization", "domain_share", "choice_nmi",
           "expert_saturation", "specialization", "picks"]

ATTR = "token_routing"
"""Root attrs key of the group's legend (written by ``moe_probe.trace.tokens``)."""
IMAGE_KINDS = ("vit", "vae")


@dataclass(frozen=True, kw_only=True)
class TokenRouting:
    """A run's ``token_routing`` rows in memory."""

    steps: np.ndarray
    """(S,) snapshot steps."""
    layers: list[str]
    """Layer labels."""
    n_experts: int
    """E (the store's expert dim)."""
    token_id: np.ndarray
    """(N,) text id, -1 at image tokens."""
    kind: np.ndarray
    """(N,) index into ``modalities``."""
    label: np.ndarray
    """(N,) index into ``label_names``, -1 = none."""
    patch: np.ndarray
    """(N,) patch index in its image, -1 at text tokens."""
    image: np.ndarray
    """(N,) sklearn digits index, -1 = none."""
    topk_ids: np.ndarray
    """(S, L, N, K) picks."""
    topk_gates: np.ndarray
    """(S, L, N, K) gate weights (float32 here; NaN where not recorded)."""
    modalities: list[str]
    """Kind names."""
    label_sets: dict[str, list[str]]
    """Label set -> names, in ``label`` order (``digit``, ``topic`` for moe_probe's runs)."""
    vocab: dict[str, str]
    """Text id (string) -> word."""
    patch_grid: tuple[int, int]
    """Patches per image side."""
    groups: dict[str, dict[str, list[int]]]
    """Layer -> group name -> expert ids (root attrs ``model.groups``)."""

    @property
    def label_names(self) -> list[str]:
        return [n for names in self.label_sets.values() for n in names]

    def label_range(self, name: str) -> range:
        """Indices of label set ``name`` in ``label`` (empty if the run has none)."""
        start = 0
        for k, names in self.label_sets.items():
            if k == name:
                return range(start, start + len(names))
            start += len(names)
        return range(0)

    def kind_mask(self, name: str) -> np.ndarray:
        return self.kind == (self.modalities.index(name) if name in self.modalities else -99)

    @classmethod
    def from_store(cls, store) -> "TokenRouting":
        """From a ``RunStore`` (``moe_probe.open_run``); a run without the group raises
        ``NotMeasured``."""
        from moe_probe.store.schema import NotMeasured

        if "token_routing" not in store.groups:
            raise NotMeasured(f"token-level routing: not measured in {store.path}")
        return cls.from_dataset(store.dataset("token_routing"), store.attrs)

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, attrs: dict) -> "TokenRouting":
        """From the group's Dataset and the store's root attrs."""
        legend = attrs.get(ATTR, {})
        model = attrs.get("model", {})
        first = {v: ds[v].isel(step=0).values if ds.sizes["step"] else
                 np.zeros(ds.sizes["token"], dtype=ds[v].dtype)
                 for v in ("token_id", "kind", "label", "patch", "image")}
        ids = ds.topk_ids.values.astype(np.int64)
        return cls(steps=ds.step.values.astype(np.int64), layers=[str(x) for x in ds.layer.values],
                   n_experts=int(model.get("experts") or (ids.max() + 1 if ids.size else 0)),
                   **{k: v.astype(np.int64) for k, v in first.items()},
                   topk_ids=ids, topk_gates=ds.topk_gates.values.astype(np.float32)
                   if "topk_gates" in ds else np.full(ids.shape, np.nan, np.float32),
                   modalities=list(attrs.get("modalities", [])),
                   label_sets={k: list(v) for k, v in legend.get("labels", {}).items()},
                   vocab=dict(legend.get("vocab", {})),
                   patch_grid=tuple(legend.get("patch_grid", (0, 0))),
                   groups={str(k): v for k, v in (model.get("groups") or {}).items()})


def picks(ids_NK: np.ndarray, n_experts: int) -> np.ndarray:
    """(N, E) bool: e is among token n's picks (ids outside [0, E) ignored)."""
    ids = np.asarray(ids_NK, dtype=np.int64)
    out = np.zeros((ids.shape[0], n_experts + 1), dtype=bool)
    np.put_along_axis(out, np.where((ids >= 0) & (ids < n_experts), ids, n_experts), True, axis=1)
    return out[:, :n_experts]


def vocabulary_specialization(token_id_N, ids_NK, n_experts: int) -> np.ndarray:
    """(E,) OLMoE's vocabulary specialization over the tokens with ``token_id >= 0``."""
    tid = np.asarray(token_id_N)
    ids = np.asarray(ids_NK, dtype=np.int64)[tid >= 0]
    tid = tid[tid >= 0]
    out = np.full(n_experts, np.nan)
    if tid.size == 0:
        return out
    uniq, x = np.unique(tid, return_inverse=True)
    n, k = ids.shape
    flat_x, flat_e = np.repeat(x, k), ids.reshape(-1)
    order = np.arange(n * k)  # position in token order, pick order inside a token
    count = np.zeros((len(uniq), n_experts), dtype=np.int64)
    np.add.at(count, (flat_x, flat_e), 1)
    first = np.full((len(uniq), n_experts), n * k, dtype=np.int64)
    np.minimum.at(first, (flat_x, flat_e), order)
    # most picks first, then the earliest-picked expert among equals
    top = np.argmax(count * (n * k + 1) - first, axis=1)
    occurrences = np.bincount(x, minlength=len(uniq))
    p = count[np.arange(len(uniq)), top] / occurrences
    sums = np.bincount(top, weights=p, minlength=n_experts)
    hits = np.bincount(top, minlength=n_experts)
    np.divide(sums, hits, out=out, where=hits > 0)
    return out


def domain_share(label_N, ids_NK, n_experts: int, domains: range) -> np.ndarray:
    """(D, E) OLMoE's domain proportion: share of domain D's top-k assignments routed to e
    (tokens whose label is in ``domains``); NaN rows for a domain without tokens."""
    label = np.asarray(label_N)
    out = np.full((len(domains), n_experts), np.nan)
    for d, lab in enumerate(domains):
        count = picks(np.asarray(ids_NK)[label == lab], n_experts).sum(0)
        if count.sum():
            out[d] = count / count.sum()
    return out


def _entropy(p) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def choice_nmi(ids_NK, y_N, n_experts: int) -> np.ndarray:
    """(E,) NMI between "e is picked" and ``y`` over the given tokens (arithmetic mean of the two
    entropies; 1 when both are constant, as sklearn); NaN for an expert picked by none of them."""
    y = np.asarray(y_N)
    out = np.full(n_experts, np.nan)
    if y.size == 0:
        return out
    chosen = picks(ids_NK, n_experts)
    _, yi = np.unique(y, return_inverse=True)
    py = np.bincount(yi) / y.size
    hy = _entropy(py)
    for e in np.flatnonzero(chosen.any(0)):
        joint = np.zeros((2, len(py)))
        np.add.at(joint, (chosen[:, e].astype(np.int64), yi), 1.0)
        joint /= y.size
        px = joint.sum(1)
        hx = _entropy(px)
        if hx == 0 and hy == 0:
            out[e] = 1.0
            continue
        nz = joint > 0
        mi = float((joint[nz] * np.log(joint[nz] / np.outer(px, py)[nz])).sum())
        out[e] = max(mi, 0.0) / ((hx + hy) / 2)
    return out


def expert_saturation(ids_NK, last_NK, n_experts: int) -> np.ndarray:
    """(E,) of the tokens picking e, the share that pick e in ``last_NK`` too (same tokens)."""
    now, last = picks(ids_NK, n_experts), picks(last_NK, n_experts)
    hits, total = (now & last).sum(0), now.sum(0)
    out = np.full(n_experts, np.nan)
    np.divide(hits, total, out=out, where=total > 0)
    return out


def specialization(tr: TokenRouting) -> xr.Dataset:
    """Every metric of the module docstring: (step, layer, expert) arrays, ``domain_share``
    (step, layer, topic, expert), ``layer_saturation`` (step, layer), and ``load`` (step, layer,
    modality, expert): the probe tokens of each kind that pick e."""
    S, L, E = len(tr.steps), len(tr.layers), tr.n_experts
    topics = tr.label_range("topic")
    digits = tr.label_range("digit")
    text_topic = tr.kind_mask("text") & np.isin(tr.label, list(topics))
    per_expert = ["vocabulary", "domain", "saturation",
                  *(f"{m}_{k}" for m in ("class", "position") for k in IMAGE_KINDS)]
    out = {v: np.full((S, L, E), np.nan) for v in per_expert}
    share = np.full((S, L, len(topics), E), np.nan)
    layer_sat = np.full((S, L), np.nan)
    load = np.zeros((S, L, len(tr.modalities), E), dtype=np.int64)
    for s in range(S):
        for li in range(L):
            ids = tr.topk_ids[s, li]
            last = tr.topk_ids[S - 1, li]
            out["vocabulary"][s, li] = vocabulary_specialization(
                np.where(tr.kind_mask("text"), tr.token_id, -1), ids, E)
            sh = domain_share(np.where(text_topic, tr.label, -1), ids, E, topics)
            share[s, li] = sh
            seen = sh[~np.isnan(sh).any(1)]  # topics with tokens
            if len(seen):
                total = seen.sum(0)
                np.divide(seen.max(0), total, out=out["domain"][s, li], where=total > 0)
            out["saturation"][s, li] = expert_saturation(ids, last, E)
            layer_sat[s, li] = metrics.saturation(last, ids)
            for k in IMAGE_KINDS:
                sel = tr.kind_mask(k) & np.isin(tr.label, list(digits))
                out[f"class_{k}"][s, li] = choice_nmi(ids[sel], tr.label[sel], E)
                out[f"position_{k}"][s, li] = choice_nmi(ids[sel], tr.patch[sel], E)
            chosen = picks(ids, E)
            for m in range(len(tr.modalities)):
                load[s, li, m] = chosen[tr.kind == m].sum(0)
    steps, layers, experts = tr.steps, tr.layers, [str(e) for e in range(E)]
    dims = ("step", "layer", "expert")
    data = {v: (dims, a) for v, a in out.items()}
    data["domain_share"] = (("step", "layer", "topic", "expert"), share)
    data["layer_saturation"] = (("step", "layer"), layer_sat)
    data["load"] = (("step", "layer", "modality", "expert"), load)
    return xr.Dataset(data, coords={"step": steps, "layer": layers, "expert": experts,
                                    "topic": [tr.label_names[i] for i in topics],
                                    "modality": tr.modalities})


def expert_counts(tr: TokenRouting, s: int, li: int, e: int) -> dict[str, np.ndarray]:
    """What expert ``e`` of layer ``li`` takes at row ``s`` (counts of probe tokens picking it):
    ``kinds`` (M,); ``labels`` (M, labels) by kind; ``words`` / ``word_counts`` (text ids, most
    taken first); ``patches`` (M, patches per image); ``images`` / ``image_kinds`` /
    ``image_counts`` (digits-dataset index and kind of each image with a patch on e, most first)."""
    chosen = picks(tr.topk_ids[s, li], tr.n_experts)[:, e]
    M, n_labels = len(tr.modalities), len(tr.label_names)
    n_patch = int(np.prod(tr.patch_grid)) or int(tr.patch.max() + 1 if tr.patch.size else 0)
    labels = np.zeros((M, n_labels), dtype=np.int64)
    patches = np.zeros((M, max(n_patch, 0)), dtype=np.int64)
    for m in range(M):
        on = chosen & (tr.kind == m)
        labels[m] = np.bincount(tr.label[on & (tr.label >= 0)], minlength=n_labels)[:n_labels]
        if n_patch:
            patches[m] = np.bincount(tr.patch[on & (tr.patch >= 0)], minlength=n_patch)[:n_patch]
    words, wc = np.unique(tr.token_id[chosen & (tr.token_id >= 0)], return_counts=True)
    img_on = chosen & (tr.image >= 0)
    pairs, ic = np.unique(np.stack([tr.image[img_on], tr.kind[img_on]], 1), axis=0,
                          return_counts=True)
    pairs = pairs.reshape(-1, 2)
    wo, io = np.argsort(-wc, kind="stable"), np.argsort(-ic, kind="stable")
    return {"kinds": np.bincount(tr.kind[chosen], minlength=M)[:M], "labels": labels,
            "words": words[wo], "word_counts": wc[wo], "patches": patches,
            "images": pairs[io, 0], "image_kinds": pairs[io, 1], "image_counts": ic[io]}
