"""``moe-probe probe RUN_DIR [--step N] [--tasks …]``: the shared-expert probes on a checkpoint.

Lives beside the trainer because it reads a checkpoint (:mod:`moe_probe.train.checkpoint`,
weights only); the probes themselves are the tracers' (:mod:`moe_probe.trace.probes`), which never
import the trainer. The model is rebuilt the way a resumed run rebuilds it (plain MoE, then
``convert`` with the saved groups), so the state dict's layout matches whatever stage wrote it.
"""

from __future__ import annotations

import math
from pathlib import Path

from moe_probe.modalities import ISOLATED_METRICS
from moe_probe.store.location import local_path
from moe_probe.trace.probes import PROBE_TASKS

ISOLATED = "isolated"


def load_run_model(run_dir: Path, step: int | None = None):
    """(model, data, cfg, step) of RUN_DIR's checkpoint; one-line ValueError when unusable."""
    from moe_probe.data import MultimodalData
    from moe_probe.train import checkpoint
    from moe_probe.train.config import run_config_from_json

    payload = checkpoint.load(run_dir)
    saved = int(payload["step"])
    if step is not None and step != saved:
        raise ValueError(f"{run_dir} keeps one checkpoint, at step {saved}; --step {step} is not available")
    cfg = run_config_from_json(payload["config"])
    model, tokenizer = checkpoint.skeleton(payload, cfg.model)
    model.load_state_dict(payload["model"])
    model.eval()
    data = MultimodalData(cfg.data, cfg.train.seed, tokenizer)
    return model, data, cfg, saved


def _parse_tasks(tasks) -> list[str]:
    known = [*PROBE_TASKS, ISOLATED]
    if not tasks:
        return known
    bad = [t for t in tasks if t not in known]
    if bad:
        raise ValueError(f"unknown probe task(s) {', '.join(bad)}; known: {', '.join(known)}")
    return list(dict.fromkeys(tasks))


def _fmt(x: float) -> str:
    return "   nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"


def probe(args) -> int:
    from moe_probe.trace.capture import capture_forward
    from moe_probe.trace.isolated import isolated_metrics
    from moe_probe.trace.probes import probe_row

    run_dir = local_path(args.run_dir, "probe")  # it writes the probes into the run's store
    if not run_dir.is_dir():
        raise ValueError(f"no run directory {run_dir}")
    tasks = _parse_tasks(args.tasks)
    model, data, cfg, step = load_run_model(run_dir, args.step)
    if not any(m.routing_info().n_shared > 0 for _, m in model.moe_layers()):
        raise ValueError(f"{run_dir}: the model has no shared experts (model.n_shared=0), nothing to probe")
    batch = data.probe_batch()
    print(f"run {run_dir}  arch {cfg.model.arch}  step {step}  "
          f"probe set: {len(batch)} sequences")
    probe_tasks = tuple(t for t in tasks if t != ISOLATED)
    if probe_tasks:
        cap = capture_forward(model, batch, router=False, shared=True)
        row = probe_row(batch, cap.shared, cfg.trace, probe_tasks)
        print(f"{'layer':>5}  {'task':<11} {'acc':>6} {'ctrl':>6} {'select':>6}")
        for li, (name, _) in enumerate(model.moe_layers()):
            for ti, task in enumerate(probe_tasks):
                print(f"{name:>5}  {task:<11} {_fmt(row['accuracy'][li, ti])} "
                      f"{_fmt(row['control_accuracy'][li, ti])} {_fmt(row['selectivity'][li, ti])}")
    if ISOLATED in tasks:
        iso = isolated_metrics(model, batch)
        print("isolated (shared experts only): "
              + "  ".join(f"{k} {iso[k]:.4g}" for k in ISOLATED_METRICS))
    return 0
