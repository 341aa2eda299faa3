"""moe_probe.export — a run's bounded summary in TensorBoard, W&B or MLflow.

    moe-probe export RUN --tensorboard DIR | --wandb | --mlflow URI

* :mod:`moe_probe.summary` — the keys and how each is computed (defined once; torch-free).
* :mod:`.history` — :func:`read_summary`: a run's summary at every step from its store.
* :mod:`.sinks` — one writer per tool, through the tool's own client (optional extras).
* :mod:`.live` — the same summary sent step by step while a run trains (``report_to``).
* :mod:`.commands` — the CLI command.
"""

from moe_probe.export.history import RunSummary, read_summary

__all__ = ["RunSummary", "read_summary"]
