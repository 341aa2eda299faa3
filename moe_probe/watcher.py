"""``moe_probe.watch``: trace any training loop into a run's store (``OUT/traces.zarr``).

    with moe_probe.watch(model, "runs/ft", kind_names=["text", "code"],
                         kinds=lambda input_ids, **kw: kw["token_type_ids"]) as w:
        for step in range(steps):
            for micro in micro_batches:
                out = model(**micro)
                w.backward(out.loss / len(micro_batches))
            optimizer.step(); optimizer.zero_grad()
            w.step(step, losses=out.loss)

The same :class:`~moe_probe.trace.watch.Watch` moe_probe's own trainer runs (one tracing path);
this module only picks the model's adapter and creates the run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from moe_probe.modalities import LOSS_TERMS
from moe_probe.run import Run
from moe_probe.store.schema import default_coords
from moe_probe.store.writer import StoreWriter
from moe_probe.trace.online import check_on_finding, monitored
from moe_probe.trace.tokens import ATTR as TOKEN_ATTR, TokenProbe
from moe_probe.trace.watch import ModelRouters, NullWriter, Watch, check_settings


def watch(model, out, *, kinds: Callable | None = None, kind_names: Sequence[str] | None = None,
          every: int = 1, grad_every: int | None = None, tasks: Sequence[str] | None = None,
          capacity_factor: float = 1.0, loss_terms: Sequence[str] = (), start_step: int = 0,
          use_table: bool = True, resume_after: int | None = None, on_finding=None,
          diagnose_every: int = 10, fail_on: str = "collapse",
          report_to: str | Sequence[str] = (), report_dir=None,
          mlflow_uri: str | None = None, probe: dict | None = None, probe_every: int = 0,
          probe_labels=None, label_names: Sequence[str] | None = None,
          decode: Callable | None = None) -> Watch:
    """Trace ``model``'s training into a new run at ``out``; use it as a context manager (hooks
    are removed on exit, also on an exception; queued rows are written).

    - ``model``: moe_probe's ``MultimodalMoE`` or a Hugging Face MoE (routers from the family
      table, else found by structure; ``use_table=False`` forces structure) — the bare module or
      its DDP wrapper.
    - ``out``: a new run directory (created atomically; an existing run or a non-empty directory
      is refused with nothing touched).
    - ``w.step(step, losses=...)`` closes optimizer step ``step``: the counts of every training
      forward since the previous ``step`` (all micro-batches) become one ``routing`` row (a
      forward under no_grad — evaluation, metrics, generation, in either mode — and one
      recomputed in backward by activation checkpointing are not counted). Steps are consecutive from ``start_step`` (a
      step's sampling is decided when it opens; another number is refused).
      ``losses``: a number (``total``) or ``{term: value}`` over ``lm mmu gen aux z total`` plus
      ``loss_terms``; numbers as given (under DDP pass the global mean).
    - ``every``: a routing row every this many steps (0 = never).
    - ``kinds``: a callable getting the forward's own arguments, returning kind ids per token
      ``(B, S)`` or per sample ``(B,)`` (a bool mask = kinds 0/1; -1 = not counted, e.g. padding);
      ``w.kinds(labels)`` labels the next forward instead. ``kind_names``: the kinds (default
      ``["text"]``; moe_probe's model: its own text / vit / vae).
    - ``grad_every``: gradient conflict between ``tasks=(first, second)`` every this many steps;
      the loop then calls ``w.backward({first: l1, second: l2})`` (two passes at a sampled step,
      the update bit-identical to ``(l1 + l2).backward()``, which it runs otherwise);
      ``w.backward(..., last=True)`` on a step's last micro-batch lets the tracer keep only the
      per-task sums (faster), and refuses another backward before ``w.step``.
    - ``capacity_factor``: C of the nominal ``kept`` / capacity rate of dropless routers.
    - ``on_finding``: online findings — every ``diagnose_every`` steps the ``moe-probe diagnose``
      detectors run on the rows written so far (kept in memory, not read back; screened by rollup
      levels kept in memory, as ``diagnose`` screens a store's). ``"warn"``: a
      warning per new finding; ``"stop"``: at the first *critical* finding of ``fail_on``
      (``collapse`` | ``conflict`` | ``any``) the store is flushed, hooks stay off, and
      ``w.should_stop`` turns true (``w.stopped``: the exception naming the finding, raised by
      the next ``w.step`` if the loop goes on); a callable gets each new finding and stops
      training by returning true.
    - ``resume_after``: training resumed from a checkpoint taken after this step: the watch run
      already at ``out`` (same model layout and kinds; another run is refused, nothing touched)
      continues, its rows of later steps dropped, from ``start_step`` (> ``resume_after``); no
      run at ``out`` = a new one.
    - ``report_to``: tools that get each step's bounded summary live, any of ``"tensorboard"``,
      ``"wandb"``, ``"mlflow"`` (``moe_probe.export.live``): TensorBoard logs in ``report_dir``
      (default ``out/tb``), MLflow at ``mlflow_uri`` (default ``MLFLOW_TRACKING_URI``), W&B by
      its own settings (``WANDB_PROJECT``, ``WANDB_MODE``, ...). A missing client is refused
      before anything is created.
    - ``probe``: a fixed probe batch (the model's keyword inputs, e.g. ``input_ids`` and
      ``attention_mask``): every ``probe_every`` steps one no-grad forward on it records
      token-level routing (the ``token_routing`` group: per token its id, kind, label and the
      top-k ids and gates per layer). ``probe_labels``: the sample's label per sample (B,) or
      token (B, S), or the name of a ``probe`` entry holding them (e.g. a topic column; not
      passed to the model), -1 = none; ``label_names`` their names; ``decode``: the tokenizer's
      ``decode`` for the words (default ``#id``). Tokens with attention mask 0 are left out.

    Under torch.distributed every rank calls ``watch`` and the same ``step`` / ``backward``; counts
    are summed over ranks; rank 0 alone writes.
    """
    grad_every = 0 if grad_every is None else grad_every
    if on_finding is not None:
        check_on_finding(on_finding, diagnose_every, fail_on)
    if resume_after is not None and not (isinstance(resume_after, int) and 0 <= resume_after < start_step):
        raise ValueError(f"resume_after={resume_after!r}: a step >= 0 before start_step={start_step}")
    check_settings(every=every, grad_every=grad_every, tasks=tasks, kinds=kinds,
                   kind_names=kind_names, capacity_factor=capacity_factor)
    if not all(isinstance(t, str) and t for t in loss_terms):
        raise ValueError(f"loss_terms must be non-empty strings, got {list(loss_terms)!r}")
    bare = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if hasattr(bare, "moe_layers"):
        routers = ModelRouters(bare)
    else:
        from moe_probe.hf.routers import HFRouters

        routers = HFRouters(bare, use_table=use_table)
    names = list(kind_names or routers.kind_names or ("text",))
    coords = default_coords(layers=routers.layers, n_experts=max(i.n_experts for i in routers.infos),
                            groups=("routing", "loss", "grad") if grad_every else ("routing", "loss"))
    token_probe = None
    if probe is not None and not (isinstance(probe_every, int) and probe_every >= 1):
        raise ValueError(f"probe_every={probe_every!r}: a probe needs a step interval >= 1")
    if probe is not None:
        token_probe = TokenProbe(routers, probe, kind_names=names, kinds=kinds, labels=probe_labels,
                                 label_names=label_names, decode=decode)
        coords["token_routing"] = token_probe.tokens.coords(routers.layers, token_probe.top_k)
    coords["routing"]["modality"] = names
    coords["loss"]["term"] = list(dict.fromkeys([*LOSS_TERMS, *loss_terms]))
    settings = {"every": every, "grad_every": grad_every, "tasks": list(tasks or []),
                "capacity_factor": capacity_factor, "kinds": names, "start_step": start_step}
    attrs = {"run": {"name": Path(out).name, "recipe": "watch", "config": json.dumps(settings)},
             "model": {**routers.attrs(), "nominal_capacity": capacity_factor},
             "modalities": names}
    if token_probe is not None:
        attrs[TOKEN_ATTR] = token_probe.tokens.attrs()
    distributed, rank = _distributed()
    report = _report(report_to, report_dir, mlflow_uri)  # every rank: all refuse together
    if rank == 0:
        run = Run(out)
        run.check_writable()
        if resume_after is not None and run.exists():
            writer = _reopen(run, attrs, coords, resume_after)
        else:
            if run.exists():
                raise ValueError(f"{out} already holds a run; watch writes a new run (choose another out)")
            run.create(store_attrs=attrs, store_coords=coords)
            writer = StoreWriter.resume(run.store_path)[0]
        if report is not None:
            writer = report.open(writer, run.path)
    else:
        writer = NullWriter(coords)
    monitor = None
    if on_finding is not None:
        writer, monitor = monitored(writer, out if rank == 0 else None, on_finding=on_finding,
                                    every=diagnose_every, fail_on=fail_on, distributed=distributed)
    w = Watch(bare, routers, writer, every=every, grad_every=grad_every, tasks=tasks, kinds=kinds,
              kind_names=kind_names, capacity_factor=capacity_factor, distributed=distributed,
              start_step=start_step, monitor=monitor, token_probe=token_probe,
              token_every=probe_every)
    w.begin_step(start_step)
    return w


def _reopen(run: Run, attrs: dict, coords: dict, after_step: int) -> StoreWriter:
    """The watch run at ``run`` reopened after ``after_step``; ValueError (nothing touched) when it
    is another run: not a watch run, another model, or other layers / kinds / groups."""
    if not run.has_store():
        raise ValueError(f"{run.path} holds another run (no trace store); choose another out")
    old = run.store().attrs
    model_keys = ("arch", "hf_class")
    differs = run.layout_differences(coords)
    why = ("it was not written by watch" if old.get("run", {}).get("recipe") != "watch"
           else "another model" if any(old.get("model", {}).get(k) != attrs["model"].get(k)
                                       for k in model_keys)
           else f"its {', '.join(differs)} labels differ" if differs else "")
    if why:
        raise ValueError(f"{run.path} holds another run ({why}); resume into the run this training "
                         "wrote, or choose another out")
    return StoreWriter.resume(run.store_path, after_step=after_step)[0]


def _report(report_to, report_dir, mlflow_uri):
    """The checked live-export settings, None without ``report_to``."""
    if not report_to:
        return None
    from moe_probe.export.live import Report

    return Report.parse(report_to, tensorboard_dir=report_dir, mlflow_uri=mlflow_uri).check()


def _distributed() -> tuple[bool, int]:
    """(counts summed over ranks?, this rank) from an initialised torch.distributed group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank()
    return False, 0
