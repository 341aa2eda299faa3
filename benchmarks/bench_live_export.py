"""Cost of live export (``--report-to``) on a training step, measured side by side in one process.

The same optimizer step (forward, backward, AdamW step) of moe_probe's own model, traced by a
real :class:`TraceSession` (routing every step, the default tracing of a run's steps) into a real
store, in three variants:

- ``store``: the store only (every run does this);
- ``tb``:    plus live TensorBoard (``moe_probe.export.live``);
- ``all``:   plus live TensorBoard, W&B (offline) and MLflow (a local file store).

All variants drive ONE model and optimizer; repeats are interleaved, the order rotating each
repeat, so drifts in machine load hit all alike. Per variant, for two clocks — process CPU time
(all threads of this process, the export thread included; W&B's own service process is not) and
wall time: the mean time per step over all repeats (the export thread works in bursts every
``flush_secs``, which a median over repeats would skip), its ratio against ``store``, and the
median of paired per-repeat ratios. Then the export's own cost, isolated: the process CPU time
of summarising and sending ``--isolated`` steps of the model's real rows (no training alongside),
per step and as a share of the ``store`` step. Target: ≤ 1.02.

    OMP_NUM_THREADS=1 python benchmarks/bench_live_export.py [--recipe symbiotic] [--reps 30]
        [--set model.n_layers=8 --set model.d_model=256 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_tracing import interleaved, traced_step

from moe_probe.data import MultimodalData
from moe_probe.export.live import Report
from moe_probe.model.params import n_params as count_params
from moe_probe.overrides import apply_overrides
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.config import TraceConfig
from moe_probe.trace.layout import store_layout
from moe_probe.trace.session import TraceSession
from moe_probe.trace.watch import NullWriter
from moe_probe.train.recipes import recipe

TRACE = TraceConfig(routing_every=1, grad_every=0, snapshot=False, probe_every=0)
VARIANTS = {"store": (), "tb": ("tensorboard",), "all": ("tensorboard", "wandb", "mlflow")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="symbiotic", help="demo recipe whose model/batch size to use")
    ap.add_argument("--reps", type=int, default=30, help="interleaved repeats per variant")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per repeat")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--isolated", type=int, default=2000, help="steps of the isolated export cost")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override, e.g. model.n_layers=8 (a larger model)")
    args = ap.parse_args()
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", MLFLOW_ALLOW_FILE_STORE="true")

    cfg = apply_overrides(recipe(args.recipe), args.overrides)
    data = MultimodalData(cfg.data, 0)
    from moe_probe.model import MultimodalMoE

    torch.manual_seed(0)
    model = MultimodalMoE(cfg.model if cfg.model.arch != "symbiotic" else
                          replace(cfg.model, groups=None), data.tokenizer.vocab_size).to(args.device)
    model.set_shield(0.1)
    g = torch.Generator().manual_seed(0)
    batches = [data.batch("train", cfg.train.batch_size, g).to(args.device) for _ in range(args.steps)]
    print(f"model: {cfg.model.arch}, d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, "
          f"{cfg.model.n_experts} experts, {count_params(model) / 1e6:.2f} M params; batch "
          f"{cfg.train.batch_size} x seq {cfg.data.seq_len}; torch threads "
          f"{torch.get_num_threads()}, device {args.device}")

    tmp = tempfile.TemporaryDirectory()
    os.environ["WANDB_DIR"] = tmp.name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    attrs, coords = store_layout(model, eval_metrics=["x"])
    sessions = {}
    for name, tools in VARIANTS.items():
        path = Path(tmp.name) / name
        writer = StoreWriter.create(path, attrs={"run": {"name": name}, **attrs}, coords=coords)
        if tools:
            report = Report.parse(tools, tensorboard_dir=str(path.with_suffix(".tb")),
                                  mlflow_uri=(Path(tmp.name) / "mlruns").as_uri()).check()
            writer = report.open(writer, path)
        sessions[name] = TraceSession(model, TRACE, writer)
    step_no = {name: 0 for name in sessions}

    def run_steps(name: str) -> tuple[float, float]:
        session = sessions[name]
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches:
            traced_step(model, session, opt, step_no[name], [b])
            step_no[name] += 1
        if args.device != "cpu":
            torch.cuda.synchronize()
        return (time.process_time() - c0) / args.steps, (time.perf_counter() - t0) / args.steps

    keep = _Keep(coords)  # one step's real rows, for the isolated cost
    with TraceSession(model, TRACE, keep) as session:
        traced_step(model, session, opt, 0, batches[:1])
    rows = keep.rows

    names = list(sessions)
    cpu, wall = interleaved(run_steps, names, args.reps)
    for session in sessions.values():
        session.close()

    for clock, times in (("cpu", cpu), ("wall", wall)):
        mean = {n: statistics.fmean(t) for n, t in times.items()}
        for name in names:
            print(f"{clock:>4} {name:>6}: mean {mean[name] * 1e3:7.2f} ms/step  (median "
                  f"{statistics.median(times[name]) * 1e3:.2f}; {len(times[name])} x {args.steps} "
                  "steps)")
        for name in names[1:]:
            paired = statistics.median(a / b for a, b in zip(times[name], times["store"]))
            print(f"{clock:>4} ratio {name}/store: {mean[name] / mean['store']:.3f} (median of "
                  f"paired ratios {paired:.3f}; target <= 1.02)")
    step_cpu = statistics.fmean(cpu["store"])
    for name, tools in {**{t: (t,) for t in VARIANTS["all"]}, "all": VARIANTS["all"]}.items():
        per_step = _isolated(Path(tmp.name) / f"iso-{name}", tools, attrs, coords, rows,
                             args.isolated)
        print(f"isolated {name:>11}: {per_step * 1e6:6.0f} us CPU per step exported = "
              f"{per_step / step_cpu * 100:.2f}% of a store step ({step_cpu * 1e3:.1f} ms CPU)")
    tmp.cleanup()


class _Keep(NullWriter):
    """Keeps the last row of each group instead of writing it."""

    def __init__(self, coords):
        super().__init__(coords)
        self.rows: dict = {}

    def append(self, group: str, step: int, **arrays) -> None:
        self.rows[group] = arrays


def _isolated(path: Path, tools, attrs, coords, rows: dict, n: int) -> float:
    """Process CPU seconds per step to hand ``n`` steps of ``rows`` to a live export and send
    them (store writes included, subtracted by a store-only pass of the same rows)."""
    def run(report_tools) -> float:
        sub = path.with_name(path.name + ("-live" if report_tools else "-store"))
        writer = StoreWriter.create(sub, attrs={"run": {"name": sub.name}, **attrs}, coords=coords)
        if report_tools:
            writer = Report.parse(report_tools, tensorboard_dir=str(sub.with_suffix(".tb")),
                                  mlflow_uri=(sub.parent / "mlruns-iso").as_uri()).check() \
                .open(writer, sub)
        c0 = time.process_time()
        for step in range(n):
            for group, arrays in rows.items():
                writer.append(group, step, **arrays)
        writer.close()
        return time.process_time() - c0

    return (run(tools) - run(())) / n


if __name__ == "__main__":
    main()
