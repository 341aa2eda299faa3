"""Token-level routing of the fixed probe set at snapshot steps: the ``token_routing`` group.

Per routed token of the probe batch: its text id (-1 at an image token), its kind (modality),
its sample's label (the digit class of a digit sample, the pydoc topic of an LM sample), its patch
position and digits-dataset image (image tokens), and per layer the top-k expert ids and gate
weights as the router chose them (before capacity drops). Megatron-Core's router replay, vLLM's
routed-experts replay and SGLang's per-token recorder keep the same per-token ids; the
specialization metrics on it are in :mod:`moe_probe.specialization` (torch-free).

The token columns are fixed by the probe set; :class:`ProbeTokens` holds them once (store layout,
root attrs) and turns each snapshot's captured top-k into a row.

Legend: B batch, S sequence, T routed rows a hook saw, N probe tokens (the valid ones), K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe_probe.model.hooks import hooks
from moe_probe.modalities import TEXT
from moe_probe.trace.capture import token_rows

ATTR = "token_routing"
"""Root attrs key of the group's legend: label sets, vocabulary of the probe ids, patch grid."""
DIGIT_LABELS: tuple[str, ...] = tuple(str(c) for c in range(10))


@dataclass(frozen=True, kw_only=True)
class ProbeTokens:
    """The fixed columns of the probe set's routed tokens (the same at every snapshot)."""

    token_id: np.ndarray
    """(N,) text id, -1 at image tokens."""
    kind: np.ndarray
    """(N,) index into the run's modality names."""
    label: np.ndarray
    """(N,) index into the concatenated ``labels`` sets, -1 = no label."""
    patch: np.ndarray
    """(N,) patch index inside its image (row-major over ``patch_grid``), -1 at text tokens."""
    image: np.ndarray
    """(N,) sklearn ``load_digits`` index of the token's image, -1 when it has none."""
    labels: dict[str, list[str]]
    """Label set name -> names, in the order ``label`` indexes them (``digit`` then ``topic``)."""
    vocab: dict[str, str]
    """Text id (as a string) -> word, for the ids in the probe set (the run's tokenizer)."""
    patch_grid: tuple[int, int] = (0, 0)
    """Patches per image side (rows, cols); (0, 0) when the set has no images."""
    patch_size: int = 0
    """Pixels per patch side."""

    @property
    def n(self) -> int:
        return int(self.token_id.shape[0])

    def attrs(self) -> dict:
        """The root attrs entry (under :data:`ATTR`)."""
        return {"labels": self.labels, "vocab": self.vocab, "patch_grid": list(self.patch_grid),
                "patch_size": self.patch_size, "images": "sklearn.datasets.load_digits"}

    def coords(self, layers: list[str], top_k: int) -> dict[str, list[str]]:
        return {"layer": [str(x) for x in layers], "token": [str(i) for i in range(self.n)],
                "k": [str(i) for i in range(top_k)]}

    def row(self, topk_ids: list, topk_gates: list | None = None) -> dict[str, np.ndarray]:
        """The group's row from each layer's captured (N, K) ids and gates (the valid rows);
        without gates the row leaves the optional ``topk_gates`` out (NaN)."""
        ids = np.stack([np.asarray(_host(t), dtype=np.int16) for t in topk_ids])
        assert ids.shape[1] == self.n, (ids.shape, self.n)
        out = {"token_id": self.token_id, "kind": self.kind, "label": self.label,
               "patch": self.patch, "image": self.image, "topk_ids": ids}
        if topk_gates is not None:
            out["topk_gates"] = np.stack([np.asarray(_host(g), dtype=np.float16) for g in topk_gates])
        return out


def _host(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if torch.is_tensor(t) else np.asarray(t)


def valid_rows(batch, captured_TK: torch.Tensor, n_valid: int | None = None) -> torch.Tensor:
    """The rows of a hook's (T, K) capture that are valid probe tokens, in row-major order
    (``n_valid``: the batch's valid count, when the caller has it)."""
    n_valid = int(batch.valid_BS.sum()) if n_valid is None else n_valid
    if captured_TK.shape[0] == n_valid:  # the model routed the valid tokens only
        return captured_TK
    rows = token_rows(batch, captured_TK.shape[0])
    keep = batch.valid_BS.cpu()[rows[:, 0], rows[:, 1]]
    return captured_TK[keep.to(captured_TK.device)]


def probe_tokens(batch, *, tokenizer, topic_names, images_B, patch_size: int,
                 image_size: int = 8) -> ProbeTokens:
    """The token columns of a moe_probe probe batch (``MultimodalData.probe_batch``)."""
    valid = batch.valid_BS.cpu()
    b, s = valid.nonzero().unbind(1)
    mod_BS = batch.modality_BS.cpu()
    is_img_BS = mod_BS != TEXT
    # image positions of a sample are contiguous and row-major over the patch grid
    patch_BS = torch.where(is_img_BS, is_img_BS.long().cumsum(1) - 1, torch.full_like(mod_BS, -1))
    tok = batch.tokens_BS.cpu()[b, s]
    text = ~is_img_BS[b, s]
    token_id = torch.where(text, tok, torch.full_like(tok, -1)).numpy()
    digit_B, topic_B = batch.labels_B.cpu(), batch.text_label_B.cpu()
    label_B = torch.where(digit_B >= 0, digit_B,
                          torch.where(topic_B >= 0, topic_B + len(DIGIT_LABELS), -1))
    images_B = torch.as_tensor(images_B).cpu()
    ids = sorted({int(i) for i in token_id if i >= 0})
    side = image_size // patch_size
    return ProbeTokens(
        token_id=token_id.astype(np.int32), kind=mod_BS[b, s].numpy().astype(np.int8),
        label=label_B[b].numpy().astype(np.int16), patch=patch_BS[b, s].numpy().astype(np.int16),
        image=torch.where(is_img_BS[b, s], images_B[b], -1).numpy().astype(np.int16),
        labels={"digit": list(DIGIT_LABELS), "topic": [str(t) for t in topic_names]},
        vocab={str(i): tokenizer.decode([i]) for i in ids},
        patch_grid=(side, side), patch_size=patch_size)


def text_probe_tokens(ids_N, kind_N, label_N, labels: dict[str, list[str]], decode) -> ProbeTokens:
    """The token columns of a text-only probe set (HF scans and watched runs): ``decode(ids)``
    is the run's tokenizer; ``label_N`` indexes the concatenated ``labels`` (-1 = none)."""
    ids = np.asarray(ids_N, dtype=np.int64).reshape(-1)
    n = ids.size
    return ProbeTokens(
        token_id=ids.astype(np.int32), kind=np.asarray(kind_N).reshape(-1).astype(np.int8),
        label=np.asarray(label_N).reshape(-1).astype(np.int16),
        patch=np.full(n, -1, np.int16), image=np.full(n, -1, np.int16),
        labels={k: [str(x) for x in v] for k, v in labels.items()},
        vocab={str(i): decode([int(i)]) for i in np.unique(ids)})


def padded_picks(records, top_k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each record's (T, K_l) ids and gates, padded to ``top_k`` columns (-1 ids, NaN gates) where
    a layer picks fewer."""
    ids, gates = [], []
    for r in records:
        pad = top_k - r.topk_ids_TK.shape[1]
        ids.append(torch.nn.functional.pad(r.topk_ids_TK.detach(), (0, pad), value=-1))
        gates.append(torch.nn.functional.pad(r.topk_weights_TK.detach().float(), (0, pad),
                                             value=float("nan")))
    return ids, gates


def data_probe_tokens(data) -> ProbeTokens:
    """:func:`probe_tokens` of a ``MultimodalData``'s probe batch."""
    return probe_tokens(data.probe_batch(), tokenizer=data.tokenizer,
                        topic_names=data.topic_names[:data.cfg.n_text_classes],
                        images_B=data.probe_images(), patch_size=data.cfg.patch_size)


class TokenProbe:
    """Token-level routing of a fixed probe batch for ``moe_probe.watch``: at a token step, one
    no-grad eval-mode forward ``model(**inputs)`` with the adapter's router hooks (the training
    forwards are never touched)."""

    def __init__(self, routers, inputs: dict, *, kind_names, kinds=None, labels=None,
                 label_names=None, decode=None):
        """``kinds``: watch's callable on the forward's arguments (None: kind 0); ``labels``: the
        sample's label per sample (B,) or token (B, S), or the name of an ``inputs`` entry
        holding them (left out of the forward), -1 = none; ``label_names``: their names;
        ``decode(ids) -> str``: the run's tokenizer (None: ``#id``). Tokens with attention mask 0
        or kind -1 are left out."""
        from moe_probe.trace.watch import token_kinds  # watch -> layout -> this module

        inputs = dict(inputs)
        if isinstance(labels, str):
            if labels not in inputs:
                raise ValueError(f"probe labels: no {labels!r} in the probe inputs ({sorted(inputs)})")
            labels = inputs.pop(labels)
        self.routers, self.inputs = routers, inputs
        shape_BS, _ = routers.tokens((), inputs)
        kind_T = token_kinds(kinds(**inputs), shape_BS, kind_names) if kinds is not None \
            else torch.zeros(shape_BS[0] * shape_BS[1], dtype=torch.long)
        names = [str(x) for x in (label_names or ())]
        label_T = token_kinds(labels, shape_BS, names, what="probe labels") \
            if labels is not None else torch.full_like(kind_T, -1)
        mask = inputs.get("attention_mask")
        keep = kind_T.cpu() >= 0
        if mask is not None:
            keep &= torch.as_tensor(mask).reshape(-1).cpu().bool()
        self.keep = keep
        ids = torch.as_tensor(inputs["input_ids"]).reshape(-1).cpu()[keep]
        self.top_k = max(i.top_k for i in routers.infos)
        self.tokens = text_probe_tokens(
            ids, kind_T.cpu()[keep], label_T.cpu()[keep], {"label": names},
            decode or (lambda ids: " ".join(f"#{int(i)}" for i in ids)))

    def row(self, model) -> dict[str, np.ndarray]:
        records: dict[int, object] = {}
        fns = self.routers.hook_fns(
            lambda li, out: records.__setitem__(li, self.routers.record(li, out)))
        p = next(model.parameters(), None)
        inputs = {k: v.to(p.device) if torch.is_tensor(v) and p is not None else v
                  for k, v in self.inputs.items()}
        was = model.training
        try:
            model.eval()
            with hooks(model, fns), torch.no_grad():
                model(**inputs)
        finally:
            model.train(was)
        ids, gates = padded_picks([records[i] for i in range(len(records))], self.top_k)
        keep = self.keep
        return self.tokens.row([t[keep.to(t.device)] for t in ids],
                               [g[keep.to(g.device)] for g in gates])
