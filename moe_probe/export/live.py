"""Live export: each optimizer step's summary into TensorBoard, W&B and MLflow while the run trains
(``moe-probe train --report-to ...``, ``moe_probe.watch(..., report_to=...)``), rank 0 only.

:class:`LiveExport` stands between the tracers and the store writer: every row goes to the store
unchanged, and a copy of each summarised row (``routing``, ``loss``, ``grad``), cast to the
store's dtypes so the values are the store's, goes to a background thread. That thread summarises
the steps with ``moe_probe.summary``'s functions, as ``moe-probe export --no-findings`` does on
the store's arrays (the same keys and values), and sends them through the export's sinks. The
training thread only copies a few (layer, kind) arrays per step.

* Every ``flush_secs`` (and at ``flush`` / close) the thread takes the rows handed over since,
  summarises each group once for all their steps (numpy's per-call cost, not per step), sends
  each complete step and flushes the tools. A step is complete once the next step's first row
  has arrived, or at close: the tools trail the store by one step and up to ``flush_secs``.
* The two findings keys are not sent live: findings come from a diagnosis of the whole run (see
  ``moe_probe.summary``); ``moe-probe export`` adds them afterwards.
* A tool that fails mid-run is reported in one line on stderr and dropped; training and the store
  go on.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moe_probe import summary as sm
from moe_probe.export import sinks
from moe_probe.store.schema import GROUPS

__all__ = ["TOOLS", "Report", "LiveExport"]

TOOLS = ("tensorboard", "wandb", "mlflow")

_SUMMARISED = {"routing": sm.ROUTING_VARS, "loss": ("value",), "grad": ("cosine",)}
"""The arrays of each group the summary reads (the rest is the store's alone)."""


@dataclass(frozen=True, kw_only=True)
class Report:
    """Where a run's summary goes live, and how."""

    to: tuple[str, ...] = ()
    """Tools, each of :data:`TOOLS`."""
    tensorboard_dir: str | None = None
    """TensorBoard log directory; None = ``RUN_DIR/tb``."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; None = ``MLFLOW_TRACKING_URI`` (one of the two is needed)."""
    wandb_project: str | None = None
    """W&B project; None = ``WANDB_PROJECT``, else ``moe-probe`` (mode, entity, directory: W&B's
    own settings, e.g. ``WANDB_MODE=offline``)."""
    experiment: str = "moe-probe"
    """MLflow experiment."""
    flush_secs: float = 5.0
    """The tools' buffers (TensorBoard's event file, MLflow's metric batch) are flushed this often."""

    @classmethod
    def parse(cls, to, **kw) -> Report:
        """``to``: ``"tensorboard,wandb"`` or a sequence of tool names. One-line ValueError for an
        unknown tool."""
        names = [t.strip() for t in to.split(",")] if isinstance(to, str) else list(to or ())
        names = [t for t in names if t]
        unknown = [t for t in names if t not in TOOLS]
        if unknown:
            raise ValueError(f"report_to: unknown tool {unknown[0]!r}; choose from "
                             f"{', '.join(TOOLS)}")
        return cls(to=tuple(dict.fromkeys(names)), **kw)

    def check(self) -> Report:
        """Before training starts: every chosen tool's client is installed (else one line naming
        the pip install), MLflow has a URI and an http(s) server answers. Returns the report with
        the MLflow URI resolved."""
        if "tensorboard" in self.to:
            sinks.require("tensorboard", "tensorboard", "TensorBoard")
        if "wandb" in self.to:
            sinks.require("wandb", "wandb", "W&B")
        if "mlflow" not in self.to:
            return self
        uri = self.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("live MLflow export needs a tracking URI: --mlflow-uri URI "
                             "(mlflow_uri=) or MLFLOW_TRACKING_URI")
        sinks.check_mlflow(uri)
        return replace(self, mlflow_uri=uri)

    def open(self, writer, run_dir) -> LiveExport:
        """``writer`` (the run's store writer) wrapped so each step also goes to the tools; the
        tools' runs are created now, each with the run's store path in its config / params. On
        an error ``writer`` is closed (nothing else owns it yet)."""
        from moe_probe.export.history import run_params
        from moe_probe.run import RunInfo, open_run

        opened: list = []
        try:
            store = open_run(run_dir)
            info = RunInfo.from_attrs(store.attrs, path=store.path)
            params = run_params(store, info)
            if "tensorboard" in self.to:
                opened.append(sinks.TensorBoardSink(
                    self.tensorboard_dir or Path(run_dir) / "tb", params,
                    flush_secs=self.flush_secs))
            if "wandb" in self.to:
                opened.append(sinks.WandbSink(info.name, params, project=self.wandb_project,
                                              job_type="moe-probe-live"))
            if "mlflow" in self.to:
                opened.append(sinks.MlflowSink(self.mlflow_uri, info.name, params,
                                               experiment=self.experiment))
        except BaseException:
            for s in opened:
                s.close(ok=False)
            writer.close()
            raise
        return LiveExport(writer, opened, flush_secs=self.flush_secs)


def _labels(writer, group: str, dim: str) -> list[str]:
    return [str(x) for x in writer.labels(group, dim)] if group in writer.groups else []


class LiveExport:
    """The store writer's interface (``groups``, ``labels``, ``last_step``, ``append``, ``flush``,
    ``close``) around a store writer, sending each step's summary to ``sinks`` (which it owns)."""

    def __init__(self, writer, sinks_: Sequence, *, flush_secs: float = 5.0):
        self.writer, self.flush_secs = writer, flush_secs
        self._sinks = list(sinks_)
        self._modalities = _labels(writer, "routing", "modality")
        self._terms = _labels(writer, "loss", "term")
        self._grad_layers = _labels(writer, "grad", "layer")
        self._grad_components = _labels(writer, "grad", "component")
        self._rows: deque = deque()
        """(group, step, wall time, arrays) handed over by the training thread, drained by the
        export thread."""
        self._ctl: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moe-probe-live-export",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the writer's interface
    @property
    def groups(self) -> list[str]:
        return self.writer.groups

    def labels(self, group: str, dim: str) -> list[str]:
        return self.writer.labels(group, dim)

    def last_step(self, group: str):
        return self.writer.last_step(group)

    def append(self, group: str, step: int, **arrays) -> None:
        self.writer.append(group, step, **arrays)
        names = _SUMMARISED.get(group)
        if names is not None:
            # A copy in the store's dtype: the values the store holds; the caller may reuse its
            # buffers.
            self._rows.append((group, int(step), time.time(), {
                n: np.array(arrays[n], dtype=GROUPS[group][n].dtype)
                for n in names if n in arrays}))

    def flush(self) -> None:
        """The store's rows written; every complete step sent and the tools flushed."""
        self.writer.flush()
        self._wait("flush")

    def close(self) -> None:
        """Close the store writer, then send the last step and close the tools' runs."""
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.close()
        finally:
            self._wait("stop")

    def _wait(self, what: str) -> None:
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._ctl.put((what, done))
        while not done.wait(0.1) and self._thread.is_alive():
            pass

    # ------------------------------------------------------------ the export thread
    def _run(self) -> None:
        open_step, open_rows, open_wall = None, {}, 0.0
        while True:
            try:
                what, done = self._ctl.get(timeout=self.flush_secs)
            except queue.Empty:
                what, done = "tick", None
            steps: list[tuple[int, float, dict]] = []
            while self._rows:
                group, step, wall, arrays = self._rows.popleft()
                if step != open_step:
                    if open_step is not None:
                        steps.append((open_step, open_wall, open_rows))
                    open_step, open_rows, open_wall = step, {}, wall
                open_rows[group] = arrays
            if what == "stop" and open_step is not None:
                steps.append((open_step, open_wall, open_rows))
            if steps:
                try:
                    self._send(steps)
                except Exception as e:  # noqa: BLE001 - a bug here must not stop training
                    err = e  # bound outside the except's scope for the callback
                    self._each(lambda sink: _raise(err), steps[0][0])
            self._each(lambda sink: sink.flush())
            if what == "stop":
                self._each(lambda sink: sink.close(ok=True))
                self._sinks = []
            if done is not None:
                done.set()
            if what == "stop":
                return

    def _send(self, steps: list[tuple[int, float, dict]]) -> None:
        """The summaries of complete steps, each group summarised once for all its rows (the
        summary's own functions, as ``moe-probe export`` runs them on the store's arrays)."""
        cols: dict[str, np.ndarray] = {}
        for group, summarise in (("routing", self._routing), ("loss", self._loss),
                                 ("grad", self._grad)):
            at = [i for i, (_, _, rows) in enumerate(steps) if group in rows]
            if not at:
                continue
            stacked = {n: np.stack([steps[i][2][group][n] for i in at])
                       for n in steps[at[0]][2][group]}
            for key, v_S in summarise(stacked).items():
                cols[key] = np.full(len(steps), np.nan)
                cols[key][at] = v_S
        finite = {k: np.isfinite(v) for k, v in cols.items()}
        values = {k: v.tolist() for k, v in cols.items()}
        for i, (step, wall, _) in enumerate(steps):
            row = {k: values[k][i] for k in cols if finite[k][i]}
            self._each(lambda sink: sink.write(step, row, wall), step)

    def _routing(self, arrays) -> dict[str, np.ndarray]:
        return sm.routing_summary(self._modalities, **arrays)

    def _loss(self, arrays) -> dict[str, np.ndarray]:
        return sm.loss_summary(self._terms, arrays["value"])

    def _grad(self, arrays) -> dict[str, np.ndarray]:
        return sm.grad_summary(self._grad_layers, self._grad_components, arrays["cosine"])

    def _each(self, fn, step: int | None = None) -> None:
        """``fn`` on every sink; a sink that raises is reported once and dropped."""
        for sink in list(self._sinks):
            try:
                fn(sink)
            except Exception as e:  # noqa: BLE001 - a tool's failure must not stop training
                self._sinks.remove(sink)
                at = f" at step {step}" if step is not None else ""
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"moe-probe: live export to {type(sink).__name__.removesuffix('Sink')} "
                      f"stopped{at}: {msg}", file=sys.stderr)
                try:
                    sink.close(ok=False)
                except Exception:  # noqa: BLE001 - already reported
                    pass


def _raise(e: BaseException):
    raise e
