"""``moe-probe compare``: one number per run, groups of runs compared across seeds.

    moe-probe compare 'runs/moe-*' 'sym=runs/sym-*' --var routing/capacity_rate --modality text
    moe-probe compare runs/ --by-config --var eval/value --sel metric=text_loss --reduce min

- Groups: each positional ``[NAME=]GLOB`` is one group (every run under each matching
  directory); with ``--by-config`` the runs under the given directories are grouped by their
  config with every ``seed`` key removed (the group's name: the keys where it differs).
- Selection: a store variable ``GROUP/VAR`` (or a ``reproduce`` metric key such as
  ``cap_final_text``), labels by ``--sel DIM=L1,L2`` / ``--modality`` / ``--layer`` (several
  labels are averaged), then a reduction of the per-row series (:mod:`moe_probe.reproduce.metrics`:
  NaN-mean over every non-step dim first): ``final`` = mean of the last N rows (N = ``--last``,
  default 1), ``min`` / ``max`` = extreme of the N-row running mean, ``mean`` = mean of the last
  N rows (default all).
- Statistics (:mod:`moe_probe.stats`): each group against the first (the baseline); paired
  t-test by seed where the two share at least two seeds, Welch otherwise; Holm across the
  comparisons. Markdown on stdout, ``--md`` / ``--json`` / ``--csv`` files.

Bad input (no run for a group, unknown variable or label, fewer than two groups) is one
ValueError line (exit 2).
"""

from __future__ import annotations

import csv
import glob
import json
import math
from pathlib import Path

from moe_probe import stats
from moe_probe.jsonutil import strict_json
from moe_probe.reproduce.metrics import BY_KEY, per_step, reduce
from moe_probe.run import Run, config_diff, find_runs, open_run
from moe_probe.store.schema import GROUPS

REDUCTIONS = ("final", "min", "max", "mean")


def compare(args) -> int:
    sel = _selection(args)
    groups = (_by_config(args.groups) if args.by_config else
              [_glob_group(g) for g in args.groups])
    if len(groups) < 2:
        raise ValueError(f"need at least two groups to compare, got {len(groups)}")
    result = evaluate(groups, sel)
    md = markdown(result)
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n", encoding="utf-8")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(strict_json(result), indent=1, allow_nan=False)
                                       + "\n")
    if args.csv:
        write_csv(Path(args.csv), result)
    return 0


# ----------------------------------------------------------------------------- selection

def _selection(args) -> dict:
    """``{group, var, sel, reduce, last}`` from the flags; ValueError for an unknown variable."""
    if "/" not in args.var:
        if args.var not in BY_KEY:
            raise ValueError(f"unknown variable {args.var!r}: give GROUP/VAR (e.g. "
                             f"routing/capacity_rate) or a reproduce metric key")
        m = BY_KEY[args.var]
        group, var = m.group, m.var
        sel = {d: [v] if isinstance(v, str) else list(v) for d, v in m.sel.items()
               if v != "__layers__"}
    else:
        group, var = args.var.split("/", 1)
        if group not in GROUPS or var not in GROUPS[group]:
            known = ", ".join(f"{g}/{v}" for g in GROUPS for v in GROUPS[g])
            raise ValueError(f"unknown variable {args.var!r}; known: {known}")
        sel = {}
    for item in args.sel:
        dim, eq, labels = item.partition("=")
        if not eq or not labels:
            raise ValueError(f"--sel needs DIM=LABEL[,LABEL...], got {item!r}")
        sel[dim] = labels.split(",")
    for dim in ("modality", "layer"):
        if getattr(args, dim):
            sel[dim] = getattr(args, dim).split(",")
    dims = GROUPS[group][var].dims
    bad = [d for d in sel if d not in dims]
    if bad:
        raise ValueError(f"{group}/{var} has no dim {bad[0]!r} (dims: {', '.join(dims)})")
    if args.last is not None and args.last < 1:
        raise ValueError(f"--last must be >= 1, got {args.last}")
    return {"group": group, "var": var, "sel": sel, "reduce": args.reduce, "last": args.last}


def value(store, s: dict) -> tuple[float, int]:
    """(reduced value, rows it came from) of selection ``s`` on one run; NaN where the run
    lacks the group or variable. Unknown labels raise (a typo, not a missing measurement)."""
    if s["group"] not in store.groups or store.committed_steps(s["group"]) == 0 \
            or not store.measured(s["group"], s["var"]):
        return math.nan, 0
    for dim, labels in s["sel"].items():
        unknown = sorted(set(labels) - set(store.labels(s["group"], dim)))
        if unknown:
            raise ValueError(f"{s['group']}/{s['var']}: no {dim} label {unknown[0]!r} in "
                             f"{store.path} (has {', '.join(store.labels(s['group'], dim))})")
    v = per_step(store.read(s["group"], s["var"], **s["sel"]))
    n = len(v)
    how, w = {"final": ("tail_mean", s["last"] or 1), "min": ("min_window_mean", s["last"] or 1),
              "max": ("max_window_mean", s["last"] or 1),
              "mean": ("tail_mean", s["last"] or n)}[s["reduce"]]
    if how == "max_window_mean":  # the running-mean maximum is the minimum of −v
        return -reduce(-v, "min_window_mean", min(w, n)), n
    return reduce(v, how, min(w, n)), n


# ----------------------------------------------------------------------------- groups

def _glob_group(spec: str) -> dict:
    name, eq, pattern = spec.partition("=")
    if not eq:
        name, pattern = spec, spec
    dirs = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_dir())
    runs = sorted({r for d in dirs for r in find_runs(d)})
    if not runs:
        raise ValueError(f"group {name!r}: {pattern!r} matches no run directory")
    return {"name": name, "pattern": pattern, "runs": runs}


def run_config(path: Path) -> tuple[dict, int | None]:
    """(config without any ``seed`` key, seed) of one run: the training config where the run
    has one, else the store's ``run.config``; the seed as RunInfo reads it."""
    run = Run(path)
    if run.has_config():
        cfg = run.config()
    else:
        raw = (open_run(path).attrs.get("run") or {}).get("config")
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    return _without_seed(cfg), run.info().seed


def _without_seed(cfg):
    if isinstance(cfg, dict):
        return {k: _without_seed(v) for k, v in cfg.items() if k != "seed"}
    return cfg


def _by_config(roots: list[str]) -> list[dict]:
    runs = sorted({r for root in roots for r in find_runs(root)})
    if not runs:
        raise ValueError(f"no run directory under {', '.join(roots)}")
    return group_by_config(runs)


def group_by_config(runs: list[Path]) -> list[dict]:
    """Runs grouped by config without the seed: ``[{name, config, runs}]`` sorted by name; a
    group's name is its value of every config key on which the groups differ ("all" for one
    group). The dashboard's seed bands group the same way."""
    by_key: dict[str, dict] = {}
    for r in runs:
        cfg, _ = run_config(r)
        key = json.dumps(cfg, sort_keys=True)
        by_key.setdefault(key, {"config": cfg, "runs": []})["runs"].append(r)
    groups = list(by_key.values())
    differing = sorted({k for g in groups for h in groups for k in config_diff(g["config"],
                                                                             h["config"])})
    for g in groups:
        g["name"] = ", ".join(f"{k}={_get(g['config'], k)}" for k in differing) or "all"
    return sorted(groups, key=lambda g: g["name"])


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return json.dumps(cfg) if isinstance(cfg, (dict, list)) else cfg


# ----------------------------------------------------------------------------- statistics

def evaluate(groups: list[dict], sel: dict) -> dict:
    """Per-run values, per-group summaries and every group against the first."""
    out_groups = []
    for g in groups:
        rows = []
        for r in g["runs"]:
            v, n_rows = value(open_run(r), sel)
            rows.append({"run": str(r), "seed": run_config(r)[1],
                         "value": v if math.isfinite(v) else None, "rows": n_rows})
        out_groups.append({"name": g["name"], "runs": rows,
                           **stats.summarize([x["value"] for x in rows])})
    base = out_groups[0]
    comps = [_difference(g, base) for g in out_groups[1:]]
    for c, p in zip(comps, stats.holm([c["p"] for c in comps])):
        c["p_holm"] = p
        sign = stats.direction(c, p)
        c["result"] = {1: "higher", -1: "lower", 0: "no significant difference"}[sign]
    return {"selection": sel, "baseline": base["name"], "groups": out_groups,
            "comparisons": comps}


def _difference(g: dict, base: dict) -> dict:
    """g − base: paired by seed unless a side has a seed twice or none."""
    def by_seed(grp):
        seeds = [x["seed"] for x in grp["runs"]]
        if None in seeds or len(set(seeds)) != len(seeds):
            return None
        return {x["seed"]: x["value"] for x in grp["runs"]}

    a, b = by_seed(g), by_seed(base)
    test = (stats.difference(a, b) if a is not None and b is not None else
            stats.welch([x["value"] for x in g["runs"]], [x["value"] for x in base["runs"]]))
    return {"group": g["name"], "baseline": base["name"], **test}


# ----------------------------------------------------------------------------- output

def _f(v, digits=4) -> str:
    return "–" if v is None else f"{v:.{digits}g}"


def describe(sel: dict) -> str:
    labels = "".join(f" {d}={','.join(v)}" for d, v in sel["sel"].items())
    last = f" over the last {sel['last']} rows" if sel["last"] else ""
    return f"{sel['group']}/{sel['var']}{labels}, {sel['reduce']}{last}"


def markdown(result: dict) -> str:
    lines = [f"# moe-probe compare: {describe(result['selection'])}", "",
             "| group | runs | n | mean | 95% CI |", "|---|---|---|---|---|"]
    for g in result["groups"]:
        lines.append(f"| {g['name']} | {len(g['runs'])} | {g['n']} | {_f(g['mean'])} | "
                     f"[{_f(g['ci_low'])}, {_f(g['ci_high'])}] |")
    lines += ["", f"Differences group − {result['baseline']} (paired t by seed where the groups "
              "share seeds, Welch otherwise; Holm across the comparisons):", "",
              "| group | test | n | diff | 95% CI | t | df | p | Holm p | effect | result |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        n = c["n_a"] if c["test"] == "paired" else f"{c['n_a']}/{c['n_b']}"
        eff = f"{c['effect_name']} {_f(c['effect'], 3)}" if c["effect"] is not None else "–"
        lines.append(f"| {c['group']} | {c['test']} | {n} | {_f(c['diff'])} | "
                     f"[{_f(c['ci_low'])}, {_f(c['ci_high'])}] | {_f(c['t'], 3)} | "
                     f"{_f(c['df'], 3)} | {_f(c['p'], 3)} | {_f(c['p_holm'], 3)} | {eff} | "
                     f"{c['result']} |")
    return "\n".join(lines)


CSV_FIELDS = ("group", "baseline", "test", "n_group", "n_baseline", "mean_group",
              "mean_baseline", "diff", "ci_low", "ci_high", "t", "df", "p", "p_holm",
              "effect_name", "effect", "result")


def write_csv(path: Path, result: dict) -> None:
    """One row per comparison."""
    means = {g["name"]: g["mean"] for g in result["groups"]}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for c in result["comparisons"]:
            w.writerow([c["group"], c["baseline"], c["test"], c["n_a"], c["n_b"],
                        *("" if v is None else repr(v) for v in (
                            means[c["group"]], means[c["baseline"]], c["diff"], c["ci_low"],
                            c["ci_high"], c["t"], c["df"], c["p"], c["p_holm"])),
                        c["effect_name"], "" if c["effect"] is None else repr(c["effect"]),
                        c["result"]])
