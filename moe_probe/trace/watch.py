"""Trace a training loop one optimizer step at a time: the one tracing path.

:class:`Watch` turns the forwards and backwards of a step into the store's ``routing``, ``loss``
and ``grad`` rows. moe_probe's trainer uses it through :class:`~moe_probe.trace.session.TraceSession`
(which adds eval, snapshot and probe rows); ``moe_probe.watch`` hands it to any loop, on
moe_probe's model (:class:`ModelRouters`) or a Hugging Face MoE (``moe_probe.hf.routers``).

A step: ``begin_step(s)`` attaches the router hooks when ``s`` is a routing step (none otherwise,
so an unsampled step costs nothing); every training forward until ``end_step(s)`` is counted
(gradient accumulation: the counts of all micro-batches add up; a forward under no_grad —
evaluation, metrics, generation — and one recomputed in backward by activation checkpointing are
not);
``backward`` runs the two-pass gradient-conflict tracer at a grad step, else the
plain backward; ``end_step`` removes the hooks, reduces over ranks under torch.distributed and
hands the rows to the writer. ``step(s)`` = ``end_step(s)`` + ``begin_step(s + 1)``, for loops
that only close steps.

Token kinds: a forward's tokens carry kind ids into ``kind_names`` — the labels given with
``kinds(labels)`` for the next forward, else those of the ``kinds`` callable on the forward's
inputs, else the model's own (moe_probe's modalities) or the first kind. Labels are per token
``(B, S)`` or per sample ``(B,)``; ``-1`` = not counted (padding).

Legend: B batch, S sequence, N = B·S positions, T tokens a router saw, K top-k, E experts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import numpy as np
import torch

from moe_probe.model.hooks import RouterRecord, before_forward, hooks, layer_hooks
from moe_probe.modalities import MODALITIES
from moe_probe.trace.grad import GradConflictTracer, plain_backward
from moe_probe.trace.layout import model_attrs, writer_labels
from moe_probe.trace.routing import RoutingCounter


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
"""Id of the backward pass running on this thread, -1 outside backward."""


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


class ModelRouters:
    """moe_probe's own model as :class:`Watch` sees it: ``hook_router`` points hand over ready
    :class:`RouterRecord` s with the model's modalities; routers see the batch's valid tokens."""

    kind_names: tuple[str, ...] | None = MODALITIES
    """The model labels its tokens itself (text / vit / vae)."""

    def __init__(self, model):
        self.model = model
        moe = model.moe_layers()
        self.layers = [str(n) for n, _ in moe]
        self.infos = [m.routing_info() for _, m in moe]

    def hook_fns(self, fn: Callable[[int, object], None]) -> dict:
        return layer_hooks(self.model, "hook_router", fn)

    def record(self, li: int, out: RouterRecord) -> RouterRecord:
        return out

    def tokens(self, args, kwargs) -> tuple[tuple[int, int], torch.Tensor | None]:
        """``((B, S), valid_N)``: pads never reach a router (``valid_N`` maps labels to tokens)."""
        batch = args[0] if args else kwargs["batch"]
        valid = batch.valid_BS if batch.valid_BS is not None else batch.tokens_BS != 0
        return tuple(batch.tokens_BS.shape), valid.reshape(-1)

    def grad_tracer(self, distributed: bool) -> GradConflictTracer:
        return GradConflictTracer(self.model, distributed=distributed)

    def attrs(self) -> dict:
        return model_attrs(self.model)


def token_kinds(labels, shape_BS: tuple[int, int], kind_names: Sequence[str],
                what: str = "kinds") -> torch.Tensor:
    """``(N,)`` int64 kind ids from per-token ``(B, S)`` or per-sample ``(B,)`` labels (a bool
    mask is kinds 0/1). ValueError (one line, naming ``what``) for another shape, dtype or an id
    out of range."""
    labels = torch.as_tensor(labels)
    B, S = shape_BS
    if labels.dtype == torch.bool:
        labels = labels.long()
    elif labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{what}: labels must be integer kind ids or a bool mask, got {labels.dtype}")
    if tuple(labels.shape) == (B, S):
        kind_N = labels.reshape(-1)
    elif tuple(labels.shape) == (B,):
        kind_N = labels.repeat_interleave(S)
    else:
        raise ValueError(f"{what}: labels of shape {tuple(labels.shape)} for inputs of shape ({B}, {S}); "
                         "give one kind per token (B, S) or per sample (B,)")
    kind_N = kind_N.long()
    if kind_N.numel():
        lo, hi = int(kind_N.min()), int(kind_N.max())
        if lo < -1 or hi >= len(kind_names):
            raise ValueError(f"{what}: label {lo if lo < -1 else hi} is not -1 (not counted) or a "
                             f"kind id in [0, {len(kind_names)}) of {list(kind_names)}")
    return kind_N


class NullWriter:
    """The writer of ranks other than 0: rank 0's groups and labels (so every rank runs the same
    tracers and joins the same collectives), and nothing written."""

    def __init__(self, coords: dict):
        self._coords = {g: c for g, c in coords.items() if c is not None}

    @property
    def groups(self) -> list[str]:
        return list(self._coords)

    def labels(self, group: str, dim: str) -> list[str]:
        return list(self._coords[group][dim])

    def last_step(self, group: str) -> None:
        return None

    def append(self, group: str, step: int, **arrays) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Watch:
    """Per-step routing / loss / grad rows of one model into one writer (which it owns)."""

    def __init__(self, model, routers, writer, *, every: int = 1, grad_every: int = 0,
                 tasks: Sequence[str] | None = None, kinds: Callable | None = None,
                 kind_names: Sequence[str] | None = None, capacity_factor: float = 1.0,
                 distributed: bool = False, start_step: int = 0, monitor=None,
                 token_probe=None, token_every: int = 0):
        """``model`` is the bare module (not a DDP wrapper); ``routers`` its adapter
        (:class:`ModelRouters` or ``moe_probe.hf.routers.HFRouters``). ``tasks``: the names of the
        two task losses ``backward`` gets at grad steps (stored as und / gen, in this order);
        None = no gradient conflict. ``monitor``: a :class:`~moe_probe.trace.online.FindingMonitor`
        run after each closed step (online findings). ``token_probe``: a
        :class:`~moe_probe.trace.tokens.TokenProbe` whose row is written every ``token_every``
        steps. See :func:`moe_probe.watch` for the rest."""
        check_settings(every=every, grad_every=grad_every, tasks=tasks, kinds=kinds,
                       kind_names=kind_names, capacity_factor=capacity_factor)
        self.model, self.routers, self.writer = model, routers, writer
        self.every, self.grad_every = every, grad_every
        self.tasks = tuple(tasks) if tasks is not None else None
        self.distributed = distributed
        self._native = kind_names is None and routers.kind_names is not None
        self.kind_names = tuple(kind_names if kind_names is not None else routers.kind_names or ("text",))
        self._kinds_fn = kinds
        self._groups = set(writer.groups)
        self._counter = None
        if every > 0 and "routing" in self._groups:
            p = next(model.parameters(), None)
            self._counter = RoutingCounter(routers.layers, routers.infos, capacity_factor,
                                           p.device if p is not None else "cpu",
                                           modalities=self.kind_names)
            self._counter.distributed = distributed
        self._loss_terms = writer_labels(writer, "loss", "term")
        self._grad: GradConflictTracer | None = None
        self._stack: ExitStack | None = None
        self._counting = self._grad_on = False
        self._step = start_step
        """The open step (sampling is decided when a step opens)."""
        self._pending = None
        self._last_seen = self._train_fwd = False
        self._kind_T: torch.Tensor | None = None
        self._keep_T: torch.Tensor | None = None
        self.monitor = monitor
        self._token_probe = token_probe if "token_routing" in self._groups else None
        self.token_every = token_every

    @property
    def should_stop(self) -> bool:
        """A finding stopped training (``on_finding="stop"``): the loop should end here; the
        store holds every row up to the stopping step (flushed). ``stopped`` says why."""
        return self.monitor is not None and self.monitor.should_stop

    @property
    def stopped(self):
        """The :class:`~moe_probe.trace.online.StopTraining` that stopped training, or None."""
        return None if self.monitor is None else self.monitor.stopped

    # ------------------------------------------------------------------ a step
    def begin_step(self, step: int) -> None:
        """Decide this step's tracers; attach the router hooks at a routing step."""
        if self.should_stop:
            raise self.stopped
        self._detach()
        self._step = step
        self._pending = self._kind_T = self._keep_T = None
        self._train_fwd = False  # set by each model forward (_before_forward)
        self._last_seen = False  # backward(last=True) was called in this step
        self._counting = self._counter is not None and due(step, self.every)
        if self._counting:
            self._counter.reset()  # nothing from an abandoned step leaks into this row
            self._stack = ExitStack()
            self._stack.enter_context(hooks(self.model, self.routers.hook_fns(self._on_router)))
            self._stack.enter_context(before_forward(self.model, self._before_forward))
        self._grad_on = "grad" in self._groups and due(step, self.grad_every)
        if self._grad_on:
            if self._grad is None:
                self._grad = self.routers.grad_tracer(self.distributed)
            self._grad.start()

    def kinds(self, labels) -> None:
        """Kind ids of the next forward's tokens: ``(B, S)`` per token or ``(B,)`` per sample, into
        ``kind_names``; -1 = not counted. Checked against that forward's inputs."""
        if self._counting:  # an unsampled step counts nothing, so its labels are not kept either
            self._pending = labels

    def backward(self, losses, *, last: bool = False) -> None:
        """One micro-batch's backward. ``losses``: a loss tensor, or a dict of task losses
        (``{first: l1, second: l2}`` of ``tasks``): at a grad step the two-pass tracer, whose
        update is bit-identical to the plain ``(l1 + l2).backward()`` run otherwise. ``last``:
        the step's last micro-batch (optional; at a grad step the tracer then keeps only the
        sums of the per-task gradients, ~3% of the step faster; another backward before
        ``step`` is then refused, at any step)."""
        if self._last_seen:
            raise ValueError(f"backward after step {self._step}'s last micro-batch (last=True): "
                             "close the step (w.step) first")
        if isinstance(losses, torch.Tensor):
            if self._grad_on:
                raise ValueError(f"step {self._step} measures gradient conflict: pass the two task "
                                 f"losses, backward({{{self.tasks[0]!r}: ..., {self.tasks[1]!r}: ...}})")
            losses.backward()
        else:
            if self.tasks is not None:
                if not set(losses) <= set(self.tasks):
                    raise ValueError(f"backward got losses {sorted(losses)}; expected the tasks "
                                     f"{list(self.tasks)}")
                losses = {role: losses[t] for role, t in zip(("und", "gen"), self.tasks)
                          if t in losses}
            if self._grad_on:
                self._grad.backward(losses, last=last)
            else:
                plain_backward(losses)
        self._last_seen = last

    def end_step(self, step: int, losses=None) -> None:
        """Remove the step's hooks, then hand the loss / routing / grad rows to the writer."""
        loss = None if losses is None or self._loss_terms is None else self._loss_row(losses)
        self._detach()
        if loss is not None:
            self.writer.append("loss", step, value=loss)
        if self._counting:
            self._counting = False
            self.writer.append("routing", step, **self._counter.finish())
        if self._grad_on:
            self._grad_on = False
            self.writer.append("grad", step, **self._grad.finish())
        if self._token_probe is not None and due(step, self.token_every):
            self.writer.append("token_routing", step, **self._token_probe.row(self.model))
        if self.monitor is not None and self.monitor.after_step(step):
            self.writer.flush()  # the loop stops here: every row up to this step is committed

    def step(self, step: int, losses=None) -> None:
        """Close optimizer step ``step`` (rows written) and open ``step + 1``."""
        if self.should_stop:
            raise self.stopped  # the loop went on after w.should_stop
        if step != self._step:
            raise ValueError(f"step {step} closed while step {self._step} is open: steps are "
                             "consecutive from start_step (watch(..., start_step=N))")
        self.end_step(step, losses)
        if not self.should_stop:
            self.begin_step(step + 1)

    @property
    def grad_step(self) -> bool:
        """Whether the open step measures gradient conflict (``backward`` then needs the task
        losses)."""
        return self._grad_on

    def log_losses(self, step: int, losses) -> None:
        """A loss row for ``step`` when the loop learns its losses after closing the step (the
        HF Trainer logs them after its step callbacks); same values as ``end_step``'s."""
        if self._loss_terms is not None:
            self.writer.append("loss", step, value=self._loss_row(losses))

    def _loss_row(self, losses) -> np.ndarray:
        """Values in the store's ``term`` order (NaN for a term not given); a bare number is
        ``total``; a name the run does not have is refused (its terms are fixed at creation)."""
        if not isinstance(losses, dict):
            losses = {"total": losses}
        unknown = sorted(set(losses) - set(self._loss_terms))
        if unknown:
            raise ValueError(f"loss terms {unknown} are not in this run's terms {self._loss_terms} "
                             "(declare them with loss_terms=)")
        return np.array([float(losses[t]) if t in losses else math.nan for t in self._loss_terms])

    # ------------------------------------------------------------------ hooks
    def _before_forward(self, args, kwargs) -> None:
        labels, self._pending = self._pending, None
        self._kind_T = self._keep_T = None
        self._train_fwd = self._training_forward()
        if not self._train_fwd:
            return
        if labels is None and self._kinds_fn is not None:
            labels = self._kinds_fn(*args, **kwargs)
        if labels is None:
            return
        shape_BS, valid_N = self.routers.tokens(args, kwargs)
        kind_T = token_kinds(labels, shape_BS, self.kind_names)
        if valid_N is not None:
            kind_T = kind_T[valid_N.to(kind_T.device)]
        dev = self._counter.device
        if bool((kind_T < 0).any()):
            self._keep_T = (kind_T >= 0).to(dev)
        self._kind_T = kind_T.to(dev)

    def _training_forward(self) -> bool:
        """Whether the model's forward starting now is one of training: it builds a graph (in
        train mode or not: a loop may never call ``.train()``). Forwards under no_grad are left
        out, in either mode: an evaluation, and the extra train-mode forwards some trainers run
        for metrics or generation (TRL's), whose tokens no update learns from. Decided once, at
        the model's forward, not at each router call: under reentrant activation checkpointing
        a checkpointed block runs its first forward under no_grad inside a forward that builds
        a graph."""
        return torch.is_grad_enabled() and _graph_task_id() < 0

    def _on_router(self, li: int, out) -> None:
        # a router call recomputed inside backward (activation checkpointing) is not counted
        # again
        if not (self._train_fwd and _graph_task_id() < 0):
            return
        rec = self.routers.record(li, out)
        T = rec.logits_TE.shape[0]
        kind_T = self._kind_T
        if kind_T is not None:
            if kind_T.shape[0] != T:
                raise ValueError(f"kinds: {kind_T.shape[0]} labelled tokens, but layer "
                                 f"{self.routers.layers[li]} routed {T}")
            if self._keep_T is not None:
                rec, kind_T = _select(rec, self._keep_T), kind_T[self._keep_T]
        elif rec.modality_T is None or not self._native:
            kind_T = torch.zeros(T, dtype=torch.int64, device=rec.logits_TE.device)
        else:
            kind_T = rec.modality_T
        if kind_T is not rec.modality_T:
            rec = dataclasses.replace(rec, modality_T=kind_T)
        self._counter.add(li, rec)

    def _detach(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    # ------------------------------------------------------------------ lifetime
    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        """Remove any hook still attached (a step that raised), then close the writer (rows
        still queued are written)."""
        self._detach()
        self._counting = self._grad_on = False
        self.writer.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            # Never mask the caller's error with a writer error; hooks still go.
            self._detach()
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
        return False


def _select(rec: RouterRecord, keep_T: torch.Tensor) -> RouterRecord:
    return dataclasses.replace(
        rec, logits_TE=rec.logits_TE[keep_T.to(rec.logits_TE.device)],
        topk_ids_TK=rec.topk_ids_TK[keep_T.to(rec.topk_ids_TK.device)],
        topk_weights_TK=rec.topk_weights_TK[keep_T.to(rec.topk_weights_TK.device)],
        kept_TK=None if rec.kept_TK is None else rec.kept_TK[keep_T.to(rec.kept_TK.device)])


def check_settings(*, every, grad_every, tasks, kinds, kind_names, capacity_factor) -> None:
    """One-line ValueError for settings :class:`Watch` cannot run with."""
    for name, v in (("every", every), ("grad_every", grad_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0 = never), got {v!r}")
    if grad_every > 0 and (tasks is None or len(tasks) != 2 or len(set(tasks)) != 2
                           or not all(isinstance(t, str) for t in tasks)):
        raise ValueError(f"grad_every needs two tasks: tasks=(first, second) naming the two task "
                         f"losses backward() gets, got tasks={tasks!r}")
    if kinds is not None and not callable(kinds):
        raise ValueError("kinds must be a callable on the forward's inputs (or None); to label one "
                         "forward's tokens call w.kinds(labels) before it")
    if kind_names is not None:
        names = list(kind_names)
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"kind_names must be distinct non-empty strings, got {kind_names!r}")
    if not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
