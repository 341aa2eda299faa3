"""What the tracers record and how often (INTERNAL_API §3).

Plain primitives only, so the trainer's config (de)serialiser and ``--set trace.key=value``
handle it like any other section.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """Rates and settings of the tracers a :class:`~moe_probe.trace.session.TraceSession` runs."""

    enabled: bool = True
    """Off = the session only writes loss and eval rows (no hooks, plain backward)."""
    routing_every: int = 1
    """Record a ``routing`` row every this many optimizer steps (0 = never)."""
    grad_every: int = 10
    """Run the two-pass gradient-conflict tracer every this many steps (0 = never)."""
    probe_every: int | None = None
    """Shared-expert probes every this many steps; None = at every eval (and at the end); 0 = never."""
    snapshot: bool = True
    """Record a routing snapshot (saturation, co-activation) on the fixed probe batch at each eval."""
    token_every: int | None = None
    """Token-level routing (``token_routing``) at a snapshot every this many steps (and at the
    end); None = at every snapshot; 0 = never."""
    token_gates: bool = True
    """Keep the gate weights of the token-level picks (float16); off = ids only (a third of
    the bytes: gates barely compress)."""
    nominal_capacity: float = 1.0
    """C used to count the nominal ``kept`` of dropless layers (ARCHITECTURE, metric definitions)."""
    probe_C: float = 1.0
    """Inverse L2 strength of the logistic-regression probes (scikit-learn's ``C``)."""
    probe_max_iter: int = 500
    """Iteration cap of the probe solver (lbfgs)."""
    probe_test_fraction: float = 0.3
    """Share of the probe set held out to score the probes (split fixed by ``probe_seed``)."""
    probe_max_samples: int = 2000
    """Cap on probe examples per task (token-level tasks can yield many); subsampled by seed."""
    probe_seed: int = 0
    """Seeds the control-task labels and the train/test split, so probes are comparable over steps."""

    def __post_init__(self) -> None:
        for name in ("routing_every", "grad_every", "probe_max_iter", "probe_max_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"trace.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("probe_every", "token_every"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"trace.{name} must be >= 0 or none, got {getattr(self, name)}")
        if self.nominal_capacity <= 0:
            raise ValueError(f"trace.nominal_capacity must be positive, got {self.nominal_capacity}")
        if self.probe_C <= 0:
            raise ValueError(f"trace.probe_C must be positive, got {self.probe_C}")
        if not 0.0 < self.probe_test_fraction < 1.0:
            raise ValueError(f"trace.probe_test_fraction must be in (0, 1), got {self.probe_test_fraction}")
