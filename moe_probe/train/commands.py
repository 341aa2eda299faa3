"""``moe-probe train`` and ``moe-probe info`` (parser: :mod:`moe_probe.cli`).

User errors raise ValueError with one line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from moe_probe.jsonutil import strict_json
from moe_probe.overrides import apply_overrides
from moe_probe.train.config import run_config_from_json, to_dict, validate


def _load_saved_config(run_dir: Path):
    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a moe-probe run (no config.json)")
    return run_config_from_json(path.read_text())


def resolve_config(args):
    """The RunConfig a ``train`` invocation means: recipe (or the saved run) + --steps + --set."""
    from moe_probe.train import recipes
    from moe_probe.train.checkpoint import checkpoint_path

    run_dir = Path(args.out or f"runs/{args.recipe}-s{args.seed}")
    if args.resume:
        if not checkpoint_path(run_dir).is_file():
            hint = (" (the run stopped before its first checkpoint; remove the directory to "
                    "start over)" if (run_dir / "config.json").is_file() else "")
            raise ValueError(f"cannot resume: no checkpoint in {run_dir}{hint}")
        cfg = _load_saved_config(run_dir)
        if cfg.recipe != args.recipe:
            raise ValueError(f"{run_dir} was trained with recipe {cfg.recipe!r}, not {args.recipe!r}")
    else:
        cfg = recipes.recipe(args.recipe, seed=args.seed)
    if args.steps is not None:
        if args.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {args.steps}")
        cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
    cfg = apply_overrides(cfg, list(args.overrides))
    if args.resume:
        saved = _load_saved_config(run_dir)
        # What was built into the weights cannot change on resume; the schedule may.
        if to_dict(cfg.model) != to_dict(saved.model) or to_dict(cfg.data) != to_dict(saved.data):
            raise ValueError("--resume cannot change model.* or data.* settings")
    return validate(cfg), run_dir


def _check_world(cfg, world: int) -> None:
    """Under torchrun the global batch is train.batch_size, split over ranks and micro-batches."""
    for name, tc in (("train", cfg.train), ("base", cfg.base)):
        if tc is not None and world > 1 and tc.batch_size % (world * tc.micro_batches):
            raise ValueError(f"{name}.batch_size ({tc.batch_size}) must be divisible by the number "
                             f"of processes × {name}.micro_batches ({world} × {tc.micro_batches})")


def train(args) -> int:
    cfg, run_dir = resolve_config(args)
    # Under torchrun every rank checks before the process group exists: joining it is a
    # rendezvous, so no rank can have written anything yet.
    if not args.resume and any((run_dir / f).exists() for f in ("config.json", "traces.zarr")):
        raise ValueError(f"{run_dir} already holds a run; use --resume or another --out")
    # torch: only once the input is known good
    from moe_probe.train.distributed import env_world_size, process_group
    from moe_probe.train.stages import train_run

    _check_world(cfg, env_world_size())

    with process_group() as dist:
        log = (lambda *a, **k: None) if args.quiet or not dist.is_main else print
        summary = train_run(cfg, run_dir, resume=args.resume, quiet=args.quiet, log=log, dist=dist)
    if not dist.is_main:
        return 0
    ev = summary.get("eval", {})
    print(f"run: {run_dir}  ({cfg.recipe}, arch {cfg.model.arch}, {summary.get('steps')} steps)")
    if ev:
        print("eval: " + "  ".join(f"{k} {v:.4g}" for k, v in ev.items()))
    print("next:")
    print(f"  moe-probe info {run_dir}")
    print(f"  moe-probe diagnose {run_dir} --html report.html")
    print(f"  moe-probe dash {run_dir.parent}")
    return 0


def run_info(run_dir: Path) -> dict:
    """What a run holds, as plain data (``info --json`` prints this)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"no run directory {run_dir}")
    if not (run_dir / "config.json").is_file() and (run_dir / "traces.zarr").exists():
        return _store_only_info(run_dir)
    cfg = _load_saved_config(run_dir)
    summary_path = run_dir / "run.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    progress = run_dir / "progress.json"
    m = cfg.model
    info = {
        "run_dir": str(run_dir),
        "recipe": cfg.recipe,
        "arch": m.arch,
        "stage": cfg.train.stage,
        "seed": cfg.train.seed,
        "n_params": summary.get("n_params"),
        "steps_done": json.loads(progress.read_text())["step"] if progress.is_file() else 0,
        "steps_planned": cfg.train.steps,
        "layers": m.n_layers,
        "experts": m.n_experts,
        "top_k": m.top_k,
        "capacity_factor": m.capacity_factor,
        "shared_experts": m.n_shared,
        "groups": _groups_view(cfg),
        "base": summary.get("base"),
        "eval": summary.get("eval"),
        "wall_s": summary.get("wall_s"),
        "committed_steps": _committed(run_dir),
    }
    return info


def _store_only_info(run_dir: Path) -> dict:
    """A run with a store but no training config (``moe-probe scan`` of a HF model)."""
    from moe_probe import open_run

    store = open_run(run_dir)
    s = store.info()
    model = store.attrs.get("model", {}) or {}
    last = max((v for v in s["last_step"].values() if v is not None), default=None)
    return {
        "run_dir": str(run_dir), "recipe": s["recipe"], "arch": s["arch"], "stage": None,
        "seed": s["seed"], "n_params": s["n_params"],
        "steps_done": (last + 1) if last is not None else 0, "steps_planned": None,
        "layers": s["layers"], "experts": s["experts"], "top_k": s["top_k"],
        "capacity_factor": s["capacity_factor"], "shared_experts": model.get("shared_experts"),
        "groups": None, "base": None, "eval": None, "wall_s": None,
        "committed_steps": s["committed_steps"],
    }


def _groups_view(cfg) -> dict | None:
    m = cfg.model
    if m.arch == "symbiotic":
        und_gen = m.layer_groups()
        return {str(i): {"und": list(u), "gen": list(g)} for i, (u, g) in enumerate(und_gen)}
    if m.arch == "mot":
        e = m.n_experts
        return {str(i): {"und": list(range(e)), "gen": list(range(e, 2 * e))}
                for i in range(m.n_layers)}
    return None


def _committed(run_dir: Path) -> dict[str, int] | None:
    if not (run_dir / "traces.zarr").exists():
        return None
    from moe_probe import open_run

    store = open_run(run_dir)
    return {g: int(store.committed_steps(g)) for g in store.groups}


def info(args) -> int:
    data = run_info(Path(args.run_dir))
    if args.json:
        print(json.dumps(strict_json(data), indent=2, allow_nan=False))
        return 0
    print(f"run          {data['run_dir']}  (recipe {data['recipe']}, seed {data['seed']}, "
          f"stage {data['stage']})")
    print(f"arch         {data['arch']}  ({data['n_params']:,} parameters)" if data["n_params"]
          else f"arch         {data['arch']}")
    planned = f" of {data['steps_planned']}" if data["steps_planned"] is not None else ""
    print(f"steps        {data['steps_done']}{planned}")
    cf = data["capacity_factor"]
    print(f"layers       {data['layers']}, {data['experts']} routed experts"
          f"{' per tower' if data['arch'] == 'mot' else ''}, top-{data['top_k']}, "
          f"{data['shared_experts']} shared, capacity factor {cf if cf is not None else 'dropless'}")
    if data["groups"]:
        for layer, g in data["groups"].items():
            print(f"groups L{layer:<8} und {g['und']}  gen {g['gen']}")
    if data["base"]:
        print(f"base         {data['base']['dir']}")
    if data["eval"]:
        print("eval         " + "  ".join(f"{k} {v:.4g}" if v is not None else f"{k} n/a"
                                          for k, v in data["eval"].items()))
    if data["committed_steps"] is not None:
        print("store        " + "  ".join(f"{g} {n}" for g, n in data["committed_steps"].items()))
    else:
        print("store        (no traces.zarr)")
    return 0
