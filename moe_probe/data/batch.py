"""The mixed-sequence batch and the fixed layouts of its three sample kinds.

Legend: B batch, S sequence, N image tokens per image, P patch dim (patch_size²), H=W image side.

Layouts (S = seq_len, right-padded with ``<pad>``; pad positions have modality text, no loss and
``valid_BS`` False — the model keeps them out of routing, records and losses):

- LM  (kind 0): S words of a pydoc chunk; next-token loss everywhere (``lm_kind`` 1).
- MMU (kind 1): ``<bos> <img>×N this digit is <d> <eos>``; image as ViT patch tokens (modality
  vit); loss only where "is" predicts the digit word (``lm_kind`` 2).
- T2I (kind 2): ``<bos> draw a <d> <img>×N <eos>``; image as VAE patch tokens (modality vae);
  rectified flow: x_t = (1−t)·x0 + t·noise, velocity target noise − x0 (t=0 data, t=1 noise).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from moe_probe.data.tokenizer import Tokenizer
from moe_probe.modalities import TEXT, VAE, VIT

KIND_LM, KIND_MMU, KIND_T2I = 0, 1, 2
KINDS: tuple[str, ...] = ("lm", "mmu", "t2i")
LM_NONE, LM_TEXT, LM_MMU = 0, 1, 2


@dataclass
class Batch:
    """One batch of mixed sequences (all tensors; ``.to(device)`` moves them)."""

    tokens_BS: torch.Tensor
    """int64 text ids; ``<img>`` at image positions, ``<pad>`` (0) at padding."""
    modality_BS: torch.Tensor
    """int64 modality id (text 0 / vit 1 / vae 2); pads are text."""
    patches_BSP: torch.Tensor
    """float clean patch vectors in [-1, 1] at vit/vae positions, zeros elsewhere."""
    lm_targets_BS: torch.Tensor
    """int64 next-token target, -100 where there is no loss."""
    lm_kind_BS: torch.Tensor
    """int64: 0 no loss, 1 LM text, 2 MMU answer."""
    flow_t_B: torch.Tensor
    """float flow-matching time per sample (0 for non-T2I samples)."""
    noise_BSP: torch.Tensor
    """float x₁ ~ N(0, 1) at vae positions, zeros elsewhere."""
    labels_B: torch.Tensor
    """int64 digit class, -1 for LM samples."""
    kind_B: torch.Tensor
    """int64 sample kind: 0 LM, 1 MMU, 2 T2I."""
    valid_BS: torch.Tensor
    """bool, False at padding."""
    text_label_B: torch.Tensor
    """int64 text-probe class of LM samples (pydoc topic class, see MultimodalData), -1 otherwise."""

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.tokens_BS.shape[0]

    def select(self, rows) -> "Batch":
        """The sub-batch of the given rows (index tensor, list or slice)."""
        return Batch(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def images_to_patches(images_BHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H, W) -> (B, N, P), patches in row-major order, pixels row-major inside a patch."""
    B, H, W = images_BHW.shape
    p = patch_size
    x = images_BHW.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(B, (H // p) * (W // p), p * p)


def patches_to_images(patches_BNP: torch.Tensor, patch_size: int, image_size: int) -> torch.Tensor:
    """Inverse of :func:`images_to_patches`."""
    B = patches_BNP.shape[0]
    p, g = patch_size, image_size // patch_size
    x = patches_BNP.reshape(B, g, g, p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(B, image_size, image_size)


class Layout:
    """Fills batches of the three sample kinds; shared by the data sampler and the model's
    evaluation helpers (so generation and classification see exactly the training layout)."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int, patch_size: int, image_size: int = 8):
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the image size {image_size}")
        self.tok, self.S, self.p, self.image_size = tokenizer, seq_len, patch_size, image_size
        self.n_img = (image_size // patch_size) ** 2
        self.P = patch_size * patch_size
        need = self.n_img + 6
        if seq_len < need:
            raise ValueError(f"seq_len {seq_len} too short: image samples need {need} positions "
                             f"({self.n_img} image tokens + caption) with patch_size {patch_size}")
        t = tokenizer
        n = self.n_img
        # MMU: <bos> img×n this digit is <d> <eos>; the answer sits at position n+4.
        self.mmu_tokens = [t.bos] + [t.img] * n + [t.token_id(w) for w in ("this", "digit", "is")]
        self.mmu_img = slice(1, 1 + n)
        self.mmu_answer_pos = 1 + n + 3
        # T2I: <bos> draw a <d> img×n <eos>; the digit word sits at position 3.
        self.t2i_tokens = [t.bos, t.token_id("draw"), t.token_id("a"), t.unk] + [t.img] * n + [t.eos]
        self.t2i_word_pos = 3
        self.t2i_img = slice(4, 4 + n)

    def empty(self, B: int) -> Batch:
        S, P = self.S, self.P
        return Batch(
            tokens_BS=torch.full((B, S), self.tok.pad, dtype=torch.long),
            modality_BS=torch.full((B, S), TEXT, dtype=torch.long),
            patches_BSP=torch.zeros(B, S, P),
            lm_targets_BS=torch.full((B, S), -100, dtype=torch.long),
            lm_kind_BS=torch.full((B, S), LM_NONE, dtype=torch.long),
            flow_t_B=torch.zeros(B),
            noise_BSP=torch.zeros(B, S, P),
            labels_B=torch.full((B,), -1, dtype=torch.long),
            kind_B=torch.zeros(B, dtype=torch.long),
            valid_BS=torch.zeros(B, S, dtype=torch.bool),
            text_label_B=torch.full((B,), -1, dtype=torch.long),
        )

    def fill_lm(self, b: Batch, rows: torch.Tensor, windows_RS1: torch.Tensor, text_labels_R) -> None:
        """LM rows from token windows of length S+1 (input = [:S], target = [1:])."""
        if len(rows) == 0:
            return
        w = windows_RS1
        pad = self.tok.pad
        inp, tgt = w[:, :-1], w[:, 1:]
        # Short topics end in padding: no loss on pad targets, pads stay out of the model's routing.
        has_target = (inp != pad) & (tgt != pad)
        b.tokens_BS[rows] = inp
        b.lm_targets_BS[rows] = torch.where(has_target, tgt, torch.full_like(tgt, -100))
        b.lm_kind_BS[rows] = torch.where(has_target, LM_TEXT, LM_NONE)
        b.valid_BS[rows] = inp != pad
        b.kind_B[rows] = KIND_LM
        b.text_label_B[rows] = torch.as_tensor(text_labels_R, dtype=torch.long)

    def fill_mmu(self, b: Batch, rows: torch.Tensor, images_RHW: torch.Tensor, labels_R: torch.Tensor,
                 *, with_answer: bool = True) -> None:
        """MMU rows; ``with_answer=False`` stops after "is" (for classification)."""
        if len(rows) == 0:
            return
        R, L = len(rows), len(self.mmu_tokens)
        seq = torch.tensor(self.mmu_tokens, dtype=torch.long).expand(R, L)
        b.tokens_BS[rows, :L] = seq
        b.valid_BS[rows, :L] = True
        b.modality_BS[rows, self.mmu_img] = VIT
        b.patches_BSP[rows, self.mmu_img] = images_to_patches(images_RHW, self.p)
        b.kind_B[rows] = KIND_MMU
        b.labels_B[rows] = labels_R
        if with_answer:
            a = self.mmu_answer_pos
            answer_R = torch.tensor(self.tok.digit_ids, dtype=torch.long)[labels_R]
            b.tokens_BS[rows, a] = answer_R
            b.tokens_BS[rows, a + 1] = self.tok.eos
            b.valid_BS[rows, a: a + 2] = True
            b.lm_targets_BS[rows, a - 1] = answer_R
            b.lm_kind_BS[rows, a - 1] = LM_MMU

    def fill_t2i(self, b: Batch, rows: torch.Tensor, images_RHW: torch.Tensor | None,
                 labels_R: torch.Tensor, noise_RNP: torch.Tensor, t_R: torch.Tensor) -> None:
        """T2I rows; ``images_RHW=None`` leaves the clean patches zero (sampling)."""
        if len(rows) == 0:
            return
        R, L = len(rows), len(self.t2i_tokens)
        seq = torch.tensor(self.t2i_tokens, dtype=torch.long).expand(R, L).clone()
        seq[:, self.t2i_word_pos] = torch.tensor(self.tok.digit_ids, dtype=torch.long)[labels_R]
        b.tokens_BS[rows, :L] = seq
        b.valid_BS[rows, :L] = True
        b.modality_BS[rows, self.t2i_img] = VAE
        if images_RHW is not None:
            b.patches_BSP[rows, self.t2i_img] = images_to_patches(images_RHW, self.p)
        b.noise_BSP[rows, self.t2i_img] = noise_RNP
        b.flow_t_B[rows] = t_R
        b.kind_B[rows] = KIND_T2I
        b.labels_B[rows] = labels_R
