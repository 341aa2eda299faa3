"""The paper's claims, each checked against the measured table with a computed verdict.

A claim is a set of pairwise comparisons ``metric(a) <op> metric(b)`` in the direction the
paper expects. Every kind of one seed starts from that seed's stage-1 base and sees the same
data order and evaluation sets, so a comparison is a *paired* t-test on the per-seed
differences a − b (:func:`moe_probe.stats.paired`: 95% t interval, two-sided p, Cohen's d_z).
The p-values of one claim's comparisons are corrected together by Holm–Bonferroni
(family-wise error 5% per claim). One comparison:

- ``supports`` where its Holm-adjusted p < 0.05 and a − b lies in the expected direction;
- ``refutes`` where its Holm-adjusted p < 0.05 the other way;
- ``inconclusive`` otherwise (fewer than 2 seeds with both values, no variance, or p ≥ 0.05).

A claim ``supports`` where every comparison does, ``refutes`` where any comparison refutes,
else it is ``inconclusive``. The former rule — disjoint 95% CIs of the two cells, which ignores
the pairing and is far stricter — is kept beside each comparison as ``overlap``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from moe_probe.reproduce.metrics import BY_KEY
from moe_probe import stats
from moe_probe.reproduce.table import fmt

VERDICTS = ("supports", "refutes", "inconclusive")


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """``metric`` of kind ``a`` expected ``greater`` or ``less`` than that of kind ``b``."""

    metric: str
    """Metric key (:data:`moe_probe.reproduce.metrics.METRICS`)."""
    a: str
    """Kind expected to be better."""
    b: str
    """Kind it is compared with."""
    expect: str
    """``greater`` or ``less``: the paper's direction of ``a`` relative to ``b``."""


@dataclass(frozen=True, kw_only=True)
class Claim:
    """One of the paper's claims and the comparisons that test it at this scale."""

    id: int
    """Number in the report."""
    statement: str
    """The claim, in the paper's words as far as possible."""
    source: str
    """Where the paper makes it."""
    comparisons: tuple[Comparison, ...]
    """All must support for the claim to be supported."""


def _cmp(metric, a, bs, expect):
    return tuple(Comparison(metric=metric, a=a, b=b, expect=expect) for b in bs)


CLAIMS: tuple[Claim, ...] = (
    Claim(id=1, source="Fig. 5a",
          statement="standard MoE and MoT lose capacity rate while Symbiotic-MoE holds it high",
          comparisons=(*_cmp("cap_min_text", "symbiotic", ("moe", "mot"), "greater"),
                       *_cmp("cap_min_vae", "symbiotic", ("moe", "mot"), "greater"),
                       *_cmp("cap_final_text", "symbiotic", ("moe", "mot"), "greater"),
                       *_cmp("cap_final_vae", "symbiotic", ("moe", "mot"), "greater"))),
    Claim(id=2, source="Fig. 5b", statement="Symbiotic-MoE's generation loss converges lowest",
          comparisons=_cmp("gen_loss", "symbiotic", ("moe", "mot"), "less")),
    Claim(id=3, source="Fig. 6",
          statement="shared experts gain under Symbiotic co-training but degrade under "
                    "understanding-only training (isolated eval / probes, start → end)",
          comparisons=(*_cmp("iso_text_loss_change", "symbiotic", ("und_only",), "less"),
                       *_cmp("iso_digit_acc_change", "symbiotic", ("und_only",), "greater"),
                       *_cmp("selectivity_change", "symbiotic", ("und_only",), "greater"))),
    Claim(id=4, source="expert-split ablation",
          statement="a 3/4 understanding split beats 1/4 and 1/2 on understanding",
          comparisons=(*_cmp("text_loss", "symbiotic", ("sym_und_1_4", "sym_und_1_2"), "less"),
                       *_cmp("digit_acc", "symbiotic", ("sym_und_1_4", "sym_und_1_2"),
                             "greater"))),
    Claim(id=5, source="shielding ablation",
          statement="early gradient shielding protects understanding (worst point of training "
                    "and end)",
          comparisons=(*_cmp("text_loss_worst", "symbiotic", ("sym_no_shield",), "less"),
                       *_cmp("digit_acc_worst", "symbiotic", ("sym_no_shield",), "greater"),
                       *_cmp("text_loss", "symbiotic", ("sym_no_shield",), "less"),
                       *_cmp("digit_acc", "symbiotic", ("sym_no_shield",), "greater"))),
    Claim(id=6, source="progressive training",
          statement="differential learning rates protect understanding",
          comparisons=(*_cmp("text_loss", "symbiotic", ("sym_no_difflr",), "less"),
                       *_cmp("digit_acc", "symbiotic", ("sym_no_difflr",), "greater"))),
    Claim(id=7, source="main table",
          statement="Symbiotic-MoE retains understanding better than standard MoE",
          comparisons=(*_cmp("text_loss", "symbiotic", ("moe",), "less"),
                       *_cmp("digit_acc", "symbiotic", ("moe",), "greater"))),
)


def compare(c: Comparison, cells: dict) -> dict:
    """One comparison's paired test (no verdict yet: that needs the claim's Holm family)."""
    ca, cb = cells.get(c.a, {}).get(c.metric), cells.get(c.b, {}).get(c.metric)
    return {"metric": c.metric, "a": c.a, "b": c.b, "expect": c.expect,
            "a_cell": _brief(ca), "b_cell": _brief(cb),
            "paired": stats.paired(_by_seed(ca), _by_seed(cb)), "overlap": overlap(c, ca, cb)}


def overlap(c: Comparison, ca, cb) -> dict:
    """The former, secondary rule: the two cells' 95% CIs disjoint in the expected direction."""
    if not ca or not cb or ca["n"] < 2 or cb["n"] < 2:
        return {"verdict": "inconclusive", "reason": "fewer than 2 seeds with a value"}
    if ca["ci_low"] <= cb["ci_high"] and cb["ci_low"] <= ca["ci_high"]:
        return {"verdict": "inconclusive", "reason": "95% CIs overlap"}
    ok = (ca["mean"] > cb["mean"]) == (c.expect == "greater")
    return {"verdict": "supports" if ok else "refutes",
            "reason": "95% CIs disjoint, " + ("as expected" if ok else "opposite direction")}


def _by_seed(cell) -> dict:
    return {v["seed"]: v["value"] for v in (cell or {}).get("values", [])}


def _brief(cell):
    if not cell:
        return None
    return {k: cell[k] for k in ("n", "mean", "ci_low", "ci_high")}


def decide(comps: list[dict]) -> list[dict]:
    """Holm across one claim's comparisons, then each comparison's verdict and reason."""
    adjusted = stats.holm([c["paired"]["p"] for c in comps])
    out = []
    for c, p_holm in zip(comps, adjusted):
        test = c["paired"]
        want = 1 if c["expect"] == "greater" else -1
        sign = stats.direction(test, p_holm)
        if test["p"] is None:
            verdict = "inconclusive"
            reason = ("fewer than 2 seeds with both values" if test["n_a"] < 2
                      else "no variance across seeds")
        elif sign == 0:
            verdict, reason = "inconclusive", f"Holm p = {p_holm:.3g} ≥ {stats.ALPHA}"
        else:
            verdict = "supports" if sign == want else "refutes"
            reason = (f"Holm p = {p_holm:.3g} < {stats.ALPHA}, "
                      + ("as expected" if sign == want else "opposite direction"))
        out.append({**c, "p_holm": p_holm, "verdict": verdict, "reason": reason})
    return out


def evaluate(cells: dict) -> list[dict]:
    """Every claim with its comparisons and the combined verdict."""
    out = []
    for claim in CLAIMS:
        comps = decide([compare(c, cells) for c in claim.comparisons])
        verdicts = {c["verdict"] for c in comps}
        verdict = ("refutes" if "refutes" in verdicts
                   else "supports" if verdicts == {"supports"} else "inconclusive")
        out.append({"id": claim.id, "statement": claim.statement, "source": claim.source,
                    "expected": _expected(claim), "verdict": verdict, "comparisons": comps})
    return out


def _expected(claim: Claim) -> str:
    op = {"greater": ">", "less": "<"}
    return "; ".join(f"{c.metric}: {c.a} {op[c.expect]} {c.b}" for c in claim.comparisons)


def markdown(claims: list[dict]) -> str:
    lines = []
    for cl in claims:
        lines.append(f"**Claim {cl['id']}** ({cl['source']}): {cl['statement']}. "
                     f"**Verdict: {cl['verdict']}.**")
        lines.append(f"- expected (paper): {cl['expected']}")
        for c in cl["comparisons"]:
            op = ">" if c["expect"] == "greater" else "<"
            lines.append(f"- {BY_KEY[c['metric']].label}: {c['a']} {_num(c['a_cell'])} vs "
                         f"{c['b']} {_num(c['b_cell'])} (expected {op}): paired a−b "
                         f"{_test(c['paired'], c['p_holm'])} → **{c['verdict']}** "
                         f"({c['reason']}; CI overlap rule: {c['overlap']['verdict']})")
        lines.append("")
    return "\n".join(lines)


def _test(t: dict, p_holm) -> str:
    """``diff [lo, hi], d_z, p, Holm p`` of one paired test."""
    if t["diff"] is None:
        return "–"
    s = f"{t['diff']:.3g}"
    if t["ci_low"] is not None:
        s += f" [{t['ci_low']:.3g}, {t['ci_high']:.3g}]"
    if t["effect"] is not None:
        s += f", d_z {t['effect']:.2f}"
    if t["p"] is not None:
        s += f", p {t['p']:.3g}, Holm p {p_holm:.3g}"
    return s + f" (n={t['n_a']})"


def _num(cell) -> str:
    return f"{fmt(cell)} (n={cell['n']})" if cell else "–"


CSV_FIELDS = ("claim", "claim_verdict", "metric", "a", "b", "expect", "n", "diff", "ci_low",
              "ci_high", "t", "df", "p", "p_holm", "d_z", "verdict", "overlap_verdict")


def write_csv(path: Path, claims: list[dict]) -> None:
    """One row per comparison: the paired test, Holm p and both verdicts."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for cl in claims:
            for c in cl["comparisons"]:
                t = c["paired"]
                w.writerow([cl["id"], cl["verdict"], c["metric"], c["a"], c["b"], c["expect"],
                            t["n_a"], *(_cell(t[k]) for k in ("diff", "ci_low", "ci_high", "t",
                                                               "df", "p")),
                            _cell(c["p_holm"]), _cell(t["effect"]), c["verdict"],
                            c["overlap"]["verdict"]])


def _cell(v) -> str:
    return "" if v is None else repr(v)
