"""`moe-probe export RUN --tensorboard DIR | --wandb | --mlflow URI`.

Reads the run's committed rows (a live run exports what is committed so far), summarises them
(``moe_probe.summary``) and writes the summary into each tool chosen. Bad input (no such run, no
tool chosen, an unreachable or invalid URI, a missing client package) raises ValueError: one
line, exit 2.
"""

from __future__ import annotations

import sys
import time

from moe_probe.export.history import read_summary
from moe_probe.export.sinks import to_mlflow, to_tensorboard, to_wandb
from moe_probe.store.reader import tune_reads


def export(args) -> int:
    tune_reads()
    if not (args.tensorboard or args.wandb or args.mlflow):
        raise ValueError("choose where to export: --tensorboard DIR, --wandb or --mlflow URI")
    t0 = time.perf_counter()
    s = read_summary(args.run_dir, findings=not args.no_findings)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    say(f"{s.name}: {len(s.keys)} keys × {s.steps.size} steps read in "
        f"{time.perf_counter() - t0:.1f} s")
    if args.tensorboard:
        t = time.perf_counter()
        print(f"tensorboard: {to_tensorboard(s, args.tensorboard)}")
        say(f"  tensorboard written in {time.perf_counter() - t:.1f} s")
    if args.wandb:
        t = time.perf_counter()
        print(f"wandb: {to_wandb(s, project=args.wandb_project)}")
        say(f"  wandb written in {time.perf_counter() - t:.1f} s")
    if args.mlflow:
        t = time.perf_counter()
        print(f"mlflow: {args.mlflow} run {to_mlflow(s, args.mlflow, experiment=args.experiment)}")
        say(f"  mlflow written in {time.perf_counter() - t:.1f} s")
    return 0
