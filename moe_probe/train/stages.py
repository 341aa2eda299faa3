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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from moe_probe.data import MultimodalData, Tokenizer
from moe_probe.model import MultimodalMoE, choose_groups, convert, und_expert_counts
from moe_probe.train import checkpoint
from moe_probe.train.config import RunConfig, run_config_from_json, to_dict
from moe_probe.train.evaluate import Evaluator
from moe_probe.train.tracing import open_session
from moe_probe.train.trainer import build_optimizer, fit

UND_MIX = (0, 1, 1)
"""Data mix T2I : LM : MMU of the understanding-only stage-1 base (no generation data)."""


def base_config(cfg: RunConfig) -> RunConfig:
    """The stage-1 config of a stage-2 run: plain moe, understanding data, ``cfg.base`` trainer."""
    assert cfg.base is not None
    model = replace(cfg.model, arch="moe", groups=None)
    defaults = type(cfg.model)(**_required_model_fields(cfg.model))
    # Stage-2-only fields go back to their defaults so they cannot split the base cache.
    for name in STAGE2_MODEL_FIELDS:
        if hasattr(model, name):
            model = replace(model, **{name: getattr(defaults, name)})
    return RunConfig(
        recipe=f"{cfg.recipe}/base", model=model,
        data=replace(cfg.data, mix=cfg.base_mix or UND_MIX),
        train=replace(cfg.base, stage=1, seed=cfg.train.seed), trace=cfg.trace)


STAGE2_MODEL_FIELDS = ("und_fraction",)
"""ModelConfig fields that only matter after conversion (ignored for the base)."""


def _required_model_fields(m) -> dict:
    import dataclasses

    return {f.name: getattr(m, f.name) for f in dataclasses.fields(m)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


def base_key(base_cfg: RunConfig) -> str:
    """Cache key: everything that changes the trained base weights."""
    keyed = {k: v for k, v in to_dict(base_cfg).items() if k in ("model", "data", "train")}
    keyed["train"].pop("eval_every", None)
    keyed["train"].pop("checkpoint_every", None)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(run_dir: Path) -> Path:
    env = os.environ.get("MOE_PROBE_CACHE")
    return Path(env) if env else Path(run_dir).resolve().parent / ".base"


def build_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(cfg.train.seed)  # parameter init is part of what the seed fixes
    return MultimodalMoE(cfg.model, vocab_size)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_base(cfg: RunConfig, run_dir: Path, *, quiet: bool = False, log=print) -> Path:
    """Directory of a finished stage-1 base for ``cfg`` (trained or resumed here if needed)."""
    bcfg = base_config(cfg)
    bdir = cache_dir(run_dir) / base_key(bcfg)
    with _locked(bdir.with_name(bdir.name + ".lock")):
        done = read_progress(bdir)
        if done is not None and done >= bcfg.train.steps:
            log(f"stage 1: reusing base {bdir} ({done} steps)")
            return bdir
        log(f"stage 1: training base into {bdir}")
        run_stage(bcfg, bdir, resume=done is not None, quiet=quiet)
    return bdir


def read_progress(run_dir: Path) -> int | None:
    """Steps done according to RUN_DIR/progress.json (None = no checkpoint yet)."""
    p = Path(run_dir) / checkpoint.PROGRESS
    if not p.is_file():
        return None
    return int(json.loads(p.read_text())["step"])


def count_expert_use(model, data: MultimodalData, n_batches: int, batch_size: int,
                     seed: int) -> torch.Tensor:
    """counts_LE: top-k picks (before drops) of text+vit tokens per layer on understanding data.

    Counted by the model's ``und_expert_counts`` through the ``hook_router`` hook points (hooks
    removed in a ``finally`` there). Batches come from their own seeded generator, so choosing
    groups never moves the training data stream."""
    gen = torch.Generator().manual_seed(seed)
    return und_expert_counts(model, (data.batch("train", batch_size, gen) for _ in range(n_batches)))


def run_stage(cfg: RunConfig, run_dir: Path, *, resume: bool, quiet: bool = False,
              base_dir: Path | None = None, log=print) -> dict:
    """Train one stage into ``run_dir`` (fresh or resumed); returns the run's summary dict."""
    run_dir = Path(run_dir)
    data = MultimodalData(cfg.data, cfg.train.seed)
    if resume:
        # ``cfg`` is the saved config with the user's --steps/--set applied (commands.train).
        payload = checkpoint.load(run_dir)
        tokenizer = Tokenizer.from_state_dict(payload["tokenizer"])
        model = build_model(replace(cfg, model=replace(cfg.model, arch="moe", groups=None)),
                            tokenizer.vocab_size)
        groups = payload["groups"]
        if cfg.model.arch != "moe":
            model = convert(model, cfg.model.arch, groups=groups)
        optimizer = build_optimizer(model, cfg.train)
        generator = torch.Generator()
        start = checkpoint.restore(payload, model=model, optimizer=optimizer, generator=generator)
        summary = json.loads((run_dir / "run.json").read_text())
    elif cfg.train.stage == 1:
        tokenizer = data.tokenizer
        model, groups, start = build_model(cfg, tokenizer.vocab_size), None, 0
        optimizer, generator = None, None
        summary = {}
    else:
        base_dir = base_dir or ensure_base(cfg, run_dir, quiet=quiet, log=log)
        bpay = checkpoint.load(base_dir)
        tokenizer = Tokenizer.from_state_dict(bpay["tokenizer"])
        bcfg = run_config_from_json(bpay["config"])
        model = build_model(bcfg, tokenizer.vocab_size)
        model.load_state_dict(bpay["model"])
        groups = None
        if cfg.model.arch == "symbiotic":
            groups = cfg.model.groups
            if groups is None:
                und_data = MultimodalData(replace(cfg.data, mix=UND_MIX), cfg.train.seed)
                counts = count_expert_use(model, und_data, cfg.train.group_batches,
                                          cfg.train.batch_size, cfg.train.seed)
                groups = choose_groups(counts, cfg.model.und_fraction)
        if cfg.model.arch != "moe":
            model = convert(model, cfg.model.arch, groups=groups)
        groups = _plain(groups)
        cfg = replace(cfg, model=replace(cfg.model, groups=groups))
        optimizer, generator, start = None, None, 0
        base_summary = json.loads((Path(base_dir) / "run.json").read_text())
        summary = {"base": {"dir": str(Path(base_dir).resolve()), "key": base_dir.name,
                            "eval": base_summary.get("eval", {})}}
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        summary.update({"recipe": cfg.recipe, "arch": cfg.model.arch, "stage": cfg.train.stage,
                        "seed": cfg.train.seed, "n_params": n_params(model), "groups": groups})
        _write_json(run_dir / "config.json", to_dict(cfg))
        _write_json(run_dir / "run.json", summary)
        if groups is not None:
            _write_json(run_dir / "groups.json", {"arch": cfg.model.arch, "groups": groups})

    evaluator = Evaluator(cfg, data, tokenizer)
    session = open_session(cfg, run_dir, model, data, evaluator.metric_names,
                           resume=resume, resume_step=start)
    try:
        metrics = fit(cfg, run_dir, model=model, data=data, tokenizer=tokenizer, session=session,
                      evaluator=evaluator, optimizer=optimizer, generator=generator,
                      start_step=start, groups=groups, quiet=quiet)
    finally:
        session.close()
    if metrics:
        summary["eval"] = metrics
    summary["steps"] = read_progress(run_dir)
    _write_json(run_dir / "run.json", summary)
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


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)


def train_run(cfg: RunConfig, run_dir: Path, *, resume: bool, quiet: bool = False, log=print) -> dict:
    """Entry point of ``moe-probe train``: the base first where a stage-2 run needs one."""
    return run_stage(cfg, Path(run_dir), resume=resume, quiet=quiet, log=log)
