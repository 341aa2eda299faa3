"""Write a :class:`RunSummary` into TensorBoard, W&B or MLflow, through each tool's own client.

The clients are optional extras (``pip install 'moe_probe[export]'``); a missing one is a one-line
ValueError naming the install. Every tool gets the same keys and values (finite values only) at
the run's own steps, and the run's store path in its run config / params.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from moe_probe.export.history import RunSummary

__all__ = ["to_tensorboard", "to_wandb", "to_mlflow", "PARAMS_TAG"]

PARAMS_TAG = "moe_probe/run"
"""TensorBoard has no run config: the params go in as a text summary under this tag (TEXT tab)."""

_MLFLOW_BATCH = 1000
"""Metrics per ``log_batch`` call: MLflow's own limit per request."""


def _require(module: str, package: str, tool: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{tool} export needs the {package} package: "
                         f"pip install 'moe_probe[export]' (or pip install {package})") from None


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def to_tensorboard(s: RunSummary, logdir) -> Path:
    """One event file in ``logdir``: a scalar per key and step, plus the params as text at the
    first step. Returns ``logdir``."""
    _require("tensorboard", "tensorboard", "TensorBoard")
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.text import metadata as text_metadata
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    from tensorboard.util import tensor_util

    logdir = Path(logdir)
    if logdir.exists() and not logdir.is_dir():
        raise ValueError(f"--tensorboard {logdir} is a file, not a directory")
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        writer = EventFileWriter(str(logdir), max_queue_size=1024)
    except OSError as e:
        raise ValueError(f"--tensorboard {logdir}: cannot write there "
                         f"({e.strerror or e})") from None
    # The store keeps no wall clock per step: every event carries the export's time.
    now = time.time()
    Value = summary_pb2.Summary.Value
    params = "\n".join(f"- **{k}**: `{v}`" for k, v in s.params.items())
    first = int(s.steps[0]) if s.steps.size else 0
    writer.add_event(event_pb2.Event(wall_time=now, step=first, summary=summary_pb2.Summary(
        value=[Value(tag=PARAMS_TAG, metadata=text_metadata.create_summary_metadata(
                         display_name=PARAMS_TAG, description="moe_probe run config"),
                     tensor=tensor_util.make_tensor_proto(params))])))
    # One event per step holding every key as a legacy simple_value (as torch's SummaryWriter
    # writes scalars): tensorboard.summary.Writer's one event per value, each with its metadata,
    # is several times the bytes, and the event writer's pure-Python CRC is the cost here.
    for step, row in s.rows():
        writer.add_event(event_pb2.Event(wall_time=now, step=step, summary=summary_pb2.Summary(
            value=[Value(tag=k, simple_value=v) for k, v in row.items()])))
    writer.close()
    return logdir


def to_wandb(s: RunSummary, *, project: str | None = None) -> str:
    """A new W&B run named after the moe_probe run, its config the params. The mode (online,
    offline), entity and directory come from W&B's own settings (``WANDB_MODE``, ``WANDB_DIR``,
    ...); the project from ``project``, else ``WANDB_PROJECT``, else ``moe-probe``. Returns the
    run's URL (online) or its local directory (offline)."""
    wandb = _require("wandb", "wandb", "W&B")
    try:
        run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "moe-probe",
                         name=s.name, config=s.params, job_type="moe-probe-export",
                         settings=wandb.Settings(silent=True, console="off",
                                                 x_disable_stats=True))
    except Exception as e:  # noqa: BLE001 - wandb's errors share no base class
        raise ValueError(f"W&B: {_one_line(e)}") from None
    try:
        for step, row in s.rows():
            run.log(row, step=step)
        where = run.url or run.settings.sync_dir
    finally:
        run.finish()
    return str(where)


def to_mlflow(s: RunSummary, uri: str, *, experiment: str = "moe-probe") -> str:
    """A new MLflow run (named after the moe_probe run) in ``experiment`` at tracking ``uri``,
    the params as run params. Returns the MLflow run id."""
    _require("mlflow", "mlflow-skinny", "MLflow")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    _check_reachable(uri)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=s.name).info.run_id
    except Exception as e:  # noqa: BLE001 - MlflowException, OSError, requests' errors
        raise ValueError(f"MLflow {uri}: {_one_line(e)}") from None
    ok = False
    try:
        client.log_batch(run_id, params=[Param(k, json.dumps(v) if not isinstance(v, str) else v)
                                         for k, v in s.params.items()])
        ms = int(time.time() * 1000)  # the store keeps no wall clock per step: the export's
        batch: list = []
        for step, row in s.rows():
            batch += [Metric(k, v, ms, step) for k, v in row.items()]
            if len(batch) >= _MLFLOW_BATCH:
                client.log_batch(run_id, metrics=batch[:_MLFLOW_BATCH])
                batch = batch[_MLFLOW_BATCH:]
        if batch:
            client.log_batch(run_id, metrics=batch)
        ok = True
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"MLflow {uri}: {_one_line(e)}") from None
    finally:
        client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
    return run_id


def _check_reachable(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when an http(s) server is down."""
    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return
    if not u.hostname:
        raise ValueError(f"--mlflow {uri}: no host in the URI")
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=5).close()
    except OSError as e:
        raise ValueError(f"--mlflow {uri}: cannot reach {u.hostname}:{port} "
                         f"({e.strerror or type(e).__name__})") from None
