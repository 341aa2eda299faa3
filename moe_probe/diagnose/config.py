"""Thresholds of the collapse / conflict detectors (documented defaults).

Windows count *rows of the group* (routed steps for `routing`, sampled steps for `grad`), not
optimizer steps, so a run traced every 5 steps needs the same evidence as one traced every step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True)
class DiagnoseConfig:
    """Every threshold a detector uses; the JSON report records the values it ran with."""

    collapse_rate: float = 0.8
    """Capacity rate below which a (layer, modality) counts as collapsing (1.0 = nothing dropped)."""
    collapse_critical: float = 0.6
    """A collapse whose final capacity rate is below this is `critical`, otherwise `warning`."""
    window: int = 20
    """Consecutive routed rows a condition must hold before it is a finding (collapse, dead
    experts, imbalance, dominance). One noisy dip is far shorter than this."""
    smooth: int = 3
    """Centred running-median width (rows) applied before thresholding, so one noisy spike inside
    a collapsed stretch does not split the window. 1 = no smoothing."""
    dead_frac: float = 0.0
    """Dead-expert finding when the fraction of a group's experts that get < 1% of the uniform
    share of *all* the group's assignments (every token kind routed there) stays above this for
    `window` rows (0 = any such expert)."""
    dead_critical: float = 0.5
    """Dead experts are `critical` when at least this fraction of the group is dead."""
    maxvio: float = 1.0
    """Load-imbalance finding when MaxVio of the load summed over `window` rows exceeds this (1.0
    = the busiest expert gets twice the mean load). Summed, because per-step MaxVio of a few
    tokens per expert is mostly sampling noise."""
    maxvio_critical: float = 3.0
    """Imbalance is `critical` when the final MaxVio exceeds this."""
    phase_fraction: float = 0.1
    """Share of the run (rows, at least 1) taken as "early" and as "late" when comparing phases."""
    takeover_share: float = 0.5
    """An expert belongs to the modality that sends it at least this share of its assignments."""
    takeover_delta: float = 0.25
    """Minimum rise of the generation share of an early-understanding expert to call it taken over."""
    takeover_growth: float = 1.5
    """...and generation tokens' own use of it (its share of all gen assignments) must grow by at
    least this factor — otherwise understanding tokens merely left the expert."""
    takeover_min_fraction: float = 0.25
    """A layer is dominated when at least this fraction of its early-understanding experts are
    taken over by generation tokens."""
    grad_ratio: float = 3.0
    """Gradient-domination threshold on norm_gen / norm_und."""
    grad_components: tuple[str, ...] = ("shared", "router")
    """Components (shared between tasks) checked for gradient domination."""
    most: float = 0.75
    """"Most sampled steps": fraction of a cell's measured grad rows from the onset of a
    condition to the end of the run that must meet it."""
    persist_span: float = 0.25
    """A persistent gradient condition must hold from its onset to the end of the run over at
    least this fraction of the measured rows (a late-starting conflict still counts)."""
    alpha: float = 0.001
    """Sign-test level: the share of rows meeting a gradient condition from onset on must be
    unlikely (p <= alpha) under a coin flip, so a cosine that merely jitters around 0 is not
    called a conflict (needs >= 10 rows when every row agrees)."""
    min_rows: int = 3
    """Fewer measured rows than this (per layer/component) is "not measured", never a finding."""
    conflict_cosine: float = 0.0
    """Gradient conflict where cos(grad_und, grad_gen) is below this (PCGrad's definition)."""
    conflict_critical: float = -0.3
    """Conflict is `critical` when the median cosine of a flagged cell is below this."""
    probe_margin: float = 0.05
    """Absolute fall of a higher-is-better probe value (accuracy, selectivity) from its start, or
    below the control run, that counts as a shared-expert regression."""
    loss_margin: float = 0.10
    """Relative rise of a lower-is-better isolated metric (loss, perplexity, error) that counts."""
    probe_tail: int = 2
    """The final value of a probe series is the mean of its last this-many rows (noise)."""

    def __post_init__(self):
        # User input (`diagnose --set`): out-of-range values would give silent nonsense.
        for name in ("window", "smooth", "min_rows", "probe_tail"):
            if getattr(self, name) < 1:
                raise ValueError(f"diagnose {name} must be >= 1, got {getattr(self, name)}")
        for name in ("dead_frac", "dead_critical", "phase_fraction", "takeover_share",
                     "takeover_min_fraction", "most", "persist_span", "alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"diagnose {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("conflict_cosine", "conflict_critical"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"diagnose {name} is a cosine, in [-1, 1]; got "
                                 f"{getattr(self, name)}")
        for name in ("collapse_rate", "collapse_critical", "maxvio", "maxvio_critical",
                     "takeover_delta", "takeover_growth", "grad_ratio", "probe_margin",
                     "loss_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"diagnose {name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grad_components"] = list(self.grad_components)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiagnoseConfig":
        d = dict(d)
        if "grad_components" in d:
            d["grad_components"] = tuple(d["grad_components"])
        return cls(**d)
