"""``moe-probe reproduce --sweep``: where routing collapse appears, for ``moe`` and ``symbiotic``.

Two heat maps of cells around one centre (patch 2, T2I share 0.6, LR ×1, C = 1.25):

- *generation-token share*: image latent tokens per image through the patch size (2 → 16
  tokens, 4 → 4 tokens per 8×8 digit) × the T2I share of the stage-2 mix (LM and MMU split the
  rest equally; the demo mix 6:2:2 is share 0.6);
- *generation LR × capacity*: the multiplier of ``train.lr_new`` (Symbiotic: what stage 2 adds,
  gen experts, gen router, gen io; ``moe`` trains every parameter at ``lr_new``, so there it
  scales the one LR) × the capacity factor C.

Every cell is trained for both architectures and every seed, as ``DIR/<arch>/<cell>/seed<S>``
through the reproduce runner (same resumability, workers and per-seed base cache; a patch
size has a base of its own). Each run is the demo recipe plus :data:`SWEEP_SIZE` (no gradient
tracer, no probes, no generation eval: none of them is measured here) plus its cell's
overrides. Results: :mod:`.sweep_results`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_probe.reproduce.config import ReproduceConfig, RunKind

ARCHS = ("moe", "symbiotic")


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One point of the sweep."""

    patch: int
    """``data.patch_size`` (the model's patch dim and image tokens follow)."""
    t2i: float
    """T2I share of the stage-2 mix; LM and MMU share the rest equally."""
    lr_mult: float
    """Multiplier of the recipe's ``train.lr_new``."""
    cf: float
    """``model.capacity_factor``."""

    @property
    def key(self) -> str:
        return f"p{self.patch}_t2i{self.t2i:g}_lr{self.lr_mult:g}_cf{self.cf:g}"

    def overrides(self, lr_new: float) -> tuple[str, ...]:
        side = 8 // self.patch
        rest = (1.0 - self.t2i) / 2
        return (f"data.patch_size={self.patch}", f"model.patch_dim={self.patch ** 2}",
                f"model.n_image_tokens={side * side}",
                f"data.mix={10 * self.t2i:g},{10 * rest:g},{10 * rest:g}",
                f"train.lr_new={lr_new * self.lr_mult:g}", f"model.capacity_factor={self.cf:g}")


CENTER = Cell(patch=2, t2i=0.6, lr_mult=1.0, cf=1.25)


@dataclass(frozen=True, kw_only=True)
class Panel:
    """One heat map: ``y`` rows × ``x`` columns of cells, the other axes at the centre."""

    name: str
    """Id (file and JSON key)."""
    title: str
    """Heading of the heat map."""
    x: tuple[str, tuple]
    """Column axis: a Cell field and its values."""
    y: tuple[str, tuple]
    """Row axis: a Cell field and its values."""

    def cells(self) -> list[tuple[object, object, Cell]]:
        """(y value, x value, cell) row by row."""
        from dataclasses import replace

        (xf, xs), (yf, ys) = self.x, self.y
        return [(yv, xv, replace(CENTER, **{xf: xv, yf: yv})) for yv in ys for xv in xs]


PANELS: tuple[Panel, ...] = (
    Panel(name="gen_share", title="generation-token share: patch size × T2I share of the mix",
          x=("t2i", (0.3, 0.6, 0.8)), y=("patch", (2, 4))),
    Panel(name="lr_capacity", title="generation LR multiplier × capacity factor",
          x=("cf", (1.0, 1.25, 2.0)), y=("lr_mult", (0.5, 1.0, 2.0))),
)
QUICK_PANELS: tuple[Panel, ...] = (
    Panel(name="gen_share", title=PANELS[0].title, x=("t2i", (0.6,)), y=("patch", (2, 4))),
    Panel(name="lr_capacity", title=PANELS[1].title, x=("cf", (1.25,)), y=("lr_mult", (1.0, 3.0))),
)
"""``--quick --sweep``: 3 cells at test size (tests, CI)."""

SWEEP_SIZE: tuple[str, ...] = ("trace.grad_every=0", "trace.probe_every=0",
                               "train.gen_per_class=0")
"""Applied to every sweep run (both sizes): only routing and the held-out text loss are read.
The demo recipe evaluates every 50 steps, which the text-loss change (last − first) and its
worst point need no more than the cost of a full eval: kept as it is."""


def panels(quick: bool) -> tuple[Panel, ...]:
    return QUICK_PANELS if quick else PANELS


def cells(quick: bool) -> list[Cell]:
    """Every distinct cell of the panels (the centre once), in panel order."""
    return list(dict.fromkeys(c for p in panels(quick) for _, _, c in p.cells()))


def sweep_config(*, quick: bool, seeds: tuple[int, ...], jobs: int) -> ReproduceConfig:
    from moe_probe.train import recipes

    kinds = []
    for cell in cells(quick):
        for arch in ARCHS:
            lr_new = recipes.recipe(f"tiny-{arch}" if quick else arch).train.lr_new
            kinds.append(RunKind(name=f"{arch}/{cell.key}", recipe=arch,
                                 overrides=cell.overrides(lr_new),
                                 about=f"{arch} at {cell.key}"))
    return ReproduceConfig(quick=quick, seeds=seeds, size_overrides=SWEEP_SIZE,
                           kinds=tuple(kinds), jobs=jobs, sweep=True)
