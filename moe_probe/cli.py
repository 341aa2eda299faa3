"""`moe-probe` command line (contract: ARCHITECTURE.md, "CLI contract").

Exit codes: 0 ok, 1 a finding with ``--fail-on``, 2 bad input (one line on stderr, no
traceback). Each subcommand's work lives beside its part (``moe_probe/<part>/commands.py``);
this file only parses arguments and maps user errors to exit code 2.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A user error: printed as one line, exit code 2. Raise it (or ValueError) from commands."""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-probe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe and write RUN_DIR/traces.zarr")
    t.add_argument("--recipe", required=True)
    t.add_argument("--steps", type=int, default=None,
                   help="steps of this stage (stage 1 of a stage-2 recipe: --set base.steps=N)")
    t.add_argument("--out", default=None, help="run directory (default runs/<recipe>-s<seed>)")
    t.add_argument("--seed", type=int, default=None, help="default 0 (a resumed run keeps its own)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--fail-on", choices=["collapse", "conflict", "any"], default=None,
                   help="diagnose online every 10 steps; at the first critical finding of this "
                        "kind checkpoint, stop and exit 1")
    t.add_argument("--report-to", default=None, metavar="TOOLS",
                   help="send each step's bounded summary live: tensorboard,wandb,mlflow")
    t.add_argument("--tensorboard-dir", default=None, metavar="DIR",
                   help="TensorBoard log directory (default RUN_DIR/tb)")
    t.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    t.add_argument("--wandb-project", default=None,
                   help="W&B project (default $WANDB_PROJECT, else moe-probe)")

    i = sub.add_parser("info", help="what a run holds")
    i.add_argument("run_dir", help="a run directory or its URL (s3://bucket/runs/name)")
    i.add_argument("--json", action="store_true")

    d = sub.add_parser("diagnose", help="collapse / conflict diagnosis of one or more runs")
    d.add_argument("run_dirs", nargs="+", help="run directories or their URLs (s3://…)")
    d.add_argument("--html", default=None)
    d.add_argument("--json", dest="json_out", default=None)
    d.add_argument("--control", default=None, help="an understanding-only control run")
    d.add_argument("--fail-on", choices=["collapse", "conflict", "any"], default=None)
    d.add_argument("--full-resolution", action="store_true",
                   help="read every row instead of screening through the rollup levels "
                        "(same findings; slower)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a detector threshold, e.g. collapse_rate=0.7 window=50 "
                        "(moe_probe/diagnose/config.py lists them)")

    pr = sub.add_parser("probe", help="shared-expert probes on a saved checkpoint")
    pr.add_argument("run_dir")
    pr.add_argument("--step", type=int, default=None)
    pr.add_argument("--tasks", nargs="*", default=None)

    s = sub.add_parser("scan", help="trace a Hugging Face MoE model on text")
    s.add_argument("--model", required=True, help="local model directory or config JSON")
    s.add_argument("--text", required=True,
                   help='a text file (modality `text`), or a .jsonl of typed segments '
                        '{"type": KIND, "text": ...} per line: each token\'s modality is its KIND')
    s.add_argument("--text-b", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--capacity-factor", type=float, default=1.0)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--max-batches", type=int, default=None)
    s.add_argument("--advise-groups", default=None, metavar="JSON",
                   help="write a Symbiotic-MoE expert partition proposal here")
    s.add_argument("--und-fraction", type=float, default=0.75)
    s.add_argument("--structural", action="store_true",
                   help="find routers by structure only (ignore the known-family table)")
    s.add_argument("--quiet", action="store_true")

    da = sub.add_parser("dash", help="interactive routing dashboard")
    da.add_argument("root", nargs="?", default="runs",
                    help="a directory of runs, or a URL prefix (s3://bucket/runs)")
    da.add_argument("--host", default="127.0.0.1")
    da.add_argument("--port", type=int, default=8050)
    da.add_argument("--refresh", type=float, default=5.0, help="live refresh interval, seconds")

    e = sub.add_parser("export", help="a run's bounded summary into TensorBoard, W&B or MLflow")
    e.add_argument("run_dir")
    e.add_argument("--tensorboard", default=None, metavar="DIR", help="log directory to write")
    e.add_argument("--wandb", action="store_true",
                   help="a new W&B run (mode, entity, directory: W&B's own settings)")
    e.add_argument("--wandb-project", default=None,
                   help="W&B project (default $WANDB_PROJECT, else moe-probe)")
    e.add_argument("--mlflow", default=None, metavar="URI", help="MLflow tracking URI")
    e.add_argument("--experiment", default="moe-probe", help="MLflow experiment name")
    e.add_argument("--no-findings", action="store_true",
                   help="skip the diagnosis (the two findings keys)")
    e.add_argument("--quiet", action="store_true", help="no timings on stderr")

    ru = sub.add_parser("rollup", help="add the rollup levels to a run's store (older stores)")
    ru.add_argument("run_dir")

    pu = sub.add_parser("publish", help="copy a local run to a bucket so that readers of the "
                                        "URL only ever see committed rows (live runs too)")
    pu.add_argument("run_dir")
    pu.add_argument("url", help="e.g. s3://bucket/runs/name (endpoint, credentials: AWS_* env)")
    pu.add_argument("--every", type=float, default=None, metavar="S",
                    help="publish again every S seconds (changed files only) until interrupted")

    r = sub.add_parser("reproduce", help="the paper's experiment at CPU scale")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--seeds", type=int, default=None)
    r.add_argument("--jobs", type=int, default=None,
                   help="runs trained side by side (default $MOE_PROBE_JOBS, else 1 with "
                        "--quick and min(2, cores) otherwise)")
    r.add_argument("--sweep", action="store_true",
                   help="the map of where collapse appears (moe and symbiotic over gen-token "
                        "share, gen LR and capacity factor) instead of the paper's study")
    r.add_argument("--out", required=True)

    c = sub.add_parser("compare", help="groups of runs compared across seeds (paired t / Welch)")
    c.add_argument("groups", nargs="+", metavar="[NAME=]GLOB",
                   help="one group per glob of run directories (with --by-config: directories "
                        "whose runs are grouped by config without the seed)")
    c.add_argument("--by-config", action="store_true",
                   help="group the runs under the given directories by config minus seed")
    c.add_argument("--var", required=True,
                   help="GROUP/VAR (e.g. routing/capacity_rate, eval/value) or a reproduce "
                        "metric key (e.g. cap_final_text)")
    c.add_argument("--sel", action="append", default=[], metavar="DIM=L1[,L2]",
                   help="label selection (several labels are averaged)")
    c.add_argument("--modality", default=None, help="shorthand for --sel modality=...")
    c.add_argument("--layer", default=None, help="shorthand for --sel layer=...")
    c.add_argument("--reduce", choices=["final", "min", "max", "mean"], default="final")
    c.add_argument("--last", type=int, default=None, metavar="N",
                   help="rows: final/mean over the last N, min/max of the N-row running mean")
    c.add_argument("--md", default=None, help="also write the Markdown here")
    c.add_argument("--json", dest="json_out", default=None)
    c.add_argument("--csv", default=None)
    return p


_COMMANDS = {
    "train": "moe_probe.train.commands:train",
    "info": "moe_probe.train.commands:info",
    "diagnose": "moe_probe.diagnose.commands:diagnose",
    "probe": "moe_probe.train.probe:probe",
    "scan": "moe_probe.hf.commands:scan",
    "dash": "dashboards.app:serve",
    "reproduce": "moe_probe.reproduce.commands:reproduce",
    "export": "moe_probe.export.commands:export",
    "rollup": "moe_probe.rollup_command:rollup",
    "publish": "moe_probe.publish:command",
    "compare": "moe_probe.compare:compare",
}


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    module_name, func_name = _COMMANDS[args.command].split(":")
    try:
        import importlib

        module = importlib.import_module(module_name)
        rc = getattr(module, func_name)(args)
        return int(rc or 0)
    except (UsageError, ValueError, FileNotFoundError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"moe-probe {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `moe-probe info RUN --json | head`: the reader left; not an error of ours.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"moe-probe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
