"""Training configuration: frozen dataclasses, ``--set key=value`` overrides, validation.

A :class:`RunConfig` is everything needed to reproduce a run: the model, the data, the
trainer, the tracers, the recipe name — and, for stage 2, the stage-1 (base) trainer so a
run can rebuild its base model from scratch. Overrides use dotted keys
(``model.top_k=2``, ``train.lr_new=3e-4``, ``base.steps=100``) and are coerced to the
field's declared type; a bad key or value is one clear ``ValueError`` line.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields

from moe_probe.data import DataConfig
from moe_probe.overrides import dataclass_type, to_type
from moe_probe.model.config import ModelConfig
from moe_probe.trace.config import TraceConfig


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training stage: optimiser, schedules, evaluation and checkpoint cadence."""

    stage: int = 2
    """1 = understanding base model (LM + MMU only); 2 = continue from the base (convert + train)."""
    steps: int = 300
    """Optimizer steps of this stage."""
    batch_size: int = 32
    """Samples per optimizer step, split evenly over ``micro_batches``."""
    micro_batches: int = 1
    """Gradient-accumulation chunks per optimizer step (the trace counts sum over them)."""
    lr_base: float = 1e-3
    """LR of what the base model already knows: und experts, und router, shared experts."""
    lr_new: float = 3e-3
    """LR of what stage 2 adds: gen experts, gen router, gen io (vae in/out, timestep embedding)."""
    lr_backbone: float | None = None
    """LR of attention, norms and text io; None = ``lr_base`` (the follow-up paper's choice)."""
    lr_router: float | None = None
    """LR of the routers (tags ``und_router``, ``gen_router``); None = the LR their tag gets
    otherwise. A router far faster than the rest, without a balance loss, collapses routing."""
    differential_lr: bool = True
    """Off = every parameter at ``lr_new`` (the single-LR joint training of the baselines)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (tiny models on tiny data: none by default)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup: int = 20
    """Linear LR warm-up steps; then cosine decay to ``min_lr_ratio`` · LR at ``steps``."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay as a fraction of each group's LR (1.0 = constant LR)."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip; None = no clipping."""
    shielding: bool = True
    """Early gradient shielding of shared experts from vae tokens (stage 2 only)."""
    shield_steps: int = 50
    """Steps with shared experts fully shielded (paper: 500 of their much longer run)."""
    shield_release: float = 0.1
    """Gradient scale of vae tokens into shared experts after ``shield_steps`` (paper: 0.1)."""
    eval_every: int = 100
    """Evaluate every this many steps (and at step 0 and at the end); 0 = only at the end."""
    checkpoint_every: int = 100
    """Checkpoint every this many steps (always at the end); 0 = only at the end."""
    eval_batches: int = 4
    """Held-out batches per loss metric at each evaluation."""
    eval_images: int = 200
    """Held-out test digits classified for the recognition accuracy (capped by the split)."""
    gen_per_class: int = 5
    """Generated digits per class scored for generation correctness; 0 = skip generation eval."""
    sample_steps: int = 16
    """Euler steps of the flow sampler at evaluation."""
    group_batches: int = 8
    """Understanding batches run through the base model to count expert use for symbiotic groups."""
    seed: int = 0
    """Seeds the data splits, parameter init, batch sampling and evaluation."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run: stage 2 carries the stage-1 trainer in ``base`` so it can rebuild its base."""

    recipe: str
    """Recipe name this config came from (before overrides)."""
    model: ModelConfig
    """Model of this stage (stage 1 is always ``arch="moe"``)."""
    data: DataConfig
    """Data of this stage (the mix decides which tasks are trained)."""
    train: TrainConfig
    """Trainer of this stage."""
    trace: TraceConfig = field(default_factory=TraceConfig)
    """What the tracers record into traces.zarr."""
    base: TrainConfig | None = None
    """Stage-1 trainer (stage 2 only): the base model is trained with it, on ``base_mix``."""
    base_mix: tuple[float, float, float] | None = None
    """Stage-1 data mix T2I : LM : MMU (stage 2 only); None = understanding only (0 : 1 : 1)."""


# --------------------------------------------------------------------------- (de)serialise

def to_dict(cfg) -> dict:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def from_dict(cls, data: dict):
    """Rebuild a (nested) frozen dataclass from :func:`to_dict` output; unknown keys rejected."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        dc = dataclass_type(tp)
        if dc is not None and isinstance(value, dict):
            kwargs[f.name] = from_dict(dc, value)
        else:
            kwargs[f.name] = to_type(value, tp, f.name)
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"config has unknown keys for {cls.__name__}: {', '.join(sorted(unknown))}")
    return cls(**kwargs)


def run_config_from_json(text: str) -> RunConfig:
    return from_dict(RunConfig, json.loads(text))


# --------------------------------------------------------------------------- validation

def validate(cfg: RunConfig) -> RunConfig:
    """One clear ValueError line for a config that cannot train; returns ``cfg`` when fine."""
    for name, tc in (("train", cfg.train), ("base", cfg.base)):
        if tc is None:
            continue
        if tc.steps < 0:
            raise ValueError(f"{name}.steps must be >= 0, got {tc.steps}")
        if tc.batch_size <= 0 or tc.micro_batches <= 0:
            raise ValueError(f"{name}.batch_size and {name}.micro_batches must be positive")
        if tc.batch_size % tc.micro_batches:
            raise ValueError(f"{name}.batch_size ({tc.batch_size}) must be divisible by "
                             f"{name}.micro_batches ({tc.micro_batches})")
        for lr_name in ("lr_base", "lr_new"):
            if getattr(tc, lr_name) <= 0:
                raise ValueError(f"{name}.{lr_name} must be positive")
        for lr_name in ("lr_backbone", "lr_router"):
            if getattr(tc, lr_name) is not None and getattr(tc, lr_name) < 0:
                raise ValueError(f"{name}.{lr_name} must be >= 0")
        for k in ("warmup", "shield_steps", "eval_every", "checkpoint_every", "eval_batches",
                  "eval_images", "gen_per_class", "group_batches"):
            if getattr(tc, k) < 0:
                raise ValueError(f"{name}.{k} must be >= 0, got {getattr(tc, k)}")
        if not 0.0 <= tc.shield_release <= 1.0:
            raise ValueError(f"{name}.shield_release must be in [0, 1], got {tc.shield_release}")
        if not 0.0 <= tc.min_lr_ratio <= 1.0:
            raise ValueError(f"{name}.min_lr_ratio must be in [0, 1], got {tc.min_lr_ratio}")
        if tc.sample_steps <= 0:
            raise ValueError(f"{name}.sample_steps must be positive")
    if cfg.train.stage not in (1, 2):
        raise ValueError(f"train.stage must be 1 or 2, got {cfg.train.stage}")
    if cfg.train.stage == 2 and cfg.base is None:
        raise ValueError("a stage-2 config needs `base` (the stage-1 trainer)")
    if cfg.train.stage == 1 and cfg.model.arch != "moe":
        raise ValueError(f"stage 1 trains a plain moe base, got model.arch={cfg.model.arch!r}")
    for mix_name, mix in (("data.mix", getattr(cfg.data, "mix", None)), ("base_mix", cfg.base_mix)):
        if mix is not None and (any(m < 0 for m in mix) or sum(mix) <= 0):
            raise ValueError(f"{mix_name} needs non-negative weights with a positive sum, got {mix}")
    validate_model(cfg.model, cfg.data)
    return cfg


def validate_model(m: ModelConfig, data: DataConfig) -> None:
    """What ModelConfig's own checks leave out: sizes, and agreement with the data layout."""
    for k in ("d_model", "n_layers", "n_heads", "n_experts", "d_expert"):
        if getattr(m, k) <= 0:
            raise ValueError(f"model.{k} must be positive, got {getattr(m, k)}")
    if m.n_shared < 0:
        raise ValueError(f"model.n_shared must be >= 0, got {m.n_shared}")
    if m.max_seq_len < data.seq_len:
        raise ValueError(f"model.max_seq_len={m.max_seq_len} is shorter than data.seq_len={data.seq_len}")
    side = 8 // data.patch_size
    if m.patch_dim != data.patch_size ** 2 or m.n_image_tokens != side * side:
        raise ValueError(f"model.patch_dim/n_image_tokens ({m.patch_dim}/{m.n_image_tokens}) do not "
                         f"match data.patch_size={data.patch_size} (need {data.patch_size ** 2}/"
                         f"{side * side})")
    if not 0.0 < m.und_fraction < 1.0:
        raise ValueError(f"model.und_fraction must be in (0, 1), got {m.und_fraction}")
    n_und = round(m.und_fraction * m.n_experts)
    n_gen = m.n_experts - n_und
    if m.arch == "symbiotic" and m.groups is None and min(n_und, n_gen) < max(1, m.top_k):
        raise ValueError(f"model.und_fraction={m.und_fraction} with {m.n_experts} experts gives "
                         f"{n_und} und / {n_gen} gen experts: a group is empty or smaller than "
                         f"model.top_k={m.top_k}")
