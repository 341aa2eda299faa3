"""The trainer's one handle on tracing (INTERNAL_API §3).

The trainer calls ``begin_step / backward / end_step / on_eval / flush / close`` and never
learns what is traced; the session decides from :class:`TraceConfig` which tracers run at a
step, hands small numpy rows to the store writer and guarantees every hook it added is gone
after ``end_step`` / ``close`` / ``with`` — also when the step raised. The per-step part is
:class:`~moe_probe.trace.watch.Watch`, the same that ``moe_probe.watch`` runs in any loop.

Rows whose group the store lacks (e.g. ``probe`` for a model without shared experts) are
skipped, so the store layout (see :func:`store_layout`) decides what is recorded.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moe_probe.modalities import ISOLATED_METRICS, TASKS
from moe_probe.trace.capture import capture_forward
from moe_probe.trace.config import TraceConfig
from moe_probe.trace.isolated import isolated_metrics
from moe_probe.trace.layout import writer_labels
from moe_probe.trace.probes import PROBE_TASKS, probe_row
from moe_probe.trace.snapshot import SnapshotTracer
from moe_probe.trace.tokens import ProbeTokens, valid_rows
from moe_probe.trace.watch import ModelRouters, Watch


class TraceSession:
    """Per-step tracing for one run; use as a context manager (or call ``close``)."""

    def __init__(self, model, cfg: TraceConfig, writer, probe_batch_fn=None, *,
                 distributed: bool = False, monitor=None, probe_tokens: ProbeTokens | None = None):
        """``distributed``: under torch.distributed (DDP) every rank runs a session and the rows are
        reduced over ranks (every rank must call begin_step / backward / end_step; only rank 0's
        writer writes). ``model`` is the bare module, not the DDP wrapper. ``monitor``: online
        findings (``trace.online.FindingMonitor``; ``writer`` then feeds its diagnosis).
        ``probe_tokens``: the probe batch's token columns; with them (and the store's
        ``token_routing`` group) each snapshot also writes the per-token top-k."""
        self.model, self.cfg, self.writer = model, cfg, writer
        self.probe_batch_fn, self.probe_tokens = probe_batch_fn, probe_tokens
        self._groups = set(getattr(writer, "groups", ()) or ())
        # The per-step rows (routing, loss, grad) are the one tracing path that moe_probe.watch
        # gives any loop; this session adds the eval-time rows.
        self._watch = Watch(model, ModelRouters(model), writer, tasks=TASKS,
                            every=cfg.routing_every if cfg.enabled else 0,
                            grad_every=cfg.grad_every if cfg.enabled else 0,
                            capacity_factor=cfg.nominal_capacity, distributed=distributed,
                            monitor=monitor)
        self._snapshot = SnapshotTracer(max(m.routing_info().n_experts for _, m in model.moe_layers()))
        # A resumed store already holds probe rows: keep their cadence rather than probing again
        # at the resume step (a resumed run must write the rows an uninterrupted one would).
        last_step = getattr(writer, "last_step", None)
        self._last: dict[str, int | None] = {
            g: last_step(g) if callable(last_step) and g in self._groups else None
            for g in ("probe", "token_routing")}
        self._probe_batch = None

    # ------------------------------------------------------------------ per step
    def begin_step(self, step: int) -> None:
        """Decide this step's tracers and attach the routing hooks (removed in ``end_step``)."""
        self._watch.begin_step(step)

    def backward(self, task_losses: dict[str, torch.Tensor], step: int | None = None, *,
                 last: bool = False) -> None:
        """One micro-batch's backward: two traced passes at a grad step, else the plain sum
        (``last``: the step's last micro-batch, see ``Watch.backward``)."""
        self._watch.backward(task_losses, last=last)

    def end_step(self, step: int, losses: dict[str, float]) -> None:
        """Remove the step's hooks, then hand the loss / routing / grad rows to the writer."""
        self._watch.end_step(step, losses)

    @property
    def should_stop(self) -> bool:
        """A finding stopped training (``Watch.should_stop``): the trainer checkpoints and ends."""
        return self._watch.should_stop

    @property
    def stopped(self):
        """The ``StopTraining`` naming that finding, or None."""
        return self._watch.stopped

    # ------------------------------------------------------------------ eval
    def on_eval(self, step: int, metrics: dict[str, float], model=None, *, final: bool = False) -> None:
        """Eval row; with tracing on, the routing snapshot and (when due) the probe rows.

        Probes run at every eval when ``probe_every`` is None, else when ``probe_every`` steps
        have passed since the last probe, and at ``final``; token-level routing likewise by
        ``token_every``.
        """
        model = model if model is not None else self.model
        if "eval" in self._groups:
            names = writer_labels(self.writer, "eval", "metric") or sorted(metrics)
            self.writer.append("eval", step, value=np.array(
                [float(metrics.get(n, math.nan)) for n in names]))
        if not self.cfg.enabled or self.probe_batch_fn is None:
            return
        want_snap = self.cfg.snapshot and "snapshot" in self._groups
        want_tokens = want_snap and self.probe_tokens is not None \
            and "token_routing" in self._groups and self._due("token_routing", step, final)
        want_probe = "probe" in self._groups and self._due("probe", step, final)
        if not (want_snap or want_probe):
            return
        batch = self._batch(model)
        cap = capture_forward(model, batch, router=want_snap, shared=want_probe)
        if want_snap:
            self.writer.append("snapshot", step, **self._snapshot.row(cap.topk_ids, step))
        if want_tokens:
            self._last["token_routing"] = step
            n = self.probe_tokens.n
            gates = [valid_rows(batch, g, n) for g in cap.topk_gates] if self.cfg.token_gates \
                else None
            self.writer.append("token_routing", step, **self.probe_tokens.row(
                [valid_rows(batch, t, n) for t in cap.topk_ids], gates))
        if want_probe:
            self._last["probe"] = step
            tasks = tuple(writer_labels(self.writer, "probe", "task") or PROBE_TASKS)
            iso_names = writer_labels(self.writer, "probe", "metric") or list(ISOLATED_METRICS)
            iso = isolated_metrics(model, batch)
            self.writer.append("probe", step, **probe_row(batch, cap.shared, self.cfg, tasks),
                               isolated=np.array([iso.get(n, math.nan) for n in iso_names]))

    def _due(self, group: str, step: int, final: bool) -> bool:
        every = self.cfg.probe_every if group == "probe" else self.cfg.token_every
        if every == 0:
            return False
        last = self._last[group]
        if every is None or final or last is None:
            return True
        return step - last >= every

    def _batch(self, model):
        if self._probe_batch is None:
            self._probe_batch = self.probe_batch_fn()
        p = next(model.parameters(), None)
        return self._probe_batch.to(p.device) if p is not None else self._probe_batch

    # ------------------------------------------------------------------ lifetime
    def snapshot_state(self) -> dict:
        """The saturation reference, for a checkpoint (see ``restore_snapshot``)."""
        return self._snapshot.state()

    def restore_snapshot(self, state: dict | None, resume_step: int) -> None:
        """On resume: saturation rows continue exactly as in an uninterrupted run."""
        self._snapshot.load_state(state, resume_step)

    def flush(self) -> None:
        self._watch.flush()

    def close(self) -> None:
        """Remove any hook still attached (a step that raised), then close the writer (the
        session owns it: rows still queued are written)."""
        self._watch.close()

    def __enter__(self) -> TraceSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self._watch.__exit__(exc_type, exc, tb)
