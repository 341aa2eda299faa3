"""Embedded multimodal data: sklearn's 8×8 digits + Python's pydoc topics, no downloads.

Splits are fixed per seed (numpy ``default_rng(seed)``): digits -> train/val/test indices,
pydoc text -> train/val chunks (each topic's chunks are split, so every topic has both).
Identical chunks are kept once; pydoc topics overlap, so a val chunk may still share phrases
with train chunks at other offsets — held-out text loss is "unseen windows", not unseen topics.
Batches are drawn with a caller-owned ``torch.Generator`` so a trainer can checkpoint the exact
data position with ``generator.get_state()``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from moe_probe.data.batch import KIND_LM, KIND_MMU, KIND_T2I, Batch, Layout
from moe_probe.data.tokenizer import Tokenizer


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = 24
    """Fixed sequence length S (image samples, 21-22 positions with 2×2 patches, are right-padded;
    LM samples are full chunks)."""
    patch_size: int = 2
    """Image patch side in pixels; 2 -> 16 tokens of dim 4 per 8×8 digit."""
    vocab_words: int = 2000
    """Corpus words in the tokenizer (on top of specials and caption words)."""
    mix: tuple[float, float, float] = (6.0, 2.0, 2.0)
    """Sample-kind ratio T2I : LM : MMU (drawn independently per sample)."""
    t_sampling: str = "logit_normal"
    """Flow time distribution: ``logit_normal`` (t = sigmoid(N(t_mean, t_std))) or ``uniform``."""
    t_mean: float = 0.0
    """Mean of the normal before the sigmoid (logit_normal)."""
    t_std: float = 1.0
    """Std of the normal before the sigmoid (logit_normal)."""
    n_val_digits: int = 200
    """Held-out digits for validation."""
    n_test_digits: int = 300
    """Held-out digits for the final test."""
    val_text_fraction: float = 0.1
    """Fraction of each topic's text chunks held out for validation."""
    n_text_classes: int = 4
    """Text-probe classes: the largest pydoc topics (label = size rank)."""
    probe_per_class: int = 4
    """Probe-batch samples per digit class (MMU and T2I each) and per text class."""

    def __post_init__(self):
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"data mix must be three non-negative weights T2I:LM:MMU, got {self.mix}")
        object.__setattr__(self, "mix", tuple(float(m) for m in self.mix))
        if self.t_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"t_sampling must be 'logit_normal' or 'uniform', got {self.t_sampling!r}")
        if not 0 < self.val_text_fraction < 1:
            raise ValueError("val_text_fraction must be in (0, 1)")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 8.0 - 1.0).astype(np.float32), d.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _topic_windows(tokenizer_words: tuple[str, ...], seq_len: int):
    """Per topic (sorted by size, largest first): windows of S+1 ids, stride S, pad-filled."""
    from pydoc_data.topics import topics

    tok = Tokenizer(list(tokenizer_words))
    streams = {k: [tok.bos] + tok.encode(topics[k]) + [tok.eos] for k in sorted(topics)}
    order = sorted(streams, key=lambda k: (-len(streams[k]), k))
    out, seen = [], set()
    for k in order:
        s = streams[k]
        rows = []
        for i in range(max(1, (len(s) - 1 + seq_len - 1) // seq_len)):
            part = s[i * seq_len: i * seq_len + seq_len + 1]
            row = tuple(part) + (tok.pad,) * (seq_len + 1 - len(part))
            # Several pydoc topics repeat whole sections: keep one copy of each window, so an
            # identical chunk can never be in both train and val.
            if row not in seen:
                seen.add(row)
                rows.append(row)
        if rows:
            out.append((k, np.array(rows, dtype=np.int64)))
    return out


class MultimodalData:
    """Digits + pydoc text as mixed LM / MMU / T2I sequences (see :mod:`moe_probe.data.batch`)."""

    def __init__(self, cfg: DataConfig = DataConfig(), seed: int = 0,
                 tokenizer: Tokenizer | None = None):
        self.cfg, self.seed = cfg, seed
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.build(cfg.vocab_words)
        self.layout = Layout(self.tokenizer, cfg.seq_len, cfg.patch_size)
        images, labels = _digits()
        self.images = torch.from_numpy(images)
        self.digit_labels = torch.from_numpy(labels)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(labels))
        nt, nv = cfg.n_test_digits, cfg.n_val_digits
        if nt + nv >= len(labels):
            raise ValueError(f"n_val_digits + n_test_digits must be < {len(labels)}")
        self.digit_split = {
            "test": torch.from_numpy(np.sort(perm[:nt])),
            "val": torch.from_numpy(np.sort(perm[nt: nt + nv])),
            "train": torch.from_numpy(np.sort(perm[nt + nv:])),
        }
        windows = _topic_windows(tuple(self.tokenizer.words), cfg.seq_len)
        self.topic_names = [k for k, _ in windows]
        train, val, train_lab, val_lab = [], [], [], []
        for rank, (_, w) in enumerate(windows):
            is_val = rng.random(len(w)) < cfg.val_text_fraction
            if len(w) > 1 and not is_val.any():
                is_val[rng.integers(len(w))] = True  # every topic keeps some held-out text
            train.append(w[~is_val]), val.append(w[is_val])
            train_lab += [rank] * int((~is_val).sum())
            val_lab += [rank] * int(is_val.sum())
        self.text_split = {"train": torch.from_numpy(np.concatenate(train)),
                           "val": torch.from_numpy(np.concatenate(val))}
        self.text_labels = {"train": torch.tensor(train_lab), "val": torch.tensor(val_lab)}
        self._probe: Batch | None = None
        self._probe_images: torch.Tensor | None = None

    @property
    def mix_probs(self) -> torch.Tensor:
        """Probabilities of sample kinds indexed by kind id (LM 0, MMU 1, T2I 2)."""
        t2i, lm, mmu = self.cfg.mix
        p = torch.tensor([lm, mmu, t2i], dtype=torch.float64)
        return p / p.sum()

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.cfg.t_sampling == "uniform":
            return torch.rand(n, generator=generator)
        z = torch.randn(n, generator=generator) * self.cfg.t_std + self.cfg.t_mean
        return torch.sigmoid(z)

    def batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """A random batch of ``split`` (train / val / test; text has no test split, uses val)."""
        if split not in self.digit_split:
            raise ValueError(f"unknown split {split!r}: expected train, val or test")
        g, B = generator, batch_size
        kinds = torch.multinomial(self.mix_probs, B, replacement=True, generator=g)
        b = self.layout.empty(B)
        rows = {k: (kinds == k).nonzero().flatten() for k in (KIND_LM, KIND_MMU, KIND_T2I)}
        tsplit = "train" if split == "train" else "val"
        lm_idx = torch.randint(len(self.text_split[tsplit]), (len(rows[KIND_LM]),), generator=g)
        self.layout.fill_lm(b, rows[KIND_LM], self.text_split[tsplit][lm_idx],
                            self.text_labels[tsplit][lm_idx])
        pool = self.digit_split[split]
        for kind in (KIND_MMU, KIND_T2I):
            r = rows[kind]
            idx = pool[torch.randint(len(pool), (len(r),), generator=g)]
            if kind == KIND_MMU:
                self.layout.fill_mmu(b, r, self.images[idx], self.digit_labels[idx])
            else:
                noise = torch.randn(len(r), self.layout.n_img, self.layout.P, generator=g)
                self.layout.fill_t2i(b, r, self.images[idx], self.digit_labels[idx], noise,
                                     self.sample_t(len(r), g))
        return b

    def probe_batch(self) -> Batch:
        """Fixed batch for snapshots/probes: ``probe_per_class`` val digits per class as MMU and
        as T2I (``labels_B`` = digit), and as many val chunks of each of the ``n_text_classes``
        largest topics as LM (``text_label_B`` = topic size rank). Same every call for a seed."""
        if self._probe is None:
            n = self.cfg.probe_per_class
            val = self.digit_split["val"]
            per_class = [val[self.digit_labels[val] == c][:n] for c in range(10)]
            if min(len(p) for p in per_class) < n:
                raise ValueError(f"probe_per_class={n} exceeds the val digits of some class")
            idx = torch.cat(per_class)
            tl = self.text_labels["val"]
            text_rows = [(tl == c).nonzero().flatten()[:n] for c in range(self.cfg.n_text_classes)]
            text_idx = torch.cat(text_rows)
            nd, nl = len(idx), len(text_idx)
            b = self.layout.empty(2 * nd + nl)
            self.layout.fill_mmu(b, torch.arange(nd), self.images[idx], self.digit_labels[idx])
            g = torch.Generator().manual_seed(10_000 + self.seed)
            noise = torch.randn(nd, self.layout.n_img, self.layout.P, generator=g)
            self.layout.fill_t2i(b, torch.arange(nd, 2 * nd), self.images[idx], self.digit_labels[idx],
                                 noise, self.sample_t(nd, g))
            self.layout.fill_lm(b, torch.arange(2 * nd, 2 * nd + nl), self.text_split["val"][text_idx],
                                tl[text_idx])
            self._probe = b
            self._probe_images = torch.cat([idx, idx, torch.full((nl,), -1, dtype=torch.long)])
        # a copy: callers may move or edit it in place without touching the cached one
        return self._probe.select(torch.arange(len(self._probe)))

    def probe_images(self) -> torch.Tensor:
        """(B,) index into sklearn's ``load_digits`` of each probe-batch row's image (-1 for LM
        rows): token-level routing shows the real digits an expert takes."""
        self.probe_batch()
        return self._probe_images.clone()
