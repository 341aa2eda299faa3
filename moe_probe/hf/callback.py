"""Trace a Hugging Face ``Trainer`` (or TRL's trainers, its subclasses) into a run.

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[TraceCallback("runs/ft", kinds="token_type_ids",
                                               kind_names=["text", "code"])])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

:class:`TraceCallback` drives one :func:`moe_probe.watch` (the one tracing path) from the events
``Trainer._run_epoch`` raises (transformers 5.25):

- ``on_train_begin``: the watch opens on ``trainer.model``: a new run at ``out``, or, when the
  Trainer restored a checkpoint (``state.global_step`` = k > 0), the run at ``out`` cut back to
  its rows of steps <= k (later rows came from training the checkpoint never saw).
- ``on_step_begin`` (before an optimizer step's first micro-batch): step ``global_step + 1`` opens
  (router hooks attached at a routing step). Every micro-batch's forward counts into it;
  ``on_substep_end`` (after each micro-batch but the last) needs nothing.
- ``on_step_end`` (after ``optimizer.step()`` and ``global_step += 1``): the step closes: one
  routing row, labelled with the ``global_step`` HF logs and names checkpoints by (1, 2, ...).
- ``on_log``: a loss row (``total`` = the loss the Trainer logs at that step).
- A step the Trainer will checkpoint (``control.should_save``) has its rows committed before the
  checkpoint is written, so a checkpoint of step k always finds rows 1..k in the store.
- ``on_train_end``: hooks removed, writer closed (after an exception: :meth:`TraceCallback.close`,
  which ``TraceTrainerMixin.train`` calls).

Per-task losses for the gradient conflict: :class:`TraceTrainerMixin`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback

from moe_probe.trace.watch import Watch, check_settings


class TraceCallback(TrainerCallback):
    """Routing (and loss, and gradient-conflict) rows of a Trainer's optimizer steps in ``out``."""

    def __init__(self, out, *, kinds: str | Callable | None = None,
                 kind_names: Sequence[str] | None = None, every: int = 1,
                 grad_every: int | None = None, tasks: Sequence[str] | None = None,
                 capacity_factor: float = 1.0, use_table: bool = True, **watch_options):
        """- ``out``: the run directory (new, or this training's own run when resuming).
        - ``kinds``: the kind of each token: a batch column (e.g. ``"token_type_ids"``: kind ids
          per token (B, S) or per sample (B,); it reaches the model, which ignores an unknown
          keyword; keep it with ``remove_unused_columns=False``) or a callable on the model's
          forward arguments (``lambda input_ids, **kw: ...``). ``kind_names``: the kinds
          (default ``["text"]``). Label -1 = not counted (padding).
        - ``every``: a routing row every this many global steps (steps 1, 2, ... as HF counts).
        - ``grad_every`` / ``tasks``: gradient conflict between two task losses every this many
          steps; needs a Trainer class with :class:`TraceTrainerMixin`.
        - ``capacity_factor``, ``use_table``: as :func:`moe_probe.watch`.
        - ``watch_options``: the rest of :func:`moe_probe.watch`'s options — online findings
          (``on_finding``, ``diagnose_every``, ``fail_on``: a stop ends training at that step
          with a checkpoint saved there) and live export (``report_to``, ``report_dir``,
          ``mlflow_uri``)."""
        unknown = set(watch_options) - _PASSED_ON
        if unknown:
            raise ValueError(f"TraceCallback: unknown option(s) {sorted(unknown)}; "
                             f"known: {sorted(_PASSED_ON)}")
        column = kinds if isinstance(kinds, str) else None
        fn = _column(kinds) if column is not None else kinds
        check_settings(every=every, grad_every=grad_every or 0, tasks=tasks, kinds=fn,
                       kind_names=kind_names, capacity_factor=capacity_factor)
        self.out, self.column = out, column
        self._kw = dict(kinds=fn, kind_names=kind_names, every=every, grad_every=grad_every,
                        tasks=tasks, capacity_factor=capacity_factor, use_table=use_table,
                        **watch_options)
        self.tasks = tuple(tasks) if tasks is not None else None
        self.watch: Watch | None = None
        """The open watch while training runs."""
        self.stopped = None
        """The online finding that stopped training (``StopTraining``: ``.finding``, ``.step``),
        or None."""
        self.task_losses = False
        """Set by :class:`TraceTrainerMixin`: the trainer hands backward the task losses."""

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.close()  # a train() that raised left its watch open
        if self._kw["grad_every"] and not self.task_losses:
            raise ValueError("grad_every needs the two task losses: train with a Trainer class that "
                             "mixes in moe_probe.hf.TraceTrainerMixin")
        if self.column is not None and args.remove_unused_columns and \
                self.column not in inspect.signature(model.forward).parameters:
            raise ValueError(f"kinds column {self.column!r} is not an argument of the model, so the "
                             "Trainer drops it: set remove_unused_columns=False")
        from moe_probe.watcher import watch

        k = state.global_step
        self.watch = watch(model, self.out, start_step=k + 1, resume_after=k if k > 0 else None,
                           **self._kw)

    def on_step_begin(self, args, state, control, **kwargs):
        self.watch.begin_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        self.watch.end_step(state.global_step)
        if self.watch.should_stop:  # an online finding: end here, store and checkpoint agreeing
            self.stopped = self.watch.stopped
            control.should_training_stop = True
            control.should_save = True
        self._commit_before_save(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.watch is not None and logs and "loss" in logs:
            self.watch.log_losses(state.global_step, logs["loss"])
            self._commit_before_save(control)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    # ------------------------------------------------------------------ lifetime
    def _commit_before_save(self, control) -> None:
        if control.should_save:
            self.watch.flush()

    def close(self) -> None:
        """Hooks removed, queued rows written, writer closed; a no-op when nothing is open."""
        w, self.watch = self.watch, None
        if w is not None:
            w.close()


_PASSED_ON = frozenset({"on_finding", "diagnose_every", "fail_on", "report_to", "report_dir",
                        "mlflow_uri"})
"""``moe_probe.watch`` options the callback hands on as given."""


def _column(name: str) -> Callable:
    def kinds(*args, **kwargs):
        if name not in kwargs:
            raise ValueError(f"kinds: the batch has no {name!r} column (set "
                             "remove_unused_columns=False so the Trainer keeps it)")
        return kwargs[name]
    return kinds


class TraceTrainerMixin:
    """Per-task losses for the gradient conflict under the HF Trainer (and TRL's trainers):

        class MyTrainer(TraceTrainerMixin, Trainer):    # the mixin first
            def task_losses(self, model, inputs):       # optional: the default splits the LM loss
                out = model(**inputs)                   #   by a "task" column (below)
                return {"und": l_und, "gen": l_gen}, out

        MyTrainer(..., callbacks=[TraceCallback(out, grad_every=10, tasks=("und", "gen"))])

    ``compute_loss`` returns the sum of the two task losses (in ``tasks`` order), a per-batch
    mean (the Trainer divides it over gradient accumulation). At a gradient-conflict step the
    Trainer's backward runs as ``Watch.backward`` of the two losses, scaled as the Trainer
    scales the sum: the update is bit-identical to an untraced step's. Not with a loss scaler
    (fp16) or DeepSpeed."""

    task_column = "task"
    """The default ``task_losses``' batch column: task index (0, 1) per sample (B,) or per token
    (B, S); keep it with ``remove_unused_columns=False``."""

    loss_is_scaled_for_ga = False
    """The Trainer's flag: ``compute_loss`` returns a per-batch mean (divided over accumulation)."""
    _task_parts = None

    def task_losses(self, model, inputs) -> tuple[dict[str, torch.Tensor], object]:
        """``({first: l1, second: l2}, outputs)`` of one micro-batch. The default: the LM loss of
        ``labels`` split by ``task_column`` — each task's share of the per-token cross-entropy
        summed over the batch's label tokens, over their count, so l1 + l2 is the mean loss — and
        the balance loss the model returns (``aux_loss`` × ``router_aux_loss_coef``) in the first."""
        inputs = dict(inputs)
        if self.task_column not in inputs or "labels" not in inputs:
            raise ValueError(f"TraceTrainerMixin.task_losses: the batch needs {self.task_column!r} "
                             "and 'labels' columns (set remove_unused_columns=False), or override it")
        task, labels = inputs.pop(self.task_column), inputs.pop("labels")
        out = model(**inputs)
        first, second = split_lm_loss(out.logits, labels, task)
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            first = first + getattr(self.model.config, "router_aux_loss_coef", 0.0) * aux
        names = self._trace.tasks if self._trace is not None and self._trace.tasks else ("0", "1")
        return {names[0]: first, names[1]: second}, out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        parts, outputs = self.task_losses(model, inputs)
        values = list(parts.values())
        loss = values[0] + values[1]
        self._task_parts = (parts, loss)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        w = self._trace.watch if self._trace is not None else None
        if w is None or not w.grad_step:
            return super().training_step(model, inputs, num_items_in_batch)
        acc = self.accelerator
        if getattr(acc, "scaler", None) is not None:
            raise ValueError("gradient conflict is not measured under a loss scaler (fp16): use "
                             "bf16 or fp32")
        acc.backward = functools.partial(self._task_backward, w)  # shadows the method, this call only
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del acc.backward

    def _task_backward(self, w: Watch, loss: torch.Tensor, **kwargs) -> None:
        parts, total = self._task_parts
        # d loss / d total: the scale the Trainer applied (1 / accumulation, ...), as autograd
        # propagates it, so the scaled parts' backward equals the Trainer's own bit for bit.
        scale = torch.autograd.grad(loss, total, retain_graph=True)[0]
        # the Trainer's own flag: this micro-batch ends the accumulation (the optimizer steps next)
        w.backward({t: v * scale for t, v in parts.items()}, last=self.accelerator.sync_gradients)

    def train(self, *args, **kwargs):
        cb = self._trace
        if cb is not None:
            cb.task_losses = True
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            if cb is not None:
                cb.close()  # hooks never outlive a failed train()
            raise

    @property
    def _trace(self) -> TraceCallback | None:
        return next((c for c in self.callback_handler.callbacks if isinstance(c, TraceCallback)), None)


def split_lm_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor,
                  task) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy split by task (0 / 1, per sample (B,) or per token (B, S); a
    token's task is its label's): each task's summed loss over the count of all label tokens."""
    B, S, V = logits_BSV.shape
    task_BS = torch.as_tensor(task, device=labels_BS.device)
    if task_BS.shape == (B,):
        task_BS = task_BS[:, None].expand(B, S)
    if task_BS.shape != (B, S):
        raise ValueError(f"task labels of shape {tuple(task_BS.shape)} for a batch of ({B}, {S})")
    target = labels_BS[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits_BSV[:, :-1].reshape(-1, V).float(), target,
                                           reduction="none")
    n = (target != -100).sum().clamp(min=1)
    task_N = task_BS[:, 1:].reshape(-1)
    return ce[task_N == 0].sum() / n, ce[task_N == 1].sum() / n
