"""The paper's claims, each checked against the measured table with a computed verdict.

A claim is a set of pairwise comparisons ``metric(a) <op> metric(b)`` in the direction the
paper expects. One comparison's verdict, from the two cells' t-based 95% CIs over seeds:

- ``inconclusive`` when either side has fewer than 2 seeds with a value, or the CIs overlap;
- ``supports`` when the CIs are disjoint and the means lie in the expected direction;
- ``refutes`` when they are disjoint the other way.

Disjoint CIs is a deliberately conservative test (stricter than a two-sample t-test at 5%):
at 3 seeds only clear effects count. A claim ``supports`` only when all its comparisons
do, ``refutes`` when any comparison refutes, else it is ``inconclusive``.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_probe.reproduce.metrics import BY_KEY
from moe_probe.reproduce.table import fmt, summarize

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
    """Verdict of one comparison, with the numbers it rests on."""
    ca, cb = cells.get(c.a, {}).get(c.metric), cells.get(c.b, {}).get(c.metric)
    out = {"metric": c.metric, "a": c.a, "b": c.b, "expect": c.expect,
           "a_cell": _brief(ca), "b_cell": _brief(cb), "paired_diff": _paired(ca, cb)}
    if not ca or not cb or ca["n"] < 2 or cb["n"] < 2:
        return {**out, "verdict": "inconclusive", "reason": "fewer than 2 seeds with a value"}
    if ca["ci_low"] <= cb["ci_high"] and cb["ci_low"] <= ca["ci_high"]:
        return {**out, "verdict": "inconclusive", "reason": "95% CIs overlap"}
    greater = ca["mean"] > cb["mean"]
    ok = greater if c.expect == "greater" else not greater
    return {**out, "verdict": "supports" if ok else "refutes",
            "reason": "95% CIs disjoint, " + ("as expected" if ok else "opposite direction")}


def _paired(ca, cb):
    """a − b per seed (runs of a seed share base, data order and evaluation sets), with its
    t-based CI: shown next to the verdict as the more sensitive view; the verdict itself
    stays the conservative CI-overlap rule."""
    if not ca or not cb or "values" not in ca or "values" not in cb:
        return None
    b_by_seed = {v["seed"]: v["value"] for v in cb["values"]}
    diffs = [v["value"] - b_by_seed[v["seed"]] for v in ca["values"]
             if v["value"] is not None and b_by_seed.get(v["seed"]) is not None]
    return _brief(summarize(diffs)) if diffs else None


def _brief(cell):
    if not cell:
        return None
    return {k: cell[k] for k in ("n", "mean", "ci_low", "ci_high")}


def evaluate(cells: dict) -> list[dict]:
    """Every claim with its comparisons and the combined verdict."""
    out = []
    for claim in CLAIMS:
        comps = [compare(c, cells) for c in claim.comparisons]
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
            paired = f"; paired a−b {fmt(c['paired_diff'])}" if c["paired_diff"] else ""
            lines.append(f"- {BY_KEY[c['metric']].label}: {c['a']} {_num(c['a_cell'])} vs "
                         f"{c['b']} {_num(c['b_cell'])} (expected {op}) → {c['verdict']} "
                         f"({c['reason']}{paired})")
        lines.append("")
    return "\n".join(lines)


def _num(cell) -> str:
    return f"{fmt(cell)} (n={cell['n']})" if cell else "–"
