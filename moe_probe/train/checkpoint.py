"""Exact, atomic checkpoints (where: ``Run(RUN_DIR).checkpoint_path``).

Everything a run needs to continue bit-for-bit: model and optimizer state, the torch /
numpy / python RNG states, the batch generator's state, the step, the config JSON, the
tokenizer state and the chosen expert groups. Only tensors, primitives and strings are
stored so the file loads with ``torch.load(weights_only=True)`` (no pickled code runs).
Writes go to a temporary file in the same directory and are renamed over the old one, so
a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from moe_probe.run import Run, write_json

FORMAT = 1
"""Bumped when the layout below changes; a checkpoint of another format is refused."""


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Run(run_dir).checkpoint_path


def rng_state() -> dict:
    """Global RNG states as tensors and primitives (weights_only-loadable)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))


def save(run_dir, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         generator: torch.Generator, step: int, config_json: str, tokenizer_state,
         groups, extra: dict | None = None) -> Path:
    """Write RUN_DIR/checkpoint.pt atomically (tmp + fsync + rename)."""
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "step": int(step),
        "config": config_json,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(),
        "generator": generator.get_state(),
        "tokenizer": tokenizer_state,
        "groups": groups,
        "extra": extra or {},
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # The step sidecar, so `info` and the base cache need not load weights to know it.
    write_json(Run(run_dir).progress_path, {"step": int(step)})
    return path


def load(run_dir) -> dict:
    """Read RUN_DIR/checkpoint.pt (weights only); missing or foreign → one-line ValueError."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise ValueError(f"no checkpoint in {run_dir} (expected {path})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"checkpoint {path} has format {found!r}, expected {FORMAT}")
    return payload


def restore(payload: dict, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
            generator: torch.Generator) -> int:
    """Load states from :func:`load` output into live objects; returns the step to continue at."""
    model.load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    generator.set_state(payload["generator"])
    set_rng_state(payload["rng"])
    return int(payload["step"])


def skeleton(payload: dict, model_cfg):
    """``(model, tokenizer)`` shaped for a checkpoint's state dict: a plain MoE converted with
    the saved groups (its weights are still an initialisation: load or restore them next). A
    stage-2 run thus resumes or probes without its base."""
    from moe_probe.data import Tokenizer
    from moe_probe.model import MultimodalMoE, convert

    tokenizer = Tokenizer.from_state_dict(payload["tokenizer"])
    model = MultimodalMoE(replace(model_cfg, arch="moe", groups=None), tokenizer.vocab_size)
    if model_cfg.arch != "moe":
        model = convert(model, model_cfg.arch, groups=payload["groups"])
    return model, tokenizer
