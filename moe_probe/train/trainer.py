"""The training loop of one stage, top to bottom.

    optimizer  AdamW, one param group per model tag (differential LR)
    schedule   linear warm-up, cosine decay; shared-expert shielding by step
    step       micro-batches -> session.backward -> session.end_step -> clip -> optimizer
               -> loss-free balance-bias update
    eval       at the start step, every eval_every, at the end -> session.on_eval
    checkpoint every checkpoint_every and at the end (atomic; store flushed first)

The trainer never knows what is traced: a :class:`TraceSession` gets every hook point it
needs from the model, and the store rows from the session (INTERNAL_API §3).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from moe_probe.train import checkpoint
from moe_probe.train.config import RunConfig, TrainConfig, to_json
from moe_probe.train.distributed import SINGLE, Dist

LR_TAGS = ("gen_experts", "gen_router", "gen_io", "gen_backbone", "und_experts", "und_router",
           "shared", "backbone")
NEW_TAGS = frozenset({"gen_experts", "gen_router", "gen_io", "gen_backbone"})
"""What stage 2 adds: trained at ``lr_new`` (paper: 1e-4 vs 1e-6 for what the base knows)."""
ROUTER_TAGS = frozenset({"und_router", "gen_router"})
"""Trained at ``lr_router`` when it is set."""


def tag_lr(tag: str, tc: TrainConfig) -> float:
    """LR of a model param-group tag under ``tc`` (see TrainConfig.lr_* docs)."""
    if tc.lr_router is not None and tag in ROUTER_TAGS:
        return tc.lr_router
    if not tc.differential_lr:
        return tc.lr_new
    if tag in NEW_TAGS:
        return tc.lr_new
    if tag == "backbone":
        return tc.lr_base if tc.lr_backbone is None else tc.lr_backbone
    return tc.lr_base


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with one group per tag of ``model.param_groups()``; every parameter exactly once."""
    named = dict(model.named_parameters())
    seen: set[str] = set()
    groups = []
    for tag, names in model.param_groups().items():
        assert tag in LR_TAGS, f"model.param_groups() returned an unknown tag {tag!r}"
        assert not seen.intersection(names), f"parameters in two groups: {seen.intersection(names)}"
        seen.update(names)
        params = [named[n] for n in names]
        if params:
            lr = tag_lr(tag, tc)
            groups.append({"params": params, "lr": lr, "peak_lr": lr, "tag": tag})
    assert seen == set(named), f"parameters in no group: {sorted(set(named) - seen)[:5]}"
    # Frozen (lr 0) groups still go to AdamW so a resumed optimizer has the same layout.
    return torch.optim.AdamW(groups, betas=tc.betas, weight_decay=tc.weight_decay)


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Multiplier on each group's peak LR at optimizer step ``step`` (0-based)."""
    if tc.warmup and step < tc.warmup:
        return (step + 1) / tc.warmup
    span = max(1, tc.steps - tc.warmup)
    progress = min(1.0, (step - tc.warmup) / span)
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def shield_scale(step: int, tc: TrainConfig) -> float:
    """Gradient scale of vae tokens into shared-expert weights at ``step``: 0 shielded, 1 off."""
    if not tc.shielding:
        return 1.0
    return 0.0 if step < tc.shield_steps else tc.shield_release


def _due(done: int, every: int, total: int) -> bool:
    return done == total or (every > 0 and done % every == 0)


def fit(cfg: RunConfig, run_dir: Path, *, model, data, tokenizer, session, evaluator,
        optimizer=None, generator: torch.Generator | None = None, start_step: int = 0,
        groups=None, quiet: bool = False, dist: Dist = SINGLE) -> dict[str, float]:
    """Train ``model`` for ``cfg.train.steps`` optimizer steps from ``start_step``.

    ``optimizer`` and ``generator`` come restored from a checkpoint on resume; fresh ones are
    built otherwise. Returns the last evaluation's metrics ({} on ranks other than 0).
    Under torchrun (``dist``) see :mod:`moe_probe.train.distributed` for who does what.
    """
    tc = cfg.train
    optimizer = optimizer or build_optimizer(model, tc)
    if generator is None:
        generator = torch.Generator().manual_seed(tc.seed)
    micro_size = tc.batch_size // (tc.micro_batches * dist.world)
    config_json = to_json(cfg)
    net = dist.wrap(model)  # training forwards only; eval and tracers use the bare model

    def save(done: int) -> None:
        if not dist.is_main:
            return
        # The store is flushed first: a checkpoint never points past committed trace rows.
        session.flush()
        checkpoint.save(run_dir, model=model, optimizer=optimizer, generator=generator, step=done,
                        config_json=config_json, tokenizer_state=tokenizer.state_dict(),
                        groups=groups, extra={"world_size": dist.world,
                                              "snapshot": session.snapshot_state()})

    def evaluate(done: int) -> dict[str, float]:
        if not dist.is_main:  # rank 0 evaluates and writes; the others only train and trace
            return {}
        metrics = evaluator(model)
        session.on_eval(done, metrics, model, final=done >= tc.steps)
        return metrics

    # Fresh runs evaluate the starting point; resumed runs re-write the eval row at the
    # checkpoint step (the store dropped it, see tracing.open_session) with identical values.
    metrics = evaluate(start_step)
    if start_step == 0 and tc.steps == 0:
        save(0)

    show = not quiet and dist.is_main and sys.stderr.isatty()
    bar = tqdm(range(start_step, tc.steps), initial=start_step, total=tc.steps, disable=not show,
               desc=f"stage {tc.stage} {cfg.model.arch}", dynamic_ncols=True)
    for step in bar:
        model.train()
        factor = lr_factor(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        model.set_shield(shield_scale(step, tc))

        session.begin_step(step)
        sums: dict[str, torch.Tensor] = {}
        for i in range(tc.micro_batches * dist.world):
            batch = data.batch("train", micro_size, generator)
            # Every rank draws the whole global batch (same generator, so the data position is
            # rank-independent) and runs its own contiguous share of the micro-batches.
            if i // tc.micro_batches != dist.rank:
                continue
            last = (i + 1) % tc.micro_batches == 0
            with dist.grad_sync(net, last=last):
                out = net(batch)
                # Mean over micro-batches: the accumulated gradient equals one big batch's
                # (DDP's average over ranks completes the mean over all of them).
                session.backward({k: v / tc.micro_batches for k, v in out.task_losses.items()},
                                 step, last=last)
            for k, v in out.losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach() / tc.micro_batches
        if dist.enabled:  # the loss row is the global batch's (one collective per step)
            names = sorted(sums)
            means = dist.mean_(torch.stack([sums[k] for k in names]))
            sums = dict(zip(names, means))
        losses = {k: float(v) for k, v in sums.items()}
        if not all(math.isfinite(v) for v in losses.values()):
            # The run diverged under the user's settings: say so in one line (exit 2); the last
            # checkpoint and the committed trace rows stay as they are.
            raise ValueError(f"non-finite loss at step {step} ("
                             + ", ".join(f"{k} {v:.3g}" for k, v in losses.items())
                             + "); lower train.lr_* or set train.grad_clip")
        session.end_step(step, losses)

        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Loss-free balancing after the step, from this step's routing (never inside forward).
        if cfg.model.bias_balance:
            dist.sum_balance_loads(model)
            model.update_balance_bias()

        done = step + 1
        if show:
            bar.set_postfix(total=f"{losses['total']:.3f}", lr=f"{factor:.2f}", refresh=False)
        if _due(done, tc.eval_every, tc.steps):
            metrics = evaluate(done)
            if show:
                bar.write(f"step {done}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        stop = session.should_stop  # a finding stopped training (--fail-on): checkpoint here
        if stop or _due(done, tc.checkpoint_every, tc.steps):
            save(done)
        if stop:
            break
    bar.close()
    return metrics
