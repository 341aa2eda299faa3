"""Seed-aware statistics: the one owner of t intervals, paired and Welch tests and Holm's
correction (``reproduce`` verdicts, ``moe-probe compare``, the dashboard's Compare bands).

Values come per seed. Two groups that share seeds (every kind of one ``reproduce`` seed starts
from the same stage-1 base, data order and evaluation sets) are compared by a *paired* t-test on
the per-seed differences; groups without shared seeds by Welch's unequal-variance t-test.
Several comparisons that decide one question are corrected together by Holm–Bonferroni
(step-down, controls the family-wise error at ``alpha`` without assuming independence).

Every result is a plain JSON-able dict (it goes into results.json / compare JSON as it is).
Reader code: numpy and scipy only.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
"""Level of every interval."""
ALPHA = 0.05
"""Family-wise error rate of a Holm-corrected family (1 − CONFIDENCE)."""


def finite(values) -> np.ndarray:
    """The finite values of ``values`` (None and NaN dropped) as float64."""
    return np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def summarize(values, confidence: float = CONFIDENCE) -> dict:
    """n (finite values), mean, sd and the t-based CI of the mean; CI None when n < 2."""
    x = finite(values)
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else None, "sd": None,
           "ci_low": None, "ci_high": None}
    if n >= 2:
        sd = float(x.std(ddof=1))
        lo, hi = _t_interval(out["mean"], sd / math.sqrt(n), n - 1, confidence)
        out.update(sd=sd, ci_low=lo, ci_high=hi)
    return out


def mean_ci(x_NS, confidence: float = CONFIDENCE):
    """Per column of a (sample, column) array: (n, mean, ci_low, ci_high) over the finite
    samples, as :func:`summarize` does for one column; mean NaN where n = 0, CI NaN where n < 2
    (zero width where the samples are equal)."""
    x = np.asarray(x_NS, dtype=float)
    fin = np.isfinite(x)
    n = fin.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(fin, x, 0.0).sum(axis=0) / n
        var = (np.where(fin, x - mean, 0.0) ** 2).sum(axis=0) / (n - 1)
        half = stats.t.ppf(0.5 + confidence / 2, np.where(n >= 2, n - 1, np.nan)) \
            * np.sqrt(var / n)
    return n, mean, mean - half, mean + half


def _t_interval(center: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    if se == 0:  # identical values: a zero-width interval (scipy refuses scale 0)
        return center, center
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return center - half, center + half


def _result(test, *, n_a, n_b, diff=None, se=None, df=None, effect=None, effect_name,
            confidence, **extra) -> dict:
    """The common shape: difference a − b, its CI, t, df, two-sided p and an effect size.
    p is None where there is nothing to test (too few values, or no variance at all)."""
    out = {"test": test, "n_a": n_a, "n_b": n_b, "diff": diff, "ci_low": None, "ci_high": None,
           "t": None, "df": df, "p": None, "effect": effect, "effect_name": effect_name, **extra}
    if diff is not None and se is not None and df is not None and df > 0:
        out["ci_low"], out["ci_high"] = _t_interval(diff, se, df, confidence)
        if se > 0:
            t = diff / se
            out.update(t=float(t), p=float(2 * stats.t.sf(abs(t), df)))
    return out


def paired(a_by_seed: dict, b_by_seed: dict, confidence: float = CONFIDENCE) -> dict:
    """Paired t-test of a − b over the seeds both have a finite value for.

    Effect size: Cohen's d_z = mean difference / sd of the differences. ``seeds`` lists the
    pairs used; ``unpaired`` the seeds with a value on one side only (left out)."""
    ok = {s: v for s, v in a_by_seed.items() if _ok(v)}
    both = sorted(s for s in ok if _ok(b_by_seed.get(s)))
    unpaired = sorted((set(ok) | {s for s, v in b_by_seed.items() if _ok(v)}) - set(both),
                      key=str)
    d = np.array([ok[s] - b_by_seed[s] for s in both], dtype=float)
    n = len(d)
    base = dict(n_a=n, n_b=n, effect_name="d_z", confidence=confidence, seeds=both,
                unpaired=unpaired)
    if n < 2:
        return _result("paired", diff=float(d.mean()) if n else None, **base)
    sd = float(d.std(ddof=1))
    return _result("paired", diff=float(d.mean()), se=sd / math.sqrt(n), df=n - 1,
                   effect=float(d.mean() / sd) if sd > 0 else None, **base)


def welch(a_values, b_values, confidence: float = CONFIDENCE) -> dict:
    """Welch's t-test of mean(a) − mean(b) (unequal variances, Welch–Satterthwaite df).

    Effect size: Cohen's d with the pooled sd."""
    a, b = finite(a_values), finite(b_values)
    na, nb = len(a), len(b)
    base = dict(n_a=na, n_b=nb, effect_name="d", confidence=confidence)
    if na < 2 or nb < 2:
        diff = float(a.mean() - b.mean()) if na and nb else None
        return _result("welch", diff=diff, **base)
    va, vb = float(a.var(ddof=1)), float(b.var(ddof=1))
    qa, qb = va / na, vb / nb
    se = math.sqrt(qa + qb)
    df = (qa + qb) ** 2 / (qa ** 2 / (na - 1) + qb ** 2 / (nb - 1)) if se > 0 else na + nb - 2
    pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    diff = float(a.mean() - b.mean())
    return _result("welch", diff=diff, se=se, df=float(df),
                   effect=diff / pooled if pooled > 0 else None, **base)


def difference(a_by_seed: dict, b_by_seed: dict, confidence: float = CONFIDENCE) -> dict:
    """Paired where the two sides share at least two seeds with values, Welch otherwise."""
    shared = [s for s, v in a_by_seed.items() if _ok(v) and _ok(b_by_seed.get(s))]
    if len(shared) >= 2:
        return paired(a_by_seed, b_by_seed, confidence)
    return welch(list(a_by_seed.values()), list(b_by_seed.values()), confidence)


def holm(pvalues: list) -> list:
    """Holm–Bonferroni adjusted p-values (same order; None stays None and is not counted:
    a comparison with nothing to test cannot be rejected)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    m, out, running = len(idx), [None] * len(pvalues), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def direction(test: dict, p_adjusted, alpha: float = ALPHA) -> int:
    """+1 / −1 where a − b is significantly positive / negative at ``alpha``, else 0."""
    if p_adjusted is None or p_adjusted >= alpha or not test["diff"]:
        return 0
    return 1 if test["diff"] > 0 else -1


def _ok(v) -> bool:
    return v is not None and math.isfinite(v)
