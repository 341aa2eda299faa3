"""What ``moe-probe reproduce`` runs: the run kinds of the study and the size settings.

The study (PAPER_NOTES.md): per seed one stage-1 understanding base (cached, shared by every
stage-2 run of that seed), then stage 2 for the three architectures, the understanding-only
control and the Symbiotic ablations. Kinds are recipes + ``--set`` overrides of the train
command, nothing more — so every run can be re-run by hand with ``moe-probe train``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RunKind:
    """One row of the results table: a recipe plus overrides, trained once per seed."""

    name: str
    """Row name and directory name (``DIR/<name>/seed<S>/``)."""
    recipe: str
    """Recipe name without the size prefix (``tiny-`` is added in quick mode)."""
    overrides: tuple[str, ...] = ()
    """``--set key=value`` overrides on top of the recipe (and of the size overrides)."""
    about: str = ""
    """One line for the table legend: what this kind changes."""


KINDS: tuple[RunKind, ...] = (
    RunKind(name="moe", recipe="moe", about="standard MoE, one routed pool, single LR"),
    RunKind(name="mot", recipe="mot", about="Mixture-of-Transformers (und/gen towers)"),
    RunKind(name="symbiotic", recipe="symbiotic",
            about="Symbiotic-MoE, und group 3/4 of experts, shielding + differential LR"),
    RunKind(name="und_only", recipe="und_only",
            about="Only-LM-MMU control (no generation data), single LR"),
    RunKind(name="sym_no_shield", recipe="symbiotic", overrides=("train.shielding=false",),
            about="Symbiotic without early gradient shielding"),
    RunKind(name="sym_no_difflr", recipe="symbiotic", overrides=("train.differential_lr=false",),
            about="Symbiotic with every parameter at lr_new (no differential LR)"),
    RunKind(name="sym_und_1_4", recipe="symbiotic", overrides=("model.und_fraction=0.25",),
            about="Symbiotic with 1/4 of experts for understanding"),
    RunKind(name="sym_und_1_2", recipe="symbiotic", overrides=("model.und_fraction=0.5",),
            about="Symbiotic with 1/2 of experts for understanding"),
)
"""The 3/4 split is the default ``symbiotic`` run itself: reused, not trained twice."""


@dataclass(frozen=True, kw_only=True)
class ReproduceConfig:
    """Size and seeds of one ``reproduce`` invocation (recorded in ``DIR/reproduce.json``)."""

    quick: bool
    """True = the ``tiny-*`` recipes (tests, CI); False = the demo recipes."""
    seeds: tuple[int, ...]
    """Seeds trained per kind; 95% CIs need at least two (one seed → every verdict inconclusive)."""
    size_overrides: tuple[str, ...] = ()
    """Overrides applied to every run before the kind's own (e.g. fewer steps to fit the
    wall-clock budget). Part of the plan: a directory trained with other ones is refused."""
    kinds: tuple[RunKind, ...] = KINDS
    """Run kinds, in table order."""
    jobs: int = 1
    """Runs trained side by side in worker processes (1 = one after the other, in process)."""
    sweep: bool = False
    """The collapse map (:mod:`.sweep`) instead of the paper's study; part of the plan."""

    def recipe_name(self, kind: RunKind) -> str:
        return f"tiny-{kind.recipe}" if self.quick else kind.recipe

    def overrides(self, kind: RunKind) -> tuple[str, ...]:
        return (*self.size_overrides, *kind.overrides)

    def plan_key(self) -> dict:
        """What a finished run in DIR must agree with (seeds may grow between invocations)."""
        key = {"quick": self.quick, "size_overrides": list(self.size_overrides)}
        return {**key, "sweep": True} if self.sweep else key


QUICK_SEEDS = 2
"""Quick mode default: two seeds, the fewest that give a CI (tiny runs take seconds each)."""
DEFAULT_SEEDS = 5
"""Default mode: five seeds. The verdicts are paired t-tests, Holm-corrected per claim: at 3
seeds (2 degrees of freedom, t quantile 4.30) only very large effects pass; at 5 (t 2.78)
moderate ones can."""

SWEEP_SEEDS = 3
"""``--sweep`` default: three seeds per cell (14 cells × 2 architectures; see :mod:`.sweep`)."""

DEFAULT_SIZE: tuple[str, ...] = ()
"""Demo-size overrides of the default mode. Empty = the demo recipes as they are; if the
measured wall-clock exceeds the budget this is where the steps are scaled down (documented
in the report's header, since every run of DIR carries them)."""


def make_config(*, quick: bool, seeds: int | None, jobs: int | None = None,
                sweep: bool = False) -> ReproduceConfig:
    """Config for the CLI flags; ValueError (exit 2) for a bad ``--seeds`` or ``--jobs``."""
    default = (QUICK_SEEDS if quick else SWEEP_SEEDS if sweep else DEFAULT_SEEDS)
    n = default if seeds is None else seeds
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    if n > 50:
        raise ValueError(f"--seeds {n} is more than this CPU-scale study can train (max 50)")
    if sweep:
        from moe_probe.reproduce.sweep import sweep_config

        return sweep_config(quick=quick, seeds=tuple(range(n)), jobs=_jobs(quick, jobs))
    return ReproduceConfig(quick=quick, seeds=tuple(range(n)),
                           size_overrides=() if quick else DEFAULT_SIZE, jobs=_jobs(quick, jobs))


def _jobs(quick: bool, jobs: int | None = None) -> int:
    """Worker processes: `--jobs`, else ``$MOE_PROBE_JOBS`` if set, else 1 for quick (tiny runs:
    process start-up would cost more than it saves) and one per core, at most 2, otherwise."""
    if jobs is not None:
        if jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {jobs}")
        return jobs
    env = os.environ.get("MOE_PROBE_JOBS")
    if env:
        try:
            jobs = int(env)
        except ValueError:
            raise ValueError(f"MOE_PROBE_JOBS must be an integer, got {env!r}") from None
        if jobs < 1:
            raise ValueError(f"MOE_PROBE_JOBS must be >= 1, got {jobs}")
        return jobs
    return 1 if quick else max(1, min(2, os.cpu_count() or 1))
