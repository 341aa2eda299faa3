"""Linear probes on frozen shared-expert outputs, with Hewitt–Liang control tasks.

Tasks on the fixed probe batch (``MultimodalData.probe_batch``), one probe per layer each:

- ``vit_digit``: digit class from the ViT tokens of MMU samples, mean-pooled per image.
- ``vae_digit``: digit class from the VAE tokens of T2I samples, mean-pooled per image.
- ``text_topic``: pydoc topic class of an LM sample from each of its text tokens (token level).

Control tasks (Hewitt & Liang 2019) give every *input type* a random label drawn from the task's
empirical label distribution, fixed by seed. For ``text_topic`` the type is the word (token id),
so a probe can score on the control only by memorising word identity — types recur between the
train and test samples. For the image tasks every image is its own type (no two probe images
are the same), so the control's held-out accuracy sits near chance and selectivity there reads
as "accuracy above chance". The split is by sample (a sample's tokens never straddle it),
stratified by label, and the same for the task and its control.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from moe_probe.modalities import TEXT, VAE, VIT
from moe_probe.trace.capture import token_rows
from moe_probe.trace.config import TraceConfig

PROBE_TASKS: tuple[str, ...] = ("vit_digit", "vae_digit", "text_topic")
"""Labels of the store's ``probe`` ``task`` dim."""

_KIND_LM, _KIND_MMU, _KIND_T2I = 0, 1, 2


@dataclass
class ProbeData:
    """One task's probe examples for one layer."""

    X: np.ndarray
    """(N, D) features."""
    y: np.ndarray
    """(N,) task labels."""
    types: np.ndarray
    """(N,) input type of each example (control labels are a function of it)."""
    sample: np.ndarray
    """(N,) probe-batch row each example came from (the train/test split is by sample)."""


def _pool(h_TD: torch.Tensor, b_T: torch.Tensor, select_T: torch.Tensor, B: int):
    """Mean of the selected rows per batch row: (B, D) sums / counts, and the counts."""
    h = h_TD[select_T].double()
    sums = torch.zeros(B, h_TD.shape[1], dtype=torch.float64).index_add_(0, b_T[select_T], h)
    counts = torch.bincount(b_T[select_T], minlength=B)
    return sums / counts.clamp_min(1)[:, None], counts


def probe_data(batch, h_TD: torch.Tensor) -> dict[str, ProbeData]:
    """Examples of every task from one layer's shared output on ``batch`` (host tensors)."""
    h_TD = h_TD.detach().float().cpu()
    rows = token_rows(batch, h_TD.shape[0])
    b_T, s_T = rows[:, 0], rows[:, 1]
    B = batch.tokens_BS.shape[0]
    mod_T = batch.modality_BS.cpu()[b_T, s_T]
    valid_T = batch.valid_BS.cpu()[b_T, s_T]
    kind_B = batch.kind_B.cpu()
    labels_B = batch.labels_B.cpu()
    out: dict[str, ProbeData] = {}
    for task, modality, kind in (("vit_digit", VIT, _KIND_MMU), ("vae_digit", VAE, _KIND_T2I)):
        pooled, counts = _pool(h_TD, b_T, (mod_T == modality) & valid_T, B)
        keep = ((counts > 0) & (kind_B == kind) & (labels_B >= 0)).nonzero().flatten()
        out[task] = ProbeData(X=pooled[keep].numpy(), y=labels_B[keep].numpy(),
                              types=keep.numpy(), sample=keep.numpy())
    text_B = batch.text_label_B.cpu()
    sel = (mod_T == TEXT) & valid_T & (kind_B[b_T] == _KIND_LM) & (text_B[b_T] >= 0)
    out["text_topic"] = ProbeData(X=h_TD[sel].numpy().astype(np.float64), y=text_B[b_T[sel]].numpy(),
                                  types=batch.tokens_BS.cpu()[b_T[sel], s_T[sel]].numpy(),
                                  sample=b_T[sel].numpy())
    return out


def control_labels(y: np.ndarray, types: np.ndarray, seed: int) -> np.ndarray:
    """A random label per input type, drawn from the empirical label distribution of ``y``."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(types, return_inverse=True)
    per_type = rng.choice(y, size=len(uniq), replace=True)
    return per_type[inverse.reshape(-1)]


def split_by_sample(sample: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask holding out a seeded share of the samples (with all their examples),
    stratified by label so every class keeps training examples — the probe sets are small
    (a few samples per class), and an unstratified split can leave a class untrained."""
    uniq, first = np.unique(sample, return_index=True)
    label = y[first]
    rng = np.random.default_rng(seed)
    test_samples = []
    for c in np.unique(label):
        members = rng.permutation(uniq[label == c])
        n_test = min(int(round(test_fraction * len(members))), len(members) - 1)
        test_samples.extend(members[:n_test].tolist())
    return np.isin(sample, np.asarray(test_samples, dtype=sample.dtype))


def fit_accuracy(X: np.ndarray, y: np.ndarray, test: np.ndarray, cfg: TraceConfig) -> float:
    """Held-out accuracy of an L2 logistic-regression probe on standardised features."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = ~test
    if test.sum() == 0 or len(np.unique(y[train])) < 2:
        return float("nan")
    scaler = StandardScaler().fit(X[train])
    clf = LogisticRegression(C=cfg.probe_C, max_iter=cfg.probe_max_iter)
    with warnings.catch_warnings():
        # A probe that has not converged is still a valid (weaker) linear probe; the cap is a knob.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(X[train]), y[train])
    return float((clf.predict(scaler.transform(X[test])) == y[test]).mean())


def run_probe(d: ProbeData, cfg: TraceConfig, task_seed: int) -> tuple[float, float]:
    """(accuracy, control_accuracy) of one task on one layer's features."""
    if len(d.y) == 0:
        return float("nan"), float("nan")
    X, y, types, sample = d.X, d.y, d.types, d.sample
    if len(y) > cfg.probe_max_samples:
        keep = np.sort(np.random.default_rng(cfg.probe_seed).choice(len(y), cfg.probe_max_samples,
                                                                    replace=False))
        X, y, types, sample = X[keep], y[keep], types[keep], sample[keep]
    test = split_by_sample(sample, y, cfg.probe_test_fraction, cfg.probe_seed + task_seed)
    control = control_labels(y, types, cfg.probe_seed + 7919 * (task_seed + 1))
    return fit_accuracy(X, y, test, cfg), fit_accuracy(X, control, test, cfg)


def probe_row(batch, shared: list[torch.Tensor | None], cfg: TraceConfig,
              tasks: tuple[str, ...] = PROBE_TASKS) -> dict[str, np.ndarray]:
    """accuracy, control_accuracy, selectivity (layer, task); NaN for layers without shared experts."""
    L, N = len(shared), len(tasks)
    acc, ctl = np.full((L, N), np.nan), np.full((L, N), np.nan)
    for li, h in enumerate(shared):
        if h is None:
            continue
        data = probe_data(batch, h)
        for ti, task in enumerate(tasks):
            acc[li, ti], ctl[li, ti] = run_probe(data[task], cfg, PROBE_TASKS.index(task))
    return {"accuracy": acc, "control_accuracy": ctl, "selectivity": acc - ctl}
