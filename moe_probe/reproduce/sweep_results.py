"""Results of ``reproduce --sweep``: per cell and architecture mean ± 95% t interval over seeds,
and the paired symbiotic − moe difference per cell (the two share each seed's base), Holm
across the cells of one heat map per metric.

Outputs in DIR: ``sweep.json`` (every run's value with its store source, every cell's numbers),
``sweep.csv`` (one row per cell × metric), ``sweep.md`` (tables and where capacity fell below
the diagnosis' collapse threshold), ``sweep.html`` (heat maps) and, where plotly's static export
works here (kaleido and a browser), ``sweep_<panel>.png``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from moe_probe import stats
from moe_probe.jsonutil import strict_json
from moe_probe.reproduce.metrics import BY_KEY, Metric, measure
from moe_probe.reproduce.sweep import ARCHS, panels

SWEEP_METRICS: tuple[Metric, ...] = (
    BY_KEY["cap_final_vae"], BY_KEY["cap_min_vae"], BY_KEY["cap_final_text"],
    BY_KEY["cap_min_text"],
    Metric(key="text_loss_change", label="Δ text held-out loss", group="eval", var="value",
           sel={"metric": "text_loss"}, reduce="change", better="low", section="tasks"),
)
COLLAPSE_RATE = 0.8
"""The diagnosis' default ``collapse_rate`` (moe_probe/diagnose/config.py): a cell whose mean
minimum capacity rate falls below it is called collapsed in ``sweep.md``."""
SWEEP_JSON, SWEEP_CSV, SWEEP_MD, SWEEP_HTML = "sweep.json", "sweep.csv", "sweep.md", "sweep.html"


def collect(plan, out: Path) -> dict:
    """``{cell key: {arch: {metric: {seed: value}}}}`` and the sources, read from the stores."""
    from moe_probe import open_run

    values: dict = {}
    sources: list = []
    for spec in plan:
        arch, cell = spec.kind.name.split("/", 1)
        store = open_run(spec.run_dir)
        run = spec.run_dir.relative_to(out).as_posix()
        datasets: dict = {}
        for m in SWEEP_METRICS:
            v, src = measure(store, run, m, datasets)
            values.setdefault(cell, {}).setdefault(arch, {}).setdefault(m.key, {})[spec.seed] = (
                v if math.isfinite(v) else None)
            sources.append({"metric": m.key, "seed": spec.seed, **src})
    return {"values": values, "sources": sources}


def analyse(quick: bool, values: dict) -> list[dict]:
    """Per panel: its cells with per-arch summaries and the paired difference, Holm per
    (panel, metric) over its cells."""
    out = []
    for panel in panels(quick):
        cells = []
        for yv, xv, cell in panel.cells():
            v = values[cell.key]
            row = {"y": yv, "x": xv, "cell": cell.key, "metrics": {}}
            for m in SWEEP_METRICS:
                per = {a: stats.summarize(list(v[a][m.key].values())) for a in ARCHS}
                row["metrics"][m.key] = {**per, "diff": stats.paired(v["symbiotic"][m.key],
                                                                     v["moe"][m.key])}
            cells.append(row)
        for m in SWEEP_METRICS:
            diffs = [c["metrics"][m.key]["diff"] for c in cells]
            for d, p in zip(diffs, stats.holm([d["p"] for d in diffs])):
                d["p_holm"] = p
        out.append({"name": panel.name, "title": panel.title, "x": list(panel.x),
                    "y": list(panel.y), "cells": cells})
    return out


def write(cfg, plan, out: Path, *, train_s: float) -> dict:
    got = collect(plan, out)
    result = {"config": {"quick": cfg.quick, "seeds": list(cfg.seeds),
                         "size_overrides": list(cfg.size_overrides)},
              "this_invocation_train_s": round(train_s, 1),
              "runs": [{"run": s.run_dir.relative_to(out).as_posix(), "recipe": s.recipe,
                        "overrides": list(s.overrides)} for s in plan],
              "metrics": [{"key": m.key, "label": m.label} for m in SWEEP_METRICS],
              "panels": analyse(cfg.quick, got["values"]), "values": got["values"],
              "sources": got["sources"]}
    (out / SWEEP_JSON).write_text(json.dumps(strict_json(result), indent=1, allow_nan=False) + "\n")
    _write_csv(out / SWEEP_CSV, result)
    from moe_probe.reproduce.sweep_report import write_html

    png = write_html(result, out / SWEEP_HTML)
    (out / SWEEP_MD).write_text(markdown(result, png), encoding="utf-8")
    result["png"] = png
    return result


CSV_FIELDS = ("panel", "cell", "y", "x", "metric", *(f"{a}_{k}" for a in ARCHS
                                                       for k in ("n", "mean", "ci_low", "ci_high")),
              "diff_n", "diff", "diff_ci_low", "diff_ci_high", "diff_p", "diff_p_holm", "diff_d_z")


def _write_csv(path: Path, result: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for p in result["panels"]:
            for c in p["cells"]:
                for key, m in c["metrics"].items():
                    d = m["diff"]
                    w.writerow([p["name"], c["cell"], c["y"], c["x"], key,
                                *(_c(m[a][k]) for a in ARCHS for k in ("n", "mean", "ci_low",
                                                                        "ci_high")),
                                d["n_a"], *(_c(d[k]) for k in ("diff", "ci_low", "ci_high", "p",
                                                                "p_holm", "effect"))])


def _c(v) -> str:
    return "" if v is None else repr(v)


def pm(s: dict, sep: str = " ") -> str:
    """``mean ± half-width`` of a summary (``sep`` before the ±: ``<br>`` in heat-map cells)."""
    if s.get("mean") is None:
        return "–"
    half = "" if s.get("ci_low") is None else f"{sep}± {(s['ci_high'] - s['ci_low']) / 2:.3f}"
    return f"{s['mean']:.3f}{half}"


def diff_text(d: dict, sep: str = " ") -> str:
    """``+diff* [lo, hi]`` of a paired test; ``*`` where its Holm p < ALPHA."""
    if d["diff"] is None:
        return "–"
    star = "*" if d.get("p_holm") is not None and d["p_holm"] < stats.ALPHA else ""
    ci = "" if d["ci_low"] is None else f"{sep}[{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
    return f"{d['diff']:+.3f}{star}{ci}"


def collapsed(result: dict) -> dict:
    """``{arch: {cell: {"text"|"vae": mean}}}``: cells whose mean minimum capacity rate of text
    or vae is below :data:`COLLAPSE_RATE` (a cell on two heat maps counted once)."""
    out: dict = {a: {} for a in ARCHS}
    for p in result["panels"]:
        for c in p["cells"]:
            for mod in ("text", "vae"):
                for a in ARCHS:
                    mean = c["metrics"][f"cap_min_{mod}"][a]["mean"]
                    if mean is not None and mean < COLLAPSE_RATE:
                        out[a].setdefault(c["cell"], {})[mod] = mean
    return out


def markdown(result: dict, png: list[str] | str) -> str:
    cfg = result["config"]
    lines = [f"# moe-probe reproduce --sweep ({'quick' if cfg['quick'] else 'default'})", "",
             f"Seeds {cfg['seeds']}; every run: its recipe, `--set {' '.join(cfg['size_overrides'])}`"
             f" and its cell's overrides (all runs with their overrides: `sweep.json`). Training "
             f"wall-clock of this invocation: {result['this_invocation_train_s']} s.", "",
             "Cells: moe and symbiotic mean ± half-width of the 95% t interval over seeds; "
             "sym − moe: paired difference over seeds [95% CI], `*` where its Holm p (over the "
             "cells of one heat map) < 0.05. Heat maps: `sweep.html`"
             + (f", {', '.join(png)}." if isinstance(png, list) and png else
                f"; no PNG ({png})."), ""]
    for a, cells in collapsed(result).items():
        where = "; ".join(f"{c} (" + ", ".join(f"{k} {m:.2f}" for k, m in mods.items()) + ")"
                          for c, mods in cells.items()) or "nowhere"
        lines.append(f"- {a}: mean minimum capacity rate below {COLLAPSE_RATE} at: {where}")
    labels = {m["key"]: m["label"] for m in result["metrics"]}
    for p in result["panels"]:
        (yf, _), (xf, _) = p["y"], p["x"]
        lines += ["", f"## {p['title']}", ""]
        for key, label in labels.items():
            lines += [f"### {label}", "", f"| {yf} \\ {xf} | " + " | ".join(
                str(x) for x in p["x"][1]) + " |", "|---" * (len(p["x"][1]) + 1) + "|"]
            for yv in p["y"][1]:
                row = [c for c in p["cells"] if c["y"] == yv]
                lines.append(f"| {yv} | " + " | ".join(
                    f"moe {pm(c['metrics'][key]['moe'])}<br>sym "
                    f"{pm(c['metrics'][key]['symbiotic'])}<br>sym − moe "
                    f"{diff_text(c['metrics'][key]['diff'])}" for c in row) + " |")
            lines.append("")
    return "\n".join(lines)
