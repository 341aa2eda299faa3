"""Open the run's trace store and its :class:`TraceSession` (fresh or resumed).

Kept apart from the loop so ``trainer.fit`` only sees the session's five calls.
"""

from __future__ import annotations

from pathlib import Path

from moe_probe import __version__
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.layout import store_layout
from moe_probe.trace.session import TraceSession
from moe_probe.train.config import RunConfig, to_json
from moe_probe.train.distributed import SINGLE, Dist


class NullWriter:
    """The writer of ranks other than 0: rank 0's groups and labels (so the session runs the same
    tracers and joins the same collectives), and nothing written."""

    def __init__(self, coords: dict):
        self._coords = {g: c for g, c in coords.items() if c is not None}

    @property
    def groups(self) -> list[str]:
        return list(self._coords)

    def labels(self, group: str, dim: str) -> list[str]:
        return list(self._coords[group][dim])

    def append(self, group: str, step: int, **arrays) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_session(cfg: RunConfig, run_dir: Path, model, data, metric_names, *,
                 resume: bool, resume_step: int = 0, dist: Dist = SINGLE) -> TraceSession:
    """A session writing RUN_DIR/traces.zarr (on rank 0; other ranks trace into a NullWriter).

    On resume the store keeps only rows of steps before the checkpoint's: rows a crashed run
    wrote past its last checkpoint are dropped, and the eval row at the checkpoint step is
    written again by the trainer's first evaluation (identical: evaluation is deterministic).
    """
    if not dist.is_main:
        _, coords = store_layout(model, eval_metrics=list(metric_names))
        return TraceSession(model, cfg.trace, NullWriter(coords), data.probe_batch, distributed=True)
    if resume:
        writer, _ = StoreWriter.resume(run_dir, after_step=resume_step - 1)
    else:
        attrs, coords = store_layout(model, eval_metrics=list(metric_names))
        run = {"name": Path(run_dir).name, "recipe": cfg.recipe, "seed": cfg.train.seed,
               "stage": cfg.train.stage, "config": to_json(cfg), "version": __version__}
        writer = StoreWriter.create(run_dir, attrs={"run": run, **attrs}, coords=coords)
    return TraceSession(model, cfg.trace, writer, data.probe_batch, distributed=dist.enabled)
