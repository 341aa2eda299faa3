"""Results table: every metric of every run, mean and t-based 95% CI over seeds per kind.

Written as ``results.json`` (everything, with per-seed values and each cell's sources),
``results.csv`` (one row per kind × metric) and ``results.md`` (with the claims). Numbers come
only from the stores (:mod:`moe_probe.reproduce.metrics`); nothing is carried over from
training summaries, so a reader can recompute each cell from ``sources``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from tqdm import tqdm

from moe_probe.reproduce.metrics import METRICS, measure
from moe_probe.stats import summarize

def collect(plan, out: Path) -> dict:
    """``{kind: {metric: cell}}`` read from the stores of ``plan`` (runs relative to ``out``)."""
    from moe_probe import open_run

    cells: dict[str, dict[str, dict]] = {}
    raw: dict[tuple[str, str], list] = {}
    for spec in tqdm(plan, desc="reading stores", unit="run", dynamic_ncols=True):
        store = open_run(spec.run_dir)
        run = spec.run_dir.relative_to(out).as_posix()
        datasets: dict = {}
        for m in METRICS:
            value, source = measure(store, run, m, datasets)
            raw.setdefault((spec.kind.name, m.key), []).append(
                ({"run": run, "seed": spec.seed, "value": _json_num(value)}, source))
    for (kind, key), items in raw.items():
        cell = summarize([it[0]["value"] for it in items])
        cell["values"] = [it[0] for it in items]
        cell["sources"] = [it[1] for it in items]
        cells.setdefault(kind, {})[key] = cell
    return cells


def _json_num(v: float):
    return None if v is None or not math.isfinite(v) else float(v)


def fmt(cell: dict, digits: int = 3) -> str:
    """``mean ± half-width`` (``mean`` alone when n < 2, ``–`` when nothing was measured)."""
    if not cell or cell["mean"] is None:
        return "–"
    s = f"{cell['mean']:.{digits}f}"
    if cell["ci_low"] is not None:
        s += f" ± {(cell['ci_high'] - cell['ci_low']) / 2:.{digits}f}"
    return s


def markdown_tables(kinds, cells: dict, n_seeds: int) -> str:
    """One sub-table per metric section; a cell's n is shown where it is not ``n_seeds``."""
    sections: dict[str, list] = {}
    for m in METRICS:
        sections.setdefault(m.section, []).append(m)
    parts = []
    for section, metrics in sections.items():
        head = "| kind | " + " | ".join(f"{m.label} ({'↑' if m.better == 'high' else '↓'})"
                                         for m in metrics) + " |"
        rows = [head, "|" + "---|" * (len(metrics) + 1)]
        for k in kinds:
            vals = []
            for m in metrics:
                c = cells.get(k.name, {}).get(m.key)
                s = fmt(c)
                if c and c["mean"] is not None and c["n"] != n_seeds:
                    s += f" (n={c['n']})"
                vals.append(s)
            rows.append(f"| {k.name} | " + " | ".join(vals) + " |")
        parts.append(f"### {section.capitalize()}\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


CSV_FIELDS = ("kind", "metric", "n", "mean", "ci_low", "ci_high", "sd", "values")


def write_csv(path: Path, kinds, cells: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for k in kinds:
            for m in METRICS:
                c = cells[k.name][m.key]
                vals = ";".join("" if v["value"] is None else repr(v["value"]) for v in c["values"])
                w.writerow([k.name, m.key, c["n"], *(("" if c[x] is None else repr(c[x]))
                                                    for x in ("mean", "ci_low", "ci_high", "sd")),
                            vals])
