"""``moe-probe reproduce [--quick] [--seeds N] [--jobs N] --out DIR`` (parser: :mod:`moe_probe.cli`).

1. trains the plan (:mod:`.runner`; resumable, finished runs skipped),
2. reads every store into the results table (:mod:`.table`; mean and 95% CI over seeds),
3. checks the paper's claims against it (:mod:`.claims`; paired t-tests across seeds,
   Holm-corrected per claim),
4. writes the diagnosis HTML report over all runs (:mod:`moe_probe.diagnose`, reused as is).

Outputs in DIR: ``results.md``, ``results.csv``, ``results.json``, ``claims.csv``,
``report.html``.
Bad input raises ValueError (one line, exit 2).
"""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

from moe_probe.jsonutil import strict_json
from moe_probe.reproduce.config import ReproduceConfig, make_config
from moe_probe.store.location import local_path

RESULTS_MD, RESULTS_CSV, RESULTS_JSON, CLAIMS_CSV, REPORT_HTML = (
    "results.md", "results.csv", "results.json", "claims.csv", "report.html")


def reproduce(args) -> int:
    sweep = bool(getattr(args, "sweep", False))
    cfg = make_config(quick=bool(args.quick), seeds=args.seeds, jobs=getattr(args, "jobs", None),
                      sweep=sweep)
    out = local_path(args.out)
    from moe_probe.reproduce.runner import prepare_out, run_plan

    prepare_out(cfg, out)
    t0 = time.perf_counter()
    plan = run_plan(cfg, out)
    train_s = time.perf_counter() - t0
    if sweep:
        return _sweep_results(cfg, plan, out, train_s, t0)
    results = write_results(cfg, plan, out, train_s=train_s)
    write_report(plan, out)
    print(_claims_summary(results))
    print(f"results: {out / RESULTS_MD}, {out / RESULTS_CSV}, {out / RESULTS_JSON}, "
          f"{out / CLAIMS_CSV}; "
          f"report: {out / REPORT_HTML}")
    print(f"wall-clock: {train_s:.0f} s training, {time.perf_counter() - t0:.0f} s in all (sum "
          f"of each run's time in the invocation that finished it: {results['runs_wall_s_sum']} s)")
    return 0


def _sweep_results(cfg, plan, out: Path, train_s: float, t0: float) -> int:
    from moe_probe.reproduce import sweep_results as sr

    res = sr.write(cfg, plan, out, train_s=train_s)
    for arch, cells in sr.collapsed(res).items():
        print(f"{arch}: minimum capacity rate below {sr.COLLAPSE_RATE} in "
              f"{len(cells)} of {len(res['values'])} cells")
    png = res["png"]
    print(f"results: {out / sr.SWEEP_MD}, {out / sr.SWEEP_CSV}, {out / sr.SWEEP_JSON}; heat maps: "
          f"{out / sr.SWEEP_HTML}" + (f", {', '.join(png)}" if isinstance(png, list) and png
                                      else f" (no PNG: {png})"))
    print(f"wall-clock: {train_s:.0f} s training, {time.perf_counter() - t0:.0f} s in all")
    return 0


def _claims_summary(results: dict) -> str:
    return "\n".join(f"claim {c['id']} ({c['source']}): {c['verdict']} — {c['statement']}"
                     for c in results["claims"])


def write_results(cfg: ReproduceConfig, plan, out: Path, *, train_s: float) -> dict:
    """Table + claims from the stores; writes the three result files, returns the JSON."""
    from moe_probe.reproduce import claims as claims_mod
    from moe_probe.reproduce.metrics import METRICS
    from moe_probe.reproduce.table import markdown_tables, write_csv, collect

    cells = collect(plan, out)
    claims = claims_mod.evaluate(cells)
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"quick": cfg.quick, "seeds": list(cfg.seeds),
                   "size_overrides": list(cfg.size_overrides)},
        "this_invocation_train_s": round(train_s, 1),
        "runs_wall_s_sum": round(sum(_marker(s).get("wall_s") or 0.0 for s in plan), 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "kinds": [{"name": k.name, "recipe": cfg.recipe_name(k), "overrides": list(cfg.overrides(k)),
                   "about": k.about} for k in cfg.kinds],
        "metrics": [{"key": m.key, "label": m.label, "group": m.group, "var": m.var,
                     "reduce": m.reduce, "better": m.better, "section": m.section}
                    for m in METRICS],
        "cells": cells,
        "claims": claims,
    }
    (out / RESULTS_JSON).write_text(json.dumps(strict_json(results), indent=1, allow_nan=False) + "\n")
    write_csv(out / RESULTS_CSV, cfg.kinds, cells)
    claims_mod.write_csv(out / CLAIMS_CSV, claims)
    md = _markdown(cfg, results, markdown_tables(cfg.kinds, cells, len(cfg.seeds)),
                   claims_mod.markdown(claims))
    (out / RESULTS_MD).write_text(md, encoding="utf-8")
    return results


def _marker(spec) -> dict:
    from moe_probe.run import Run

    p = Run(spec.run_dir).done_path
    return json.loads(p.read_text()) if p.is_file() else {}


def _markdown(cfg: ReproduceConfig, results: dict, tables: str, claims: str) -> str:
    kinds = "\n".join(f"- `{k['name']}`: {k['about']} (recipe `{k['recipe']}`"
                      + (f", `--set {' '.join(k['overrides'])}`" if k["overrides"] else "") + ")"
                      for k in results["kinds"])
    return (
        f"# moe-probe reproduce ({'quick' if cfg.quick else 'default'})\n\n"
        f"Seeds {list(cfg.seeds)}; cells are mean ± half-width of the t-based 95% CI over "
        f"seeds (no ± when fewer than 2 seeds have a value; `–` = not measured for that kind, "
        f"e.g. generation of the understanding-only control). Every cell's per-seed values and "
        f"store sources are in `results.json`.\n"
        f"Size overrides: {list(cfg.size_overrides) or 'none (recipes as they are)'}. "
        f"Training wall-clock of this invocation: {results['this_invocation_train_s']} s "
        f"(sum of each run's wall-clock in the invocation that finished it, bases included: "
        f"{results['runs_wall_s_sum']} s; "
        f"{results['machine']['cpus']} CPUs).\n\n"
        f"Kinds:\n{kinds}\n\n"
        "Capacity rate: per-step mean over layers; *final* = mean of the last 5% of steps, "
        "*min* = lowest 5%-window running mean. Evaluation metrics are the last held-out eval; "
        "*worst* = worst eval during stage 2. Isolated = shared experts only (routed masked) on "
        "the fixed probe batch; Δ = end − start of stage 2. Selectivity: mean over layers of "
        "the vit_digit and text_topic probes. gen/und cos: gradient cosine on shared-expert "
        "weights, mean over layers and sampled steps.\n\n"
        f"## Results\n\n{tables}\n\n## Claims\n\n"
        "Each comparison is a paired t-test over seeds on a − b (the kinds of one seed share its "
        "base, data order and evaluation sets): mean difference with its 95% t interval, Cohen's "
        "d_z, two-sided p and the Holm–Bonferroni p across the claim's comparisons. *supports* / "
        "*refutes*: Holm p < 0.05 in / against the paper's direction; a claim is supported when "
        "every comparison is, refuted when any is. The former rule (disjoint 95% CIs of the two "
        "cells) is shown as secondary information. One row per comparison: `claims.csv`.\n\n"
        f"{claims}")


def write_report(plan, out: Path) -> None:
    """The diagnosis HTML over all runs, through moe_probe.diagnose (the und-only run of the
    first seed is the control of its regression check)."""
    from moe_probe.diagnose.html_report import render_html
    from moe_probe.diagnose.rundata import load_run
    from moe_probe.diagnose.runner import diagnose

    runs, control = [], None
    for spec in plan:
        run = load_run(spec.run_dir)
        run.name = spec.label  # every run dir is named seed<S>; the kind tells them apart
        runs.append(run)
        if control is None and spec.kind.name == "und_only":
            control = run
    report = diagnose(runs, control=control)
    (out / REPORT_HTML).write_text(render_html(report, runs, control), encoding="utf-8")
