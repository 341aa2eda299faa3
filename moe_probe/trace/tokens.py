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
