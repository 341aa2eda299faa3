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

__all__ = ["TensorBoardSink", "WandbSink", "MlflowSink", "to_tensorboard", "to_wandb", "to_mlflow",
           "check_mlflow", "require", "PARAMS_TAG"]

PARAMS_TAG = "moe_probe/run"
"""TensorBoard has no run config: the params go in as a text summary under this tag (TEXT tab)."""

_MLFLOW_BATCH = 1000
"""Metrics per ``log_batch`` call: MLflow's own limit per request."""


def require(module: str, package: str, tool: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{tool} export needs the {package} package: "
                         f"pip install 'moe_probe[export]' (or pip install {package})") from None


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class TensorBoardSink:
    """One event file in ``logdir``: one event per step holding every key as a scalar, plus the
    params as text at the first step written."""

    def __init__(self, logdir, params: dict, *, flush_secs: float = 120.0):
        require("tensorboard", "tensorboard", "TensorBoard")
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self.logdir = Path(logdir)
        if self.logdir.exists() and not self.logdir.is_dir():
            raise ValueError(f"TensorBoard log directory {self.logdir} is a file, not a directory")
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            # The writer's own thread does the file I/O (and its pure-Python CRC).
            self._writer = EventFileWriter(str(self.logdir), max_queue_size=1024,
                                           flush_secs=flush_secs)
        except OSError as e:
            raise ValueError(f"TensorBoard log directory {self.logdir}: cannot write there "
                             f"({e.strerror or e})") from None
        self._params: dict | None = params

    def write(self, step: int, row: dict[str, float], wall_time: float) -> None:
        Value = self._summary.Value
        if self._params is not None:
            self._write_params(step, wall_time)
        # One event per step holding every key as a legacy simple_value (as torch's SummaryWriter
        # writes scalars): tensorboard.summary.Writer's one event per value, each with its
        # metadata, is several times the bytes, and the event writer's pure-Python CRC is the cost.
        self._writer.add_event(self._event(wall_time=wall_time, step=step, summary=self._summary(
            value=[Value(tag=k, simple_value=v) for k, v in row.items()])))

    def _write_params(self, step: int, wall_time: float) -> None:
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.util import tensor_util

        text = "\n".join(f"- **{k}**: `{v}`" for k, v in self._params.items())
        self._params = None
        self._writer.add_event(self._event(wall_time=wall_time, step=step, summary=self._summary(
            value=[self._summary.Value(
                tag=PARAMS_TAG, metadata=text_metadata.create_summary_metadata(
                    display_name=PARAMS_TAG, description="moe_probe run config"),
                tensor=tensor_util.make_tensor_proto(text))])))

    def flush(self) -> None:
        self._writer.flush()

    def close(self, ok: bool = True) -> None:
        self._writer.close()


class WandbSink:
    """A new W&B run, its config the params. The mode (online, offline), entity and directory
    come from W&B's own settings (``WANDB_MODE``, ``WANDB_DIR``, ...); the project from
    ``project``, else ``WANDB_PROJECT``, else ``moe-probe``."""

    def __init__(self, name: str, params: dict, *, project: str | None = None,
                 job_type: str = "moe-probe-export"):
        wandb = require("wandb", "wandb", "W&B")
        try:
            self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or "moe-probe",
                                  name=name, config=params, job_type=job_type,
                                  settings=wandb.Settings(silent=True, console="off",
                                                          x_disable_stats=True))
        except Exception as e:  # noqa: BLE001 - wandb's errors share no base class
            raise ValueError(f"W&B: {_one_line(e)}") from None
        self.where = str(self.run.url or self.run.settings.sync_dir)
        """The run's URL (online) or its local directory (offline)."""

    def write(self, step: int, row: dict[str, float], wall_time: float) -> None:
        self.run.log(row, step=step)

    def flush(self) -> None:
        pass  # wandb's own service process sends as it goes

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MlflowSink:
    """A new MLflow run named ``name`` in ``experiment`` at tracking ``uri``, the params as run
    params; metrics go in batches of MLflow's per-request limit (and at ``flush``)."""

    def __init__(self, uri: str, name: str, params: dict, *, experiment: str = "moe-probe"):
        check_mlflow(uri)
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self.uri, self._batch = Metric, uri, []
        try:
            self._client = MlflowClient(tracking_uri=uri)
            exp = self._client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
            self.run_id = self._client.create_run(exp_id, run_name=name).info.run_id
            self._client.log_batch(self.run_id, params=[
                Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()])
        except Exception as e:  # noqa: BLE001 - MlflowException, OSError, requests' errors
            raise ValueError(f"MLflow {uri}: {_one_line(e)}") from None

    def write(self, step: int, row: dict[str, float], wall_time: float) -> None:
        ms = int(wall_time * 1000)
        self._batch += [self._metric(k, v, ms, step) for k, v in row.items()]
        while len(self._batch) >= _MLFLOW_BATCH:
            self._send(self._batch[:_MLFLOW_BATCH])
            self._batch = self._batch[_MLFLOW_BATCH:]

    def flush(self) -> None:
        if self._batch:
            self._send(self._batch)
            self._batch = []

    def _send(self, metrics: list) -> None:
        try:
            self._client.log_batch(self.run_id, metrics=metrics)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"MLflow {self.uri}: {_one_line(e)}") from None

    def close(self, ok: bool = True) -> None:
        try:
            if ok:
                self.flush()
        finally:
            self._client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def _write_all(sink, s: RunSummary) -> None:
    """Every row of ``s`` into ``sink``, which is closed (FAILED on an error)."""
    # The store keeps no wall clock per step: every value carries the export's time.
    now, ok = time.time(), False
    try:
        for step, row in s.rows():
            sink.write(step, row, now)
        sink.flush()
        ok = True
    finally:
        sink.close(ok)


def to_tensorboard(s: RunSummary, logdir) -> Path:
    """One event file in ``logdir`` (:class:`TensorBoardSink`). Returns ``logdir``."""
    sink = TensorBoardSink(logdir, s.params)
    _write_all(sink, s)
    return sink.logdir


def to_wandb(s: RunSummary, *, project: str | None = None) -> str:
    """A new W&B run named after the moe_probe run (:class:`WandbSink`). Returns the run's URL
    (online) or its local directory (offline)."""
    sink = WandbSink(s.name, s.params, project=project)
    _write_all(sink, s)
    return sink.where


def to_mlflow(s: RunSummary, uri: str, *, experiment: str = "moe-probe") -> str:
    """A new MLflow run named after the moe_probe run (:class:`MlflowSink`). Returns its id."""
    sink = MlflowSink(uri, s.name, s.params, experiment=experiment)
    _write_all(sink, s)
    return sink.run_id


def check_mlflow(uri: str) -> None:
    """The client is installed and an http(s) server answers: one-line ValueError otherwise."""
    require("mlflow", "mlflow-skinny", "MLflow")
    _check_reachable(uri)


def _check_reachable(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when an http(s) server is down."""
    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return
    if not u.hostname:
        raise ValueError(f"MLflow {uri}: no host in the URI")
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=5).close()
    except OSError as e:
        raise ValueError(f"MLflow {uri}: cannot reach {u.hostname}:{port} "
                         f"({e.strerror or type(e).__name__})") from None
