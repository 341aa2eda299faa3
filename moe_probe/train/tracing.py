"""Open the run's trace store for appending and its :class:`TraceSession`.

Kept apart from the loop so ``trainer.fit`` only sees the session's five calls.
"""

from __future__ import annotations

from moe_probe.run import Run
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.layout import store_layout
from moe_probe.trace.online import monitored
from moe_probe.trace.session import TraceSession
from moe_probe.trace.tokens import data_probe_tokens
from moe_probe.trace.watch import NullWriter
from moe_probe.train.config import RunConfig
from moe_probe.train.distributed import SINGLE, Dist


DIAGNOSE_EVERY = 10
"""Steps between online diagnoses of ``moe-probe train --fail-on``."""


def open_session(cfg: RunConfig, run: Run, model, data, metric_names, *,
                 resume_step: int = 0, dist: Dist = SINGLE, fail_on: str | None = None,
                 report=None) -> TraceSession:
    """A session appending to the run's store (on rank 0; other ranks trace into a NullWriter).

    The store already exists (``Run.create`` lays it out with the run). It keeps only rows of
    steps before ``resume_step``: rows a crashed run wrote past its last checkpoint are dropped,
    and the eval row at the checkpoint step is written again by the trainer's first evaluation
    (identical: evaluation is deterministic).

    ``fail_on`` (``collapse`` | ``conflict`` | ``any``): online findings every
    :data:`DIAGNOSE_EVERY` steps stop training at the first critical one of that category
    (``session.should_stop``), with the rows the store already holds counted.
    ``report`` (``moe_probe.export.live.Report``, checked): rank 0 also sends each step's summary
    to those tools.
    """
    tokens = data_probe_tokens(data)
    if not dist.is_main:
        _, coords = store_layout(model, eval_metrics=list(metric_names), probe_tokens=tokens)
        writer = NullWriter(coords)
    else:
        writer, _ = StoreWriter.resume(run.store_path, after_step=resume_step - 1)
        if report is not None and report.to:
            writer = report.open(writer, run.path)
    monitor = None
    if fail_on is not None:
        writer, monitor = monitored(writer, run.path if dist.is_main else None, on_finding="stop",
                                    every=DIAGNOSE_EVERY, fail_on=fail_on, distributed=dist.enabled)
    return TraceSession(model, cfg.trace, writer, data.probe_batch, distributed=dist.enabled,
                        monitor=monitor, probe_tokens=tokens)
