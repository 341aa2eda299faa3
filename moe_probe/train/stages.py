"""Stage orchestration: stage 1 (cached understanding base) then stage 2 (convert + train).

``moe-probe train --recipe symbiotic --out RUN``:
1. builds the stage-1 config from the run's config (:func:`base_config`), hashes it, and
   trains it into the base cache unless a finished base with that hash is already there
   (an unfinished one is resumed). Cache: ``$MOE_PROBE_CACHE/<hash>`` if that variable is
   set, else ``<parent of RUN>/.base/<hash>``. The hash covers the base model, data and
   trainer config and the seed — not the trace settings and not the stage-2 arch, so
   moe / mot / symbiotic / und_only runs of one seed share one base.
2. loads the base, chooses symbiotic groups from its routing on understanding data
   (:func:`count_expert_use`), converts it (:func:`moe_probe.model.convert`) and trains.
A lock file serialises concurrent runs that need the same base.

Under torchrun (:mod:`moe_probe.train.distributed`) both stages train distributed: rank 0 takes
the base lock and decides (reuse / resume / train), every rank trains the base, and a barrier
holds the others until rank 0 has written it. A base trained on N > 1 ranks is cached under its
own key (its micro-batches are not a single process's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from moe_probe.data import MultimodalData, Tokenizer
from moe_probe.model import MultimodalMoE, choose_groups, convert, und_expert_counts
from moe_probe.model.params import n_params
from moe_probe.run import BASE_CACHE, Run
from moe_probe.trace.layout import store_layout
from moe_probe.trace.tokens import data_probe_tokens
from moe_probe.train import checkpoint
from moe_probe.train.config import RunConfig, run_config_from_json, to_dict, to_json
from moe_probe.train.distributed import SINGLE, Dist
from moe_probe.train.evaluate import Evaluator
from moe_probe.train.tracing import open_session
from moe_probe.train.trainer import build_optimizer, fit

UND_MIX = (0.0, 1.0, 1.0)
"""Data mix T2I : LM : MMU of the understanding-only stage-1 base (no generation data)."""


STAGE2_MODEL_FIELDS = ("und_fraction",)
"""ModelConfig fields that only matter after conversion: reset for the base so they cannot split
the base cache."""

NOT_IN_WEIGHTS = ("eval_every", "checkpoint_every", "eval_batches", "eval_images", "gen_per_class",
                  "sample_steps", "group_batches")
"""TrainConfig fields that change what is measured or saved, never the trained weights."""


def base_config(cfg: RunConfig) -> RunConfig:
    """The stage-1 config of a stage-2 run: plain moe, understanding data, ``cfg.base`` trainer."""
    assert cfg.base is not None
    defaults = {f.name: f.default for f in dataclasses.fields(type(cfg.model))}
    model = replace(cfg.model, arch="moe", groups=None,
                    **{k: defaults[k] for k in STAGE2_MODEL_FIELDS})
    return RunConfig(
        recipe=f"{cfg.recipe}/base", model=model,
        data=replace(cfg.data, mix=cfg.base_mix or UND_MIX),
        train=replace(cfg.base, stage=1, seed=cfg.train.seed), trace=cfg.trace)


def base_key(base_cfg: RunConfig, world_size: int = 1) -> str:
    """Cache key: everything that changes the trained base weights (model, data, trainer, seed,
    and the number of ranks when > 1: single-process keys are unchanged)."""
    keyed = {k: v for k, v in to_dict(base_cfg).items() if k in ("model", "data", "train")}
    for k in NOT_IN_WEIGHTS:
        keyed["train"].pop(k)
    if keyed["train"].get("lr_router", 0) is None:  # unset: the keys of bases cached before it
        keyed["train"].pop("lr_router")
    if world_size > 1:
        keyed["world_size"] = world_size
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(run_dir: Path) -> Path:
    env = os.environ.get("MOE_PROBE_CACHE")
    return Path(env) if env else Path(run_dir).resolve().parent / BASE_CACHE


def build_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)  # parameter init is part of what the seed fixes
    return MultimodalMoE(cfg.model, vocab_size)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_base(cfg: RunConfig, run_dir: Path, *, quiet: bool = False, log=print,
                dist: Dist = SINGLE) -> Path:
    """Directory of a finished stage-1 base for ``cfg`` (trained or resumed here if needed)."""
    bcfg = base_config(cfg)
    bdir = cache_dir(run_dir) / base_key(bcfg, dist.world)
    # Only rank 0 takes the lock (another rank waiting on it would starve rank 0's collectives);
    # its decision is broadcast, so every rank trains or skips the base together.
    lock = _locked(bdir.with_name(bdir.name + ".lock")) if dist.is_main else contextlib.nullcontext()
    with lock:
        done = dist.broadcast(read_progress(bdir) if dist.is_main else None)
        if done is not None and done >= bcfg.train.steps:
            log(f"stage 1: reusing base {bdir} ({done} steps)")
            return bdir
        if done is None and bdir.exists() and dist.is_main:
            # A base that died before its first checkpoint: derived data, start it over.
            shutil.rmtree(bdir)
        log(f"stage 1: {'resuming' if done is not None else 'training'} base in {bdir}")
        run_stage(bcfg, bdir, how="new" if done is None else "resume", quiet=quiet, log=log,
                  dist=dist)
        dist.barrier()  # rank 0 has written the finished base before anyone loads it
    return bdir


def read_progress(run_dir: Path) -> int | None:
    """Steps done according to the run's last checkpoint (None = no checkpoint yet)."""
    return Run(run_dir).progress()


def count_expert_use(model, data: MultimodalData, n_batches: int, batch_size: int,
                     seed: int) -> torch.Tensor:
    """counts_LE: top-k picks (before drops) of text+vit tokens per layer on understanding data.

    Counted by the model's ``und_expert_counts`` through the ``hook_router`` hook points (hooks
    removed in a ``finally`` there). Batches come from their own seeded generator, so choosing
    groups never moves the training data stream."""
    gen = torch.Generator().manual_seed(seed)
    return und_expert_counts(model, (data.batch("train", batch_size, gen) for _ in range(n_batches)))


def _resumed(cfg: RunConfig, run_dir: Path, world_size: int = 1):
    """Model, optimizer, generator and step from RUN_DIR's checkpoint.

    ``cfg`` is the saved config with the user's --steps/--set applied (commands.train). The
    stage-2 model is rebuilt as base skeleton + ``convert`` with the saved groups, then every
    tensor is overwritten from the checkpoint, so no base model is needed to resume."""
    payload = checkpoint.load(run_dir)
    saved_world = int(payload.get("extra", {}).get("world_size", 1))
    if saved_world != world_size:
        # Another world size would change the micro-batches (and so the training) mid-run.
        raise ValueError(f"{run_dir} was trained on {saved_world} process(es); resume it with "
                         f"the same number (torchrun --nproc_per_node {saved_world}), not {world_size}")
    model, tokenizer = checkpoint.skeleton(payload, cfg.model)
    groups = payload["groups"]
    optimizer = build_optimizer(model, cfg.train)
    generator = torch.Generator()
    start = checkpoint.restore(payload, model=model, optimizer=optimizer, generator=generator)
    return cfg, model, tokenizer, groups, optimizer, generator, start, payload.get("extra", {})


def _converted(cfg: RunConfig, base_dir: Path):
    """Stage 2 from a finished base: load it, choose groups (symbiotic), convert."""
    payload = checkpoint.load(base_dir)
    tokenizer = Tokenizer.from_state_dict(payload["tokenizer"])
    model = build_model(run_config_from_json(payload["config"]), tokenizer.vocab_size)
    model.load_state_dict(payload["model"])
    groups = None
    if cfg.model.arch == "symbiotic":
        groups = cfg.model.groups
        if groups is None:
            und_data = MultimodalData(replace(cfg.data, mix=UND_MIX), cfg.train.seed, tokenizer)
            counts = count_expert_use(model, und_data, cfg.train.group_batches,
                                      cfg.train.batch_size, cfg.train.seed)
            groups = choose_groups(counts, cfg.model.und_fraction)
        groups = _plain(groups)
    model = convert(model, cfg.model.arch, groups=groups)
    return replace(cfg, model=replace(cfg.model, groups=groups)), model, tokenizer, groups


def run_stage(cfg: RunConfig, run_dir: Path, *, how: str, quiet: bool = False,
              log=print, dist: Dist = SINGLE, fail_on: str | None = None, report=None) -> dict:
    """Train one stage into ``run_dir``; returns the run's summary dict (also in its summary file:
    recipe, arch, n_params, groups, base, last eval).

    ``how``: ``"new"`` (the run directory appears complete, atomically, once the model is built),
    ``"start_over"`` (a run that died before its first checkpoint: same config, its store
    truncated to 0 rows) or ``"resume"`` (from the last checkpoint). ``fail_on``: online findings
    (``tracing.open_session``); a stop raises the session's ``StopTraining`` once the checkpoint
    and the summary are written. ``report``: live export of this stage's summary
    (``moe_probe.export.live.Report``; a base stage is not reported)."""
    assert how in ("new", "start_over", "resume"), how
    run = Run(run_dir)
    optimizer = generator = None
    start, extra = 0, {}
    if how == "resume":
        cfg, model, tokenizer, groups, optimizer, generator, start, extra = _resumed(
            cfg, run_dir, dist.world)
        summary = run.summary()
    elif cfg.train.stage == 1:
        tokenizer = Tokenizer.build(cfg.data.vocab_words)
        model, groups, summary = build_model(cfg, tokenizer.vocab_size), None, {}
    else:
        base_dir = ensure_base(cfg, run_dir, quiet=quiet, log=log, dist=dist)
        cfg, model, tokenizer, groups = _converted(cfg, base_dir)
        log(f"stage 2: {cfg.model.arch} from base {base_dir.name}"
            + (f", und experts per layer: {groups}" if groups is not None else ""))
        base_eval = Run(base_dir).summary().get("eval", {})
        summary = {"base": {"dir": str(base_dir.resolve()), "key": base_dir.name, "eval": base_eval}}

    t0 = time.perf_counter()
    data = MultimodalData(cfg.data, cfg.train.seed, tokenizer)
    evaluator = Evaluator(cfg, data, tokenizer)
    if dist.is_main:  # rank 0 alone writes the run's files
        if how == "resume":
            # Rewritten: --steps / --set train.* may have changed the plan.
            run.write_config(to_dict(cfg))
        else:
            summary.update({"recipe": cfg.recipe, "arch": cfg.model.arch, "stage": cfg.train.stage,
                            "seed": cfg.train.seed, "n_params": n_params(model), "groups": groups})
            attrs, coords = store_layout(model, eval_metrics=list(evaluator.metric_names),
                                         probe_tokens=data_probe_tokens(data))
            run_attrs = {"name": run.path.name, "recipe": cfg.recipe, "seed": cfg.train.seed,
                         "stage": cfg.train.stage, "config": to_json(cfg)}
            files = dict(store_attrs={"run": run_attrs, **attrs}, store_coords=coords,
                         config=to_dict(cfg), summary=summary,
                         groups=None if groups is None else {"arch": cfg.model.arch,
                                                             "groups": groups})
            run.create(**files) if how == "new" else run.start_over(**files)
    session = open_session(cfg, run, model, data, evaluator.metric_names, resume_step=start,
                           dist=dist, fail_on=fail_on, report=report)
    session.restore_snapshot(extra.get("snapshot"), start)
    try:
        metrics = fit(cfg, run_dir, model=model, data=data, tokenizer=tokenizer, session=session,
                      evaluator=evaluator, optimizer=optimizer, generator=generator,
                      start_step=start, groups=groups, quiet=quiet, dist=dist)
    finally:
        session.close()
    if not dist.is_main:
        if session.stopped is not None:
            raise session.stopped
        return summary
    # Wall-clock of this stage's training + evaluation (summed over resumes), base excluded.
    wall = summary.get("wall_s", 0.0) + time.perf_counter() - t0
    summary.update(eval=metrics, steps=run.progress(), wall_s=round(wall, 1))
    run.write_summary(summary)
    if session.stopped is not None:
        raise session.stopped
    return summary


def _plain(groups):
    """Per-layer groups as nested lists of ints (JSON and weights_only friendly)."""
    if groups is None:
        return None
    if isinstance(groups, dict):
        return {str(k): _plain(v) for k, v in groups.items()}
    if isinstance(groups, torch.Tensor):
        return groups.tolist()
    if isinstance(groups, (list, tuple)):
        return [_plain(g) for g in groups]
    return int(groups)


def train_run(cfg: RunConfig, run_dir: Path, *, how: str, quiet: bool = False, log=print,
              dist: Dist = SINGLE, fail_on: str | None = None, report=None) -> dict:
    """Entry point of ``moe-probe train``: the base first where a stage-2 run needs one
    (``fail_on`` and ``report`` concern this run, not its base)."""
    return run_stage(cfg, Path(run_dir), how=how, quiet=quiet, log=log, dist=dist, fail_on=fail_on,
                     report=report)
