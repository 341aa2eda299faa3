"""Train every run of the plan, resumably: ``DIR/<kind>/seed<S>/``.

A run is in one of three states, read from its directory (never from memory, so an
interrupted invocation is continued by the next one):

- done: its done mark (``Run.done_path``) exists (written only after the trainer returned) → skipped;
- half done: a trainer checkpoint exists → continued through the trainer's ``how="resume"``;
- not started (or died before its first checkpoint: derived data) → trained from scratch.

The stage-1 base is cached by the trainer under ``$MOE_PROBE_CACHE``; pointing that at
``DIR/.base`` makes every kind of one seed share one base (the default cache is
``<parent of RUN>/.base``, i.e. one per kind here) and keeps the bases inside DIR.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from moe_probe.reproduce.config import ReproduceConfig, RunKind
from moe_probe.run import BASE_CACHE, Run, write_json

MANIFEST = "reproduce.json"
"""DIR's record of the plan it was trained with (see ReproduceConfig.plan_key)."""


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One run of the plan."""

    kind: RunKind
    """The table row this run belongs to."""
    seed: int
    """Seed of the run (and of its base)."""
    recipe: str
    """Full recipe name (size prefix included)."""
    overrides: tuple[str, ...]
    """``--set`` overrides (size overrides, then the kind's)."""
    run_dir: Path
    """``DIR/<kind>/seed<S>``."""

    @property
    def label(self) -> str:
        return f"{self.kind.name}/seed{self.seed}"


def build_plan(cfg: ReproduceConfig, out: Path) -> list[RunSpec]:
    # Seed-major order: a seed's base is trained once, by its first run, then reused; an
    # interrupted invocation leaves whole seeds finished rather than every kind half-seeded.
    return [RunSpec(kind=k, seed=s, recipe=cfg.recipe_name(k), overrides=cfg.overrides(k),
                    run_dir=Path(out) / k.name / f"seed{s}")
            for s in cfg.seeds for k in cfg.kinds]


def prepare_out(cfg: ReproduceConfig, out: Path) -> None:
    """Create DIR (or check it), refuse one trained with another plan; ValueError → exit 2."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to --out {out}: {e.strerror or e}") from None
    manifest = out / MANIFEST
    old = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if old and old.get("plan") != cfg.plan_key():
        raise ValueError(f"{out} holds a reproduce with another plan ({old.get('plan')}); "
                         f"use another --out")
    # Seeds may grow between invocations (a later --seeds 5 adds to a finished --seeds 3).
    seeds = sorted(set(old.get("seeds", [])) | set(cfg.seeds))
    write_json(manifest, {"plan": cfg.plan_key(), "seeds": seeds})


def run_state(spec: RunSpec) -> str:
    """``done``, ``partial`` or ``new`` (see module doc); ValueError if it is another run."""
    done = Run(spec.run_dir).done_path
    if done.is_file():
        mark = json.loads(done.read_text())
        if mark.get("recipe") != spec.recipe or tuple(mark.get("overrides", ())) != spec.overrides:
            raise ValueError(f"{spec.run_dir} holds another run ({mark.get('recipe')} "
                             f"{mark.get('overrides')}); use another --out")
        return "done"
    return "partial" if Run(spec.run_dir).has_checkpoint() else "new"


def _planned_config(spec: RunSpec):
    from moe_probe.train import recipes
    from moe_probe.overrides import apply_overrides
    from moe_probe.train.config import validate

    return validate(apply_overrides(recipes.recipe(spec.recipe, seed=spec.seed),
                                    list(spec.overrides)))


def _saved_config(spec: RunSpec):
    """The config a half-done run was started with; it must be the planned one."""
    from moe_probe.train.config import run_config_from_json, to_dict

    saved = run_config_from_json(json.dumps(Run(spec.run_dir).config()))
    planned = _planned_config(spec)
    # Stage 2 fills in model.groups (chosen from the base); everything else must agree.
    same_model = to_dict(saved.model) == to_dict(replace(planned.model, groups=saved.model.groups))
    if saved.recipe != spec.recipe or not same_model or \
            to_dict(saved.train) != to_dict(planned.train) or to_dict(saved.data) != to_dict(planned.data):
        raise ValueError(f"{spec.run_dir} holds a run of another config; use another --out")
    return saved


def train_one(spec: RunSpec, *, log, quiet: bool | None = None) -> dict:
    """Train (or continue) one run and write its done marker; returns the marker's content."""
    from moe_probe.train.stages import train_run

    run = Run(spec.run_dir)
    state = run_state(spec)
    if state == "done":
        return json.loads(run.done_path.read_text())
    resumed_from = None
    if state == "partial":
        cfg = _saved_config(spec)
        resumed_from = run.progress()
    else:
        cfg = _planned_config(spec)
        if spec.run_dir.exists():
            # Died before its first checkpoint: nothing to continue from, and the trainer
            # refuses to create a store over an old one.
            shutil.rmtree(spec.run_dir)
    t0 = time.perf_counter()
    quiet = not sys.stderr.isatty() if quiet is None else quiet  # the trainer's step bar
    summary = train_run(cfg, spec.run_dir, how="resume" if state == "partial" else "new",
                        quiet=quiet, log=log)
    mark = {"kind": spec.kind.name, "seed": spec.seed, "recipe": spec.recipe,
            "overrides": list(spec.overrides), "steps": summary.get("steps"),
            "base": (summary.get("base") or {}).get("key"),
            "resumed_from": resumed_from, "wall_s": round(time.perf_counter() - t0, 1)}
    write_json(run.done_path, mark)
    return mark


def run_plan(cfg: ReproduceConfig, out: Path) -> list[RunSpec]:
    """Train what is not done yet, with a progress bar over the runs; returns the plan."""
    plan = build_plan(cfg, out)
    states = {s.label: run_state(s) for s in plan}  # refuse a foreign DIR before any work
    todo = [s for s in plan if states[s.label] != "done"]
    log = tqdm.write
    log(f"reproduce: {len(plan)} runs ({len(cfg.kinds)} kinds × {len(cfg.seeds)} seeds), "
        f"{len(plan) - len(todo)} already done, {len(todo)} to train"
        + (f", {cfg.jobs} at a time" if cfg.jobs > 1 and len(todo) > 1 else ""))
    with _base_cache(Path(out) / BASE_CACHE), tqdm(total=len(plan), desc="runs", unit="run",
                                                 dynamic_ncols=True) as bar:
        bar.update(len(plan) - len(todo))
        if cfg.jobs > 1 and len(todo) > 1:
            _run_parallel(todo, states, cfg.jobs, bar, log)
        else:
            for spec in todo:
                i = plan.index(spec) + 1
                bar.set_description(f"run {i}/{len(plan)} {spec.label}")
                verb = "continuing" if states[spec.label] == "partial" else "training"
                log(f"[{i}/{len(plan)}] {verb} {spec.label} ({spec.recipe}"
                    + (f" --set {' '.join(spec.overrides)}" if spec.overrides else "") + ")")
                mark = train_one(spec, log=lambda *a, **k: log(" ".join(map(str, a))))
                log(f"[{i}/{len(plan)}] {spec.label} done in {mark['wall_s']}s")
                bar.update(1)
    return plan


def _run_parallel(todo: list[RunSpec], states: dict, jobs: int, bar, log) -> None:
    """Runs side by side in ``jobs`` worker processes.

    Bases first, one task per base that a new run still needs: were they trained lazily by
    the first stage-2 run of each, the other workers would wait on the base lock instead of
    working. A failing run stops the rest (its error is raised)."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    from moe_probe.train.stages import base_config, base_key

    first_of_base = {}  # one task per base (a sweep's patch sizes and capacity factors differ)
    for spec in todo:
        if states[spec.label] == "new":
            first_of_base.setdefault(base_key(base_config(_planned_config(spec))), spec)
    ctx = multiprocessing.get_context("spawn")  # no torch state forked into the workers
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(jobs,)) as pool:
        try:
            if first_of_base:
                bar.set_description(f"stage-1 bases ({len(first_of_base)})")
                futs = [pool.submit(_base_task, spec) for spec in first_of_base.values()]
                _raise_first(wait(futs, return_when=FIRST_EXCEPTION).done)
                for f in futs:
                    f.result()
            bar.set_description("stage-2 runs")
            futs = {pool.submit(train_one, spec, log=_silent, quiet=True): spec for spec in todo}
            from concurrent.futures import as_completed

            for f in as_completed(futs):
                mark = f.result()
                log(f"{futs[f].label} done in {mark['wall_s']}s")
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _raise_first(done) -> None:
    for f in done:
        if f.exception() is not None:
            raise f.exception()


def _worker_init(jobs: int) -> None:
    import torch

    # Without OMP_NUM_THREADS each worker would start a thread per core: oversubscription.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def _silent(*_a, **_k) -> None:
    """Worker log: the parent reports each finished run."""


def _base_task(spec: RunSpec) -> str:
    from moe_probe.train.stages import ensure_base

    return str(ensure_base(_planned_config(spec), spec.run_dir, quiet=True, log=_silent))


@contextlib.contextmanager
def _base_cache(path: Path):
    old = os.environ.get("MOE_PROBE_CACHE")
    os.environ["MOE_PROBE_CACHE"] = str(path.resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MOE_PROBE_CACHE", None)
        else:
            os.environ["MOE_PROBE_CACHE"] = old

