"""``moe-probe train`` and ``moe-probe info`` (parser: :mod:`moe_probe.cli`).

User errors raise ValueError with one line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from moe_probe.jsonutil import strict_json
from moe_probe.overrides import apply_overrides
from moe_probe.run import Run, config_diff
from moe_probe.train.config import run_config_from_json, to_dict, validate


RESUMABLE = ("train.", "trace.")
"""Config keys a resumed run may change (the schedule and what is traced); what was built into
the weights (recipe, model, data, seed, the base) may not."""


def resolve_config(args):
    """The RunConfig a ``train`` invocation means, its Run, and how to begin: ``"new"``,
    ``"start_over"`` (a run that died before its first checkpoint) or ``"resume"``.

    Without --resume a run directory must not hold a run yet. With --resume the saved config
    plus --steps / --set is the config, and it may differ from the saved one only in
    :data:`RESUMABLE` keys; --resume of a directory that holds no run starts a new one (a run
    killed while it was being created left nothing)."""
    from moe_probe.train import recipes

    run = Run(args.out or f"runs/{args.recipe}-s{args.seed or 0}")
    run.check_writable()
    if run.exists() and not args.resume:
        raise ValueError(f"{run.path} already holds a run; use --resume or another --out")
    if run.path.is_dir() and not run.exists() and any(run.path.iterdir()):
        raise ValueError(f"--out {run.path} holds files that are not a moe-probe run; "
                         "choose an empty or new directory")
    if args.resume and run.exists():
        if not run.has_config():
            raise ValueError(f"cannot resume {run.path}: it holds a store but no training config "
                             "(e.g. an HF scan)")
        saved = run_config_from_json(json.dumps(run.config()))
        if args.recipe != saved.recipe:
            raise ValueError(f"cannot resume {run.path}: config differs in recipe "
                             f"({saved.recipe!r} saved, {args.recipe!r} given)")
        if args.seed is not None and args.seed != saved.train.seed:
            raise ValueError(f"cannot resume {run.path}: config differs in train.seed "
                             f"({saved.train.seed} saved, {args.seed} given)")
        cfg, how = saved, ("resume" if run.has_checkpoint() else "start_over")
    else:
        cfg, how = recipes.recipe(args.recipe, seed=args.seed or 0), "new"
    if args.steps is not None:
        if args.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {args.steps}")
        cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
    cfg = validate(apply_overrides(cfg, list(args.overrides)))
    if how != "new":
        fixed = [k for k in config_diff(to_dict(saved), to_dict(cfg))
                 if not k.startswith(RESUMABLE)]
        if fixed:
            raise ValueError(f"cannot resume {run.path}: config differs in {', '.join(fixed)} "
                             "(only train.* and trace.* may change on resume)")
    return cfg, run, how


def _check_world(cfg, world: int) -> None:
    """Under torchrun the global batch is train.batch_size, split over ranks and micro-batches."""
    for name, tc in (("train", cfg.train), ("base", cfg.base)):
        if tc is not None and world > 1 and tc.batch_size % (world * tc.micro_batches):
            raise ValueError(f"{name}.batch_size ({tc.batch_size}) must be divisible by the number "
                             f"of processes × {name}.micro_batches ({world} × {tc.micro_batches})")


def train(args) -> int:
    # Under torchrun every rank checks before the process group exists: joining it is a
    # rendezvous, so no rank can have written anything yet.
    cfg, run, how = resolve_config(args)
    run_dir = run.path
    report = _report(args)
    # torch: only once the input is known good
    from moe_probe.train.distributed import env_world_size, process_group
    from moe_probe.train.stages import train_run

    _check_world(cfg, env_world_size())

    from moe_probe.trace.online import StopTraining

    fail_on = getattr(args, "fail_on", None)
    if fail_on and not (cfg.trace.enabled and cfg.trace.routing_every > 0):
        raise ValueError("--fail-on diagnoses the routing rows: it needs trace.enabled=true and "
                         "trace.routing_every > 0")
    with process_group() as dist:
        log = (lambda *a, **k: None) if args.quiet or not dist.is_main else print
        try:
            summary = train_run(cfg, run_dir, how=how, quiet=args.quiet, log=log, dist=dist,
                                fail_on=fail_on, report=report)
        except StopTraining as e:
            if dist.is_main:  # the store is flushed and the checkpoint written at the stop
                print(f"moe-probe train: --fail-on {fail_on}: {e} (checkpoint at step "
                      f"{e.step + 1}; continue with --resume)", file=sys.stderr)
            return 1
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


def _report(args):
    """The checked ``--report-to`` settings (a missing client is refused before training), or
    None."""
    if not getattr(args, "report_to", None):
        return None
    from moe_probe.export.live import Report

    return Report.parse(args.report_to, tensorboard_dir=args.tensorboard_dir,
                        mlflow_uri=args.mlflow_uri, wandb_project=args.wandb_project).check()


def run_info(run_dir: Path) -> dict:
    """What a run holds, as plain data (``info --json`` prints this)."""
    return Run(run_dir).info().as_dict()


def info(args) -> int:
    data = run_info(args.run_dir)  # a path or a URL
    if args.json:
        print(json.dumps(strict_json(data), indent=2, allow_nan=False))
        return 0
    print(f"run          {data['path']}  (recipe {data['recipe']}, seed {data['seed']}, "
          f"stage {data['stage']})")
    print(f"arch         {data['arch']}  ({data['n_params']:,} parameters)" if data["n_params"]
          else f"arch         {data['arch']}")
    planned = f" of {data['steps_planned']}" if data["steps_planned"] is not None else ""
    print(f"steps        {data['steps_done']}{planned}")
    cf = data["capacity_factor"]
    print(f"layers       {len(data['layers'])}, {data['experts']} routed experts"
          f"{' (both towers)' if data['arch'] == 'mot' else ''}, top-{data['top_k']}, "
          f"{data['shared_experts']} shared, capacity factor {cf if cf is not None else 'dropless'}")
    for layer, g in (data["groups"] or {}).items():
        print(f"groups L{layer:<8} " + "  ".join(f"{name} {ids}" for name, ids in g.items()))
    if data["base"]:
        print(f"base         {data['base']['dir']}")
    if data["eval"]:
        print("eval         " + "  ".join(f"{k} {v:.4g}" if v is not None else f"{k} n/a"
                                          for k, v in data["eval"].items()))
    if data["committed"]:
        print("store        " + "  ".join(f"{g} {n}" for g, n in data["committed"].items()))
    if data["modalities"]:
        print("modalities   " + ", ".join(data["modalities"]))
    return 0
